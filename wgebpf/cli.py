"""The `wgebpf` command line.

Every bad argument ends in one line on stderr and exit code 2, before
anything is created; failures at run time exit 1. Never a traceback.
"""

import logging
import math
import os
import re
import sys

import typer

from .wireguard import keys
from .control.config import redact_keys

app = typer.Typer(
    add_completion=False, no_args_is_help=True,
    help="A userspace WireGuard for Linux that treats WireGuard as a link layer.\n\n"
         "Example: wgebpf attach eth0 --config /etc/wireguard/wg0.conf --name wg0",
)


def one_line(text: str) -> str:
    """`text` with line breaks and other unprintable characters escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def fail(message: str, code: int = 1) -> None:
    typer.echo(f"wgebpf: {one_line(message)}", err=True)
    raise typer.Exit(code)


# Linux's dev_valid_name(): what the kernel refuses, and the name becomes a
# file name under /run, so '/' and '..' must never pass.
IFNAMSIZ = 16


def check_ifname(name: str, what: str = "interface name") -> None:
    """Exit 2 unless `name` is a name the kernel would accept for a link."""
    problem = None
    if not name or len(name.encode(errors="surrogateescape")) >= IFNAMSIZ:
        problem = f"must be 1 to {IFNAMSIZ - 1} bytes"
    elif name in (".", ".."):
        problem = "cannot be '.' or '..'"
    elif any(c in "/:\0" or c.isspace() for c in name):
        problem = "cannot contain '/', ':', NUL or white space"
    if problem:
        fail(f"{what} {redact_keys(name[:40])!r}: {problem}", 2)


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
    from .control.attach import AttachError, attach as run_attach, check_underlay
    from .control.config import ConfigError, load, parse_metrics

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="wgebpf[%(process)d]: %(message)s", stream=sys.stderr)
    # Every argument is checked before anything is created.
    check_ifname(underlay, "underlay")
    check_ifname(name, "--name")
    if xdp not in ("auto", "native", "generic", "off"):
        fail(f"--xdp: {redact_keys(xdp[:40])!r} is not one of auto, native, generic, off", 2)
    if metrics is not None:
        try:
            metrics = parse_metrics(metrics)
        except ValueError as exc:
            fail(f"--metrics: {exc}", 2)
    try:
        cfg = load(config)
    except ConfigError as exc:
        fail(str(exc), 2)
    if metrics is not None:
        cfg.interface.metrics = metrics
    if metrics_compat:
        cfg.interface.metrics_compat = True
    try:
        check_underlay(underlay)
    except AttachError as exc:
        fail(str(exc), 2)
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
    from .control.state import detach as run_detach
    check_ifname(name)
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
    from .control.show import ShowError, interfaces, query, render, status
    if name is not None:
        check_ifname(name)
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
    from .control.settings import SettingError, parse_args
    from .control.show import ShowError, uapi_request
    check_ifname(name)
    try:
        lines = parse_args(args)
    except SettingError as exc:
        fail(f"set: {exc}", 2)
    try:
        answer = uapi_request(name, "wgebpf-set=1\n" + "".join(f"{l}\n" for l in lines) + "\n")
    except ShowError as exc:
        fail(str(exc))
    code = next((l.split("=", 1)[1] for l in answer if l.startswith("errno=")), "0")
    if code != "0":
        message = next((l for l in answer if l and not l.startswith("errno=")), f"errno {code}")
        fail(f"set {name}: {message}")


@app.command("status")
def status_command(
    name: str = typer.Argument(..., help="interface name"),
    as_json: bool = typer.Option(False, "--json", help="print the status as JSON (for scripts)"),
):
    """Print wgebpf's own state: workers, peers, drops by reason, eBPF
    counters, traffic per next hop (what `wg show` cannot carry), in
    aligned columns; --json prints it all as JSON.

    Examples: wgebpf status wg0; wgebpf status wg0 --json | jq .workers
    """
    import json
    from .control.show import ShowError, status
    check_ifname(name)
    try:
        snapshot = status(name)
    except ShowError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(snapshot, indent=2, sort_keys=True))
    else:
        from .control.status_text import render_text
        typer.echo(render_text(snapshot), nl=False)


@app.command()
def genkey():
    """Print a new private key (base64), like `wg genkey`."""
    typer.echo(keys.encode(keys.generate_private_key()))


@app.command()
def pubkey():
    """Read a private key on stdin, print its public key, like `wg pubkey`."""
    # Bytes, not text: undecodable input must be an error, not a traceback.
    text = sys.stdin.buffer.read(4096).decode("ascii", errors="replace").strip()
    try:
        private = keys.decode(text)
    except keys.KeyFormatError as exc:   # its message never holds the key
        fail(f"pubkey: {exc}", 2)
    typer.echo(keys.encode(keys.public_key(private)))


@app.command()
def genpsk():
    """Print a new preshared key (base64), like `wg genpsk`."""
    typer.echo(keys.encode(keys.generate_preshared_key()))


@app.command()
def demo(
    classic: bool = typer.Option(False, "--classic",
                                 help="the point-to-point demo: one wgebpf host, one "
                                      "wireguard-go host, pings and iperf3"),
):
    """Show in namespaces what wgebpf adds: routes choose the peer (via, replace,
    ECMP) and the routing table checks sources; --classic: a plain tunnel."""
    from .lab import demo as demo_module
    raise typer.Exit(demo_module.main(classic=classic) or 0)


@app.command()
def bench(
    output: str = typer.Option("./bench-out", "--output", "-o", metavar="DIR",
                               help="where bench.json, bench.md and bench.png go"),
    repeats: int = typer.Option(3, "--repeats", min=1, help="runs of each configuration"),
    seconds: float = typer.Option(5, "--seconds", help="length of each TCP run"),
    workers: str = typer.Option("1,2", "--workers", help="wgebpf Workers counts to compare"),
    selections: str = typer.Option("nexthop,allowedips", "--selections",
                                    help="wgebpf PeerSelection modes to compare"),
    quick: bool = typer.Option(False, "--quick",
                               help="1 repeat, 1-second runs, one configuration per pairing"),
    compare_tree: str = typer.Option(None, "--compare-tree", metavar="DIR",
                                     help="also run each wgebpf configuration with the "
                                          "checkout in DIR (e.g. git worktree add DIR REV), "
                                          "alternating, and give this code's ratio to it"),
):
    """Compare wgebpf and wireguard-go in namespaces: TCP, small-packet UDP,
    latency and CPU per GB; writes JSON, a Markdown table and a PNG plot.

    Example: sudo wgebpf bench --output bench-out --repeats 3 --seconds 5

    Before / after a change: git worktree add /tmp/base main, then
    sudo wgebpf bench --compare-tree /tmp/base
    """
    from .lab import bench as bench_module
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_BENCH_SECONDS):
        fail(f"bench: --seconds must be more than 0 and at most {MAX_BENCH_SECONDS}", 2)
    check_output_dir(output)
    # bench checks each count; refuse first what would make its message huge.
    if not re.fullmatch(r"\s*[0-9]{1,3}\s*(,\s*[0-9]{1,3}\s*)*", workers):
        fail(f"bench: --workers: expected counts like 1,2 (each 1..255), "
             f"not {redact_keys(workers[:40])!r}", 2)
    if not re.fullmatch(r"\s*[a-z]{1,16}\s*(,\s*[a-z]{1,16}\s*)*", selections):
        fail(f"bench: --selections: expected modes like nexthop,allowedips, "
             f"not {redact_keys(selections[:40])!r}", 2)
    raise typer.Exit(bench_module.main(output_dir=output, repeats=repeats, seconds=seconds,
                                       workers=workers, selections=selections, quick=quick,
                                       compare_tree=compare_tree))


# One run of one configuration; longer is a typo, not a measurement.
MAX_BENCH_SECONDS = 3600


def check_output_dir(path: str) -> None:
    """Exit 2 unless `path` is a directory or can become one: bench would
    otherwise find out only after minutes of measuring."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        fail(f"bench: --output {path[:80]!r}: {existing[:80]!r} is not a directory", 2)


def main() -> None:
    if not sys.argv[1:]:
        app()                       # no arguments: typer prints the help
        return
    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        typer.echo("wgebpf: aborted", err=True)
        code = 1
    except typer.TyperException as exc:   # click's usage errors: one line, no box
        context = getattr(exc, "ctx", None)
        where = context.command_path if context is not None else "wgebpf"
        # Click quotes the arguments it refuses: `wgebpf pubkey KEY` is an easy mistake.
        message = redact_keys(one_line(exc.format_message()))
        # `wgebpf wg0`: what wg-quick runs when told WG_QUICK_USERSPACE_IMPLEMENTATION=wgebpf.
        hint = ("; for wg-quick: WG_QUICK_USERSPACE_IMPLEMENTATION=wgebpf-go"
                if message.startswith("No such command") and len(sys.argv) == 2 else "")
        typer.echo(f"{where}: {message[:300]} (see {where} --help{hint})", err=True)
        code = getattr(exc, "exit_code", 2)
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
