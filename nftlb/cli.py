"""The command line, a skin over the library: each command parses its options, calls one
library function and prints a view (nftlb.views, or the result's dict with --json).

`main()` is the one place that turns exceptions into exit codes (nftlb.errors.ExitStatus):
0 ok, 1 a check said no (diff, doctor), 2 bad input or usage, 3 kernel or system error.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from nftlb import __version__, desired, explain, kernel, logs, ops, plan, pools_file, state, units, views, watch
from nftlb.errors import ExitStatus, NftlbError

app = typer.Typer(
    name="nftlb",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class LogFormat(StrEnum):
    text = "text"
    json = "json"


class KernelName(StrEnum):
    libnftables = "libnftables"
    nft = "nft"


FileArg = Annotated[Path, typer.Argument(help="The pools file (YAML).", metavar="FILE")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]
ViaOpt = Annotated[  # the flag keeps its name: scripts use it
    KernelName | None,
    typer.Option("--backend", help="How to reach the kernel [default: libnftables if importable, else nft]."),
]
StateDirOpt = Annotated[
    Path, typer.Option("--state-dir", envvar="NFTLB_STATE_DIR", help="Where nftlb keeps what it applied.")
]
PoolArg = Annotated[str, typer.Argument(help="Pool name.", metavar="POOL")]
BackendArg = Annotated[
    str, typer.Argument(help="Backend: ADDR:PORT, [V6]:PORT, or ADDR if unique in the pool.", metavar="BACKEND")
]
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", help="Show the diff and have the kernel check it; change nothing.")
]
STATE_DIR = Path(state.DEFAULT_DIR)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"nftlb {__version__}")
        raise typer.Exit()


def _out(as_json: bool, doc: dict, text: str) -> None:
    if as_json:  # indented for a person at a terminal; compact (and much faster when large) for scripts
        indent = 2 if sys.stdout.isatty() else None
        typer.echo(json.dumps(doc, indent=indent, sort_keys=True, separators=None if indent else (",", ":")))
    elif text:
        typer.echo(text, nl=not text.endswith("\n"))


def _kernel(via: KernelName | None) -> kernel.Kernel:
    return kernel.make(via.value if via else None)


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of unexpected errors.")] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Log debug detail too.")] = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Log warnings and errors only.")] = False,
    log_format: Annotated[
        LogFormat,
        typer.Option(
            "--log-format", help="Log lines on stderr: text (journald-friendly) or json (one object per line)."
        ),
    ] = LogFormat.text,
) -> None:
    """A Layer-4 load balancer made of the kernel's own nftables.

    Write pools.yaml (virtual IP:port -> backends), then `nftlb apply pools.yaml`.

    \b
    Examples:
      nftlb apply --dry-run /etc/nftlb/pools.yaml
      nftlb status
      nftlb --install-completion        # shell completion for bash, zsh or fish
    """
    logs.setup(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO, log_format.value)


@app.command()
def validate(file: FileArg, as_json: JsonOpt = False) -> None:
    """Check a pools file; list every problem as FILE:LINE: field: message.

    \b
    Example:
      nftlb validate /etc/nftlb/pools.yaml
    """
    s = desired.summary(plan.build(pools_file.load(file)))
    _out(as_json, {"ok": True, "file": str(file), **s}, views.validate(file, s))


@app.command("render")
def render_(file: FileArg, as_json: JsonOpt = False) -> None:
    """Print the complete nft script for a pools file (loadable with `nft -f`).

    \b
    Example:
      nftlb render pools.yaml > lb.nft && nft -c -f lb.nft
    """
    want = desired.of_file(file)
    _out(as_json, {"table": want.plan.table, "ruleset": want.script}, want.script)


@app.command()
def diff(file: FileArg, via: ViaOpt = None, state_dir: StateDirOpt = STATE_DIR, as_json: JsonOpt = False) -> None:
    """Show what applying FILE would change; exit 0 when in sync, 1 when not.

    \b
    Example:
      nftlb diff pools.yaml || echo "live table differs"
    """
    desired.check(file)  # a bad file is exit 2 even where the kernel cannot be reached
    want, d = ops.compare(file, _kernel(via), state_dir)
    _out(as_json, {"table": want.plan.table, **d.as_dict()}, views.diff(file, want.plan.table, d))
    if not d.in_sync:
        raise typer.Exit(ExitStatus.CHECK_FAILED)


@app.command()
def apply(
    file: FileArg,
    dry_run: DryRunOpt = False,
    via: ViaOpt = None,
    state_dir: StateDirOpt = STATE_DIR,
    as_json: JsonOpt = False,
) -> None:
    """Bring our nftables table to what FILE asks for, in one kernel transaction.

    \b
    Examples:
      nftlb apply --dry-run pools.yaml
      nftlb apply pools.yaml
    """
    desired.check(file)  # a bad file is exit 2 even where the kernel cannot be reached
    r = ops.apply(file, _kernel(via), state_dir, dry_run=dry_run)
    _out(as_json, r.as_dict(), views.apply(file, r))


@app.command()
def remove(
    table: Annotated[
        str | None, typer.Option("--table", help="Table to delete [default: the one nftlb last applied].")
    ] = None,
    via: ViaOpt = None,
    state_dir: StateDirOpt = STATE_DIR,
    as_json: JsonOpt = False,
) -> None:
    """Delete nftlb's table (and only it); established connections keep their NAT.

    \b
    Example:
      nftlb remove
    """
    removed = ops.remove(_kernel(via), state_dir, table)
    _out(as_json, {"removed": removed}, views.remove(removed))


@app.command("watch")
def watch_(
    file: FileArg,
    once: Annotated[bool, typer.Option("--once", help="One probe round, for cron or a systemd timer.")] = False,
    via: ViaOpt = None,
    state_dir: StateDirOpt = STATE_DIR,
    concurrency: Annotated[
        int, typer.Option("--concurrency", min=1, max=10000, help="Probes in flight at once.")
    ] = 256,
    metrics_at: Annotated[
        str | None,
        typer.Option(
            "--metrics", metavar="HOST:PORT", help="Serve Prometheus metrics there (PORT alone: on 127.0.0.1)."
        ),
    ] = None,
) -> None:
    """Probe every backend over TCP; take dead ones out and bring them back, one small
    transaction per change. Applies FILE first; SIGHUP re-applies it; SIGTERM stops.

    \b
    Examples:
      nftlb watch /etc/nftlb/pools.yaml
      nftlb watch /etc/nftlb/pools.yaml --once     # from cron
      nftlb watch /etc/nftlb/pools.yaml --metrics 127.0.0.1:9650
    """
    desired.check(file)  # a bad file is exit 2 even where the kernel cannot be reached
    code = watch.command(file, _kernel(via), state_dir, once=once, concurrency=concurrency, metrics_at=metrics_at)
    raise typer.Exit(code)


def _override(pool: str, backend: str, drained: bool, via: KernelName | None, state_dir: Path, as_json: bool) -> None:
    doc = ops.override(_kernel(via), state_dir, pool, backend, drained)
    _out(as_json, doc, views.override(doc))


@app.command()
def drain(
    pool: PoolArg, backend: BackendArg, via: ViaOpt = None, state_dir: StateDirOpt = STATE_DIR, as_json: JsonOpt = False
) -> None:
    """Stop sending new connections to a backend, whatever its health; established ones
    continue. Survives watcher restarts and re-applies until `nftlb enable`.

    \b
    Example:
      nftlb drain web 10.0.0.11:8080
    """
    _override(pool, backend, True, via, state_dir, as_json)


@app.command()
def enable(
    pool: PoolArg, backend: BackendArg, via: ViaOpt = None, state_dir: StateDirOpt = STATE_DIR, as_json: JsonOpt = False
) -> None:
    """Undo `nftlb drain`: the backend takes new connections again when the file and its
    health allow.

    \b
    Example:
      nftlb enable web 10.0.0.11:8080
    """
    _override(pool, backend, False, via, state_dir, as_json)


@app.command()
def systemd(
    file: FileArg,
    install: Annotated[bool, typer.Option("--install", help="Write the units into --unit-dir.")] = False,
    unit_dir: Annotated[Path, typer.Option("--unit-dir", help="Where --install writes.")] = Path("/etc/systemd/system"),
    every: Annotated[str, typer.Option("--every", help="Timer period for the --once alternative.")] = "10s",
    state_dir: StateDirOpt = STATE_DIR,
) -> None:
    """Print (or --install) a service unit for `nftlb watch` and a timer alternative for --once.

    \b
    Example:
      nftlb systemd /etc/nftlb/pools.yaml --install
      systemctl daemon-reload && systemctl enable --now nftlb-watch.service
    """
    rendered = units.for_file(file, state_dir, every)
    _out(False, {}, views.installed(units.install(rendered, unit_dir)) if install else views.units(rendered))


@app.command("explain")
def explain_(
    file: FileArg,
    pool: PoolArg,
    client: Annotated[
        str | None, typer.Option("--client", help="ADDR or ADDR:PORT ([V6]:PORT): where does it go?")
    ] = None,
    state_dir: StateDirOpt = STATE_DIR,
    as_json: JsonOpt = False,
) -> None:
    """Show how a pool picks backends: its table, each backend's share, and where a client goes
    (computed with the kernel's jhash, so it is what the kernel will do).

    \b
    Example:
      nftlb explain pools.yaml web --client 203.0.113.7:51000
    """
    e = explain.pool(file, pool, state_dir if state_dir.exists() else None, explain.client(client))
    _out(as_json, e, views.explain(e))


@app.command("status")
def status_(via: ViaOpt = None, state_dir: StateDirOpt = STATE_DIR, as_json: JsonOpt = False) -> None:
    """Per pool and backend: configured state, health, new connections and bytes (kernel
    counters, since the table was loaded), and connections open now (conntrack).

    \b
    Examples:
      nftlb status
      nftlb status --json | jq '.pools[].backends[] | select(.health.up == false)'
    """
    from nftlb import status

    doc = status.collect(_kernel(via), state_dir)
    _out(as_json, doc, views.status(doc))


@app.command("metrics")
def metrics_(
    textfile: Annotated[
        Path,
        typer.Option("--textfile", help="Write Prometheus text here (node_exporter's textfile collector), atomically."),
    ],
    via: ViaOpt = None,
    state_dir: StateDirOpt = STATE_DIR,
) -> None:
    """Write the metrics once, for cron setups (`nftlb watch --metrics` serves them live).

    \b
    Example:
      nftlb metrics --textfile /var/lib/node_exporter/textfile/nftlb.prom
    """
    from nftlb import metrics  # prometheus-client only when asked

    metrics.write_textfile(_kernel(via), state_dir, textfile)
    _out(False, {}, f"wrote {textfile}\n")


@app.command()
def history(state_dir: StateDirOpt = STATE_DIR, as_json: JsonOpt = False) -> None:
    """List the kept generations (the last 10 applied files), newest first; * marks the live one.

    \b
    Example:
      nftlb history
    """
    entries = ops.history(state_dir)
    _out(as_json, {"generations": entries}, views.history(entries, state_dir))


@app.command()
def rollback(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the diff; change nothing.")] = False,
    via: ViaOpt = None,
    state_dir: StateDirOpt = STATE_DIR,
    as_json: JsonOpt = False,
) -> None:
    """Put back the generation applied before the live one, in one transaction; run it again to
    go one further back. Health and drains stay as they are now.

    \b
    Examples:
      nftlb rollback --dry-run
      nftlb rollback
    """
    target, r = ops.rollback(_kernel(via), state_dir, dry_run=dry_run)
    _out(as_json, {"generation": target, **r.as_dict()}, views.rollback(target, r))


@app.command("doctor")
def doctor_(
    file: Annotated[
        Path | None, typer.Argument(help="The pools file to check against (optional).", metavar="[FILE]")
    ] = None,
    via: ViaOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Pre-flight checks, one verdict per line: kernel features, nft, forwarding, rp_filter,
    conntrack capacity, where each VIP lives, and listeners DNAT would shadow. Exit 1 when
    something blocks traffic.

    \b
    Examples:
      nftlb doctor
      nftlb doctor /etc/nftlb/pools.yaml
    """
    from nftlb import doctor  # psutil only when asked

    checks, code = doctor.examine(file, via.value if via else None)
    _out(as_json, {"ok": code == ExitStatus.OK, "checks": [c.as_dict() for c in checks]}, views.doctor(checks))
    raise typer.Exit(code)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        app(args=args, prog_name="nftlb")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except NftlbError as e:
        views.report(e, as_json="--json" in args)
        return int(e.exit_code)
    except KeyboardInterrupt:
        return ExitStatus.INTERRUPTED
    except Exception as e:  # a bug: say so plainly, keep the traceback for --debug
        if "--debug" in args or os.environ.get("NFTLB_DEBUG"):
            raise
        print(f"nftlb: internal error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        return ExitStatus.SYSTEM
    return ExitStatus.OK
