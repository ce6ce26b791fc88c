"""The `wgebpf` command line."""

import logging
import os
import sys

import typer

from . import keys

app = typer.Typer(
    add_completion=False, no_args_is_help=True,
    help="A userspace WireGuard for Linux that treats WireGuard as a link layer.\n\n"
         "Example: wgebpf attach eth0 --config /etc/wireguard/wg0.conf --name wg0",
)


def fail(message: str, code: int = 1) -> None:
    typer.echo(f"wgebpf: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def attach(
    underlay: str = typer.Argument(..., help="the interface WireGuard's UDP runs over, e.g. eth0"),
    config: str = typer.Option(..., "--config", "-c", help="wg-quick style config file"),
    name: str = typer.Option("wgebpf0", "--name", "-n", help="the WireGuard interface to create"),
    metrics: str = typer.Option(None, "--metrics", metavar="ADDR:PORT",
                                help="serve Prometheus metrics here (overrides the config's Metrics)"),
    metrics_compat: bool = typer.Option(False, "--metrics-compat",
                                        help="also expose wireguard_* names that community "
                                             "WireGuard dashboards query"),
    xdp: str = typer.Option("auto", "--xdp", metavar="MODE",
                            help="XDP guard on UNDERLAY: auto (native, else generic), native, "
                                 "generic, or off"),
    force: bool = typer.Option(False, "--force",
                               help="replace an XDP program on UNDERLAY that wgebpf did not load"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging"),
):
    """Create interface NAME from CONFIG, carry traffic over UNDERLAY until
    SIGINT/SIGTERM, then remove everything created.

    Example: wgebpf attach eth0 --config wg0.conf --name wg0 --metrics 127.0.0.1:9586
    """
    from .attach import AttachError, attach as run_attach
    from .config import ConfigError, load

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="wgebpf[%(process)d]: %(message)s", stream=sys.stderr)
    try:
        cfg = load(config)
    except ConfigError as exc:
        fail(str(exc), 2)
    if metrics is not None:
        from .config import _metrics as check_metrics
        try:
            cfg.interface.metrics = check_metrics(metrics)
        except ValueError as exc:
            fail(f"--metrics: {exc}", 2)
    if metrics_compat:
        cfg.interface.metrics_compat = True
    if xdp not in ("auto", "native", "generic", "off"):
        fail(f"--xdp: {xdp!r} is not one of auto, native, generic, off", 2)
    if os.geteuid() != 0:
        fail("attach needs root (CAP_NET_ADMIN)")
    try:
        run_attach(underlay, cfg, name, xdp, force)
    except (AttachError, OSError) as exc:
        fail(f"attach {name}: {exc}")
    except Exception as exc:  # hooks, netlink: report, never a traceback wall
        fail(f"attach {name}: {type(exc).__name__}: {exc}")


@app.command()
def detach(name: str = typer.Argument(..., help="interface name")):
    """Stop a running instance and remove whatever it (or a crashed one) left.

    Example: wgebpf detach wg0
    """
    from .state import detach as run_detach
    try:
        for line in run_detach(name):
            typer.echo(line)
    except ValueError as exc:
        fail(str(exc), 2)


@app.command()
def show(name: str = typer.Argument(None, help="interface name (default: all)")):
    """Show interfaces in the layout of `wg show` (keys hidden).

    Example: wgebpf show wg0
    """
    from .show import ShowError, interfaces, query, render, status
    names = [name] if name else interfaces()
    shown, failed = [], False
    for each in names:
        try:
            device = query(each)
        except ShowError as exc:        # one hung interface must not hide the others
            typer.echo(f"wgebpf: {exc}", err=True)
            failed = True
            continue
        try:
            extra = status(each)
        except ShowError:
            extra = None                # not ours (wireguard-go): the plain layout
        shown.append(render(each, device, extra=extra))
    typer.echo("\n".join(shown), nl=False)
    if failed:
        raise typer.Exit(1)


@app.command("set")
def set_command(
    name: str = typer.Argument(..., help="interface name"),
    args: list[str] = typer.Argument(..., metavar="[peer KEY] source-policy POLICY"),
):
    """Change wgebpf's own settings on a running interface, live.

    Examples: wgebpf set wg0 source-policy fib;
    wgebpf set wg0 peer <base64 key> source-policy off  (or: default)
    """
    from .show import ShowError, uapi_request
    lines, words = [], list(args)
    while words:
        word = words.pop(0)
        if not words:
            fail(f"set: {word!r} needs a value", 2)
        value = words.pop(0)
        if word == "peer":
            try:
                lines.append(f"public_key={keys.to_hex(keys.decode(value))}")
            except keys.KeyFormatError as exc:
                fail(f"set: peer: {exc}", 2)
        elif word == "source-policy":
            lines.append(f"source_policy={value}")
        else:
            fail(f"set: unknown setting {word!r} (try: source-policy)", 2)
    try:
        answer = uapi_request(name, "wgebpf-set=1\n" + "".join(f"{l}\n" for l in lines) + "\n")
    except ShowError as exc:
        fail(str(exc))
    code = next((l.split("=", 1)[1] for l in answer if l.startswith("errno=")), "0")
    if code != "0":
        message = next((l for l in answer if l and not l.startswith("errno=")), f"errno {code}")
        fail(f"set {name}: {message}")


@app.command("status")
def status_command(name: str = typer.Argument(..., help="interface name")):
    """Print wgebpf's own state as JSON: workers, drops by reason, eBPF
    counters, traffic per next hop (what `wg show` cannot carry).

    Example: wgebpf status wg0 | jq .workers
    """
    import json
    from .show import ShowError, status
    try:
        typer.echo(json.dumps(status(name), indent=2, sort_keys=True))
    except ShowError as exc:
        fail(str(exc))


@app.command()
def genkey():
    """Print a new private key (base64), like `wg genkey`."""
    typer.echo(keys.encode(keys.generate_private_key()))


@app.command()
def pubkey():
    """Read a private key on stdin, print its public key, like `wg pubkey`."""
    try:
        private = keys.decode(sys.stdin.read().strip())
    except keys.KeyFormatError as exc:
        fail(f"pubkey: {exc}", 1)
    typer.echo(keys.encode(keys.public_key(private)))


@app.command()
def genpsk():
    """Print a new preshared key (base64), like `wg genpsk`."""
    typer.echo(keys.encode(keys.generate_preshared_key()))


@app.command()
def demo():
    """Build two namespaces (wgebpf and wireguard-go), send traffic, show both."""
    from . import demo as demo_module
    raise typer.Exit(demo_module.main() or 0)


@app.command()
def bench(
    output: str = typer.Option("./bench-out", "--output", "-o", metavar="DIR",
                               help="where bench.json, bench.md and bench.png go"),
    repeats: int = typer.Option(3, "--repeats", min=1, help="runs of each configuration"),
    seconds: float = typer.Option(5, "--seconds", help="length of each TCP run"),
    workers: str = typer.Option("1,2", "--workers", help="wgebpf Workers counts to compare"),
    quick: bool = typer.Option(False, "--quick",
                               help="1 repeat, 1-second runs, one configuration per pairing"),
):
    """Compare wgebpf and wireguard-go in namespaces: TCP, small-packet UDP,
    latency and CPU per GB; writes JSON, a Markdown table and a PNG plot.

    Example: sudo wgebpf bench --output bench-out --repeats 3 --seconds 5
    """
    from . import bench as bench_module
    raise typer.Exit(bench_module.main(output_dir=output, repeats=repeats, seconds=seconds,
                                       workers=workers, quick=quick))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
