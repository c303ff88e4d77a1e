"""The command line: parse options, call one library function, print.

`main()` is the one place that turns exceptions into exit codes:
0 ok, 1 differences (diff), 2 bad input or usage, 3 kernel or system error.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from nftlb import __version__, desired, explain, kernel, ops, pools_file, schema, state, units
from nftlb import plan as planlib
from nftlb import watch as watcher
from nftlb.errors import EXIT_DIFFERENT, EXIT_SYSTEM, ConfigError, NftlbError, UsageError

app = typer.Typer(
    name="nftlb",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class _Opts:
    debug = False
    json = False


class LogFormat(StrEnum):
    text = "text"
    json = "json"


class BackendName(StrEnum):
    libnftables = "libnftables"
    nft = "nft"


FileArg = Annotated[Path, typer.Argument(help="The pools file (YAML).", metavar="FILE")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]
BackendOpt = Annotated[
    BackendName | None,
    typer.Option("--backend", help="How to reach the kernel [default: libnftables if importable, else nft]."),
]
StateDirOpt = Annotated[
    Path,
    typer.Option("--state-dir", envvar="NFTLB_STATE_DIR", help="Where nftlb keeps what it applied."),
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"nftlb {__version__}")
        raise typer.Exit()


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
    _Opts.debug = debug
    _logging(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO, log_format.value)


def _out(as_json: bool, doc: dict, text: str) -> None:
    _Opts.json = as_json
    if as_json:  # indented for a person at a terminal; compact (and much faster when large) for scripts
        indent = 2 if sys.stdout.isatty() else None
        typer.echo(json.dumps(doc, indent=indent, sort_keys=True, separators=None if indent else (",", ":")))
    elif text:
        typer.echo(text, nl=not text.endswith("\n"))


def _names(names: list[str], most: int = 8) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _drift(d) -> str:
    if not d.drift:
        return ""
    return f"drift: {d.drift}\n" if "\n" not in d.drift else f"drift (changed outside nftlb):\n{d.drift}"


def _kernel(name: BackendName | None) -> kernel.Kernel:
    return kernel.make(name.value if name else None)


@app.command()
def validate(file: FileArg, as_json: JsonOpt = False) -> None:
    """Check a pools file; list every problem as FILE:LINE: field: message.

    \b
    Example:
      nftlb validate /etc/nftlb/pools.yaml
    """
    _Opts.json = as_json
    config = pools_file.load(file)
    s = desired.summary(planlib.build(config))
    _out(
        as_json,
        {"ok": True, "file": str(file), **s},
        f"{file}: ok ({s['pools']} pools, {s['backends']} backends, table inet {s['table']})",
    )


@app.command("render")
def render_(file: FileArg, as_json: JsonOpt = False) -> None:
    """Print the complete nft script for a pools file (loadable with `nft -f`).

    \b
    Example:
      nftlb render pools.yaml > lb.nft && nft -c -f lb.nft
    """
    _Opts.json = as_json
    want = desired.of_file(file)
    _out(as_json, {"table": want.plan.table, "ruleset": want.script}, want.script)


@app.command()
def diff(
    file: FileArg,
    backend: BackendOpt = None,
    state_dir: StateDirOpt = Path(state.DEFAULT_DIR),
    as_json: JsonOpt = False,
) -> None:
    """Show what applying FILE would change; exit 0 when in sync, 1 when not.

    \b
    Example:
      nftlb diff pools.yaml || echo "live table differs"
    """
    _Opts.json = as_json
    desired.check(file)  # a bad file is exit 2 even where the kernel cannot be reached
    want, d = ops.compare(file, _kernel(backend), state_dir)
    text = _drift(d) + (
        d.changes or ("" if not d.in_sync else f"table inet {want.plan.table} is in sync with {file}\n")
    )
    _out(as_json, {"table": want.plan.table, **d.as_dict()}, text)
    if not d.in_sync:
        raise typer.Exit(EXIT_DIFFERENT)


@app.command()
def apply(
    file: FileArg,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show the diff and have the kernel check it; change nothing.")
    ] = False,
    backend: BackendOpt = None,
    state_dir: StateDirOpt = Path(state.DEFAULT_DIR),
    as_json: JsonOpt = False,
) -> None:
    """Bring our nftables table to what FILE asks for, in one kernel transaction.

    \b
    Examples:
      nftlb apply --dry-run pools.yaml
      nftlb apply pools.yaml
    """
    _Opts.json = as_json
    desired.check(file)  # a bad file is exit 2 even where the kernel cannot be reached
    r = ops.apply(file, _kernel(backend), state_dir, dry_run=dry_run)
    s = r.summary
    if r.action == "in-sync":
        text = f"table inet {s['table']} is in sync with {file}: nothing to do\n"
    elif r.action == "dry-run":
        text = (
            _drift(r.diff)
            + r.diff.changes
            + f"dry run: the kernel accepts this change to table inet {s['table']}; nothing was changed\n"
        )
    else:
        text = (
            f"applied table inet {s['table']}: {s['pools']} pools ({s['ipv4']} IPv4, {s['ipv6']} IPv6; "
            f"{s['tcp']} tcp, {s['udp']} udp), {s['backends']} backends ({s['draining']} draining) "
            f"in {r.seconds:.2f} s\n"
        )
    changes = [
        f"{k} {_names(v)}"
        for k, v in (("added", r.pools_added), ("removed", r.pools_removed), ("changed", r.pools_changed))
        if v
    ]
    if changes and r.action != "in-sync":
        text += "pools " + "; ".join(changes) + "\n"
    if s["refusing"]:
        text += f"refusing new connections (no active backend): {', '.join(s['refusing'])}\n"
    _out(as_json, r.as_dict(), text)


@app.command()
def remove(
    table: Annotated[
        str | None, typer.Option("--table", help="Table to delete [default: the one nftlb last applied].")
    ] = None,
    backend: BackendOpt = None,
    state_dir: StateDirOpt = Path(state.DEFAULT_DIR),
    as_json: JsonOpt = False,
) -> None:
    """Delete nftlb's table (and only it); established connections keep their NAT.

    \b
    Example:
      nftlb remove
    """
    _Opts.json = as_json
    removed = ops.remove(_kernel(backend), state_dir, table)
    _out(
        as_json,
        {"removed": removed},
        f"deleted table inet {removed}\n" if removed else "no nftlb table present: nothing to do\n",
    )


@app.command()
def watch(
    file: FileArg,
    once: Annotated[bool, typer.Option("--once", help="One probe round, for cron or a systemd timer.")] = False,
    backend: BackendOpt = None,
    state_dir: StateDirOpt = Path(state.DEFAULT_DIR),
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
    nft = _kernel(backend)
    if once:
        if not watcher.once(file, nft, state_dir, concurrency=concurrency):
            raise typer.Exit(EXIT_SYSTEM)
        return
    if metrics_at is not None:
        from nftlb import metrics

        metrics.listen_address(metrics_at)  # a bad address is a usage error before anything starts
    raise typer.Exit(watcher.serve(file, nft, state_dir, concurrency=concurrency, metrics_at=metrics_at))


PoolArg = Annotated[str, typer.Argument(help="Pool name.", metavar="POOL")]
BackendArg = Annotated[
    str, typer.Argument(help="Backend: ADDR:PORT, [V6]:PORT, or ADDR if unique in the pool.", metavar="BACKEND")
]


def _override(
    pool: str, backend_: str, drained: bool, backend: BackendName | None, state_dir: Path, as_json: bool
) -> None:
    _Opts.json = as_json
    name, r = ops.set_drain(_kernel(backend), state_dir, pool, backend_, drained)
    p = r.plan.pool(pool)
    verb = "drained" if drained else "enabled"
    _out(
        as_json,
        {
            "pool": pool,
            "backend": name,
            "drained": drained,
            "committed": bool(r.changed),
            "active": [b.display for b in p.active],
        },
        f"pool {pool} backend {name} {verb}; taking new connections: "
        f"{', '.join(b.display for b in p.active) or 'none (refusing)'}\n",
    )


@app.command()
def drain(
    pool: PoolArg,
    backend_: BackendArg,
    backend: BackendOpt = None,
    state_dir: StateDirOpt = Path(state.DEFAULT_DIR),
    as_json: JsonOpt = False,
) -> None:
    """Stop sending new connections to a backend, whatever its health; established ones
    continue. Survives watcher restarts and re-applies until `nftlb enable`.

    \b
    Example:
      nftlb drain web 10.0.0.11:8080
    """
    _override(pool, backend_, True, backend, state_dir, as_json)


@app.command()
def enable(
    pool: PoolArg,
    backend_: BackendArg,
    backend: BackendOpt = None,
    state_dir: StateDirOpt = Path(state.DEFAULT_DIR),
    as_json: JsonOpt = False,
) -> None:
    """Undo `nftlb drain`: the backend takes new connections again when the file and its
    health allow.

    \b
    Example:
      nftlb enable web 10.0.0.11:8080
    """
    _override(pool, backend_, False, backend, state_dir, as_json)


@app.command()
def systemd(
    file: FileArg,
    install: Annotated[bool, typer.Option("--install", help="Write the units into --unit-dir.")] = False,
    unit_dir: Annotated[Path, typer.Option("--unit-dir", help="Where --install writes.")] = Path("/etc/systemd/system"),
    every: Annotated[str, typer.Option("--every", help="Timer period for the --once alternative.")] = "10s",
    state_dir: StateDirOpt = Path(state.DEFAULT_DIR),
) -> None:
    """Print (or --install) a service unit for `nftlb watch` and a timer alternative for --once.

    \b
    Example:
      nftlb systemd /etc/nftlb/pools.yaml --install
      systemctl daemon-reload && systemctl enable --now nftlb-watch.service
    """
    pools_file.load(file)
    try:
        period = schema.duration(every)
    except ValueError as e:
        raise UsageError(f"--every: {e}") from None
    rendered = units.render_units(file, state_dir, every=f"{period:g}s")
    if not install:
        typer.echo("\n".join(f"### {name}\n{text}" for name, text in rendered.items()), nl=False)
        return
    for path in units.install(rendered, unit_dir):
        typer.echo(f"wrote {path}")
    typer.echo(
        "next: systemctl daemon-reload && systemctl enable --now nftlb-watch.service\n"
        "  (or, instead, the timer: systemctl enable --now nftlb-watch-once.timer)"
    )


@app.command("explain")
def explain_(
    file: FileArg,
    pool: PoolArg,
    client: Annotated[
        str | None, typer.Option("--client", help="ADDR or ADDR:PORT ([V6]:PORT): where does it go?")
    ] = None,
    state_dir: StateDirOpt = Path(state.DEFAULT_DIR),
    as_json: JsonOpt = False,
) -> None:
    """Show how a pool picks backends: its table, each backend's share, and where a client goes
    (computed with the kernel's jhash, so it is what the kernel will do).

    \b
    Example:
      nftlb explain pools.yaml web --client 203.0.113.7:51000
    """
    _Opts.json = as_json
    who = _client(client) if client else None
    e = explain.pool(file, pool, state_dir if state_dir.exists() else None, who)
    lines = [
        f"pool {e['pool']}: {e['service']}, {e['scheduler']}"
        + (f" (seed {e['seed']:#x})" if e["kind"] in ("hash", "srchash") else "")
        + (
            f", Maglev table of {e['table_size']} slots"
            if e["kind"] in ("hash", "srchash")
            else f", {e['table_size']} slots"
            if e["kind"] in ("rr", "random")
            else ", a plain DNAT"
            if e["kind"] == "direct"
            else ", refusing new connections"
        )
        + (f", persistence {e['persistence']}s" if e["persistence"] else "")
    ]
    width = max(len(r["backend"]) for r in e["backends"])
    lines.append(f"  {'backend':{width}}  weight  slots   share  state")
    lines += [
        f"  {r['backend']:{width}}  {r['weight']:6d}  {r['slots']:5d}  {r['share']:6.1%}  {r['state']}"
        for r in e["backends"]
    ]
    if "client" in e:
        c = e["client"]
        who_ = f"{c['address']}:{c['port']}" if c["port"] is not None else c["address"]
        lines.append(
            f"client {who_} -> "
            + (
                f"slot {c['slot']} -> {c['backend']}"
                if c["slot"] is not None and e["kind"] != "direct"
                else c["backend"] or c["why"]
            )
        )
    _out(as_json, e, "\n".join(lines) + "\n")


@app.command()
def status(
    backend: BackendOpt = None, state_dir: StateDirOpt = Path(state.DEFAULT_DIR), as_json: JsonOpt = False
) -> None:
    """Per pool and backend: configured state, health, new connections and bytes (kernel
    counters, since the table was loaded), and connections open now (conntrack).

    \b
    Examples:
      nftlb status
      nftlb status --json | jq '.pools[].backends[] | select(.health.up == false)'
    """
    from nftlb import status as statuslib

    _Opts.json = as_json
    doc = statuslib.collect(_kernel(backend), state_dir)
    _out(as_json, doc, statuslib.text(doc))


@app.command()
def metrics(
    textfile: Annotated[
        Path,
        typer.Option("--textfile", help="Write Prometheus text here (node_exporter's textfile collector), atomically."),
    ],
    backend: BackendOpt = None,
    state_dir: StateDirOpt = Path(state.DEFAULT_DIR),
) -> None:
    """Write the metrics once, for cron setups (`nftlb watch --metrics` serves them live).

    \b
    Example:
      nftlb metrics --textfile /var/lib/node_exporter/textfile/nftlb.prom
    """
    from nftlb import metrics as metricslib
    from nftlb import status as statuslib

    nft = _kernel(backend)
    statuslib.collect(nft, state_dir)  # fail loudly (exit 3) rather than write a file that says 0
    metricslib.textfile(metricslib.registry(lambda: nft, state_dir), textfile)
    typer.echo(f"wrote {textfile}")


@app.command()
def history(state_dir: StateDirOpt = Path(state.DEFAULT_DIR), as_json: JsonOpt = False) -> None:
    """List the kept generations (the last 10 applied files), newest first; * marks the live one.

    \b
    Example:
      nftlb history
    """
    _Opts.json = as_json
    entries = ops.history(state_dir)
    lines = [f"{'':1} {'#':>4}  {'applied (UTC)':19}  {'sha256':12}  {'file':24}  what changed"]
    for e in entries:
        when = datetime.fromtimestamp(e["applied_at"], UTC).strftime("%Y-%m-%d %H:%M:%S")
        lines.append(
            f"{'*' if e['live'] else '':1} {e['id']:>4}  {when:19}  {e['sha256'][:12]}  "
            f"{e['source'][-24:]:24}  {e['summary']}"
        )
    _out(
        as_json,
        {"generations": entries},
        "\n".join(lines) + "\n" if entries else f"no generations kept in {state_dir} yet\n",
    )


@app.command()
def rollback(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the diff; change nothing.")] = False,
    backend: BackendOpt = None,
    state_dir: StateDirOpt = Path(state.DEFAULT_DIR),
    as_json: JsonOpt = False,
) -> None:
    """Put back the generation applied before the live one, in one transaction; run it again to
    go one further back. Health and drains stay as they are now.

    \b
    Examples:
      nftlb rollback --dry-run
      nftlb rollback
    """
    _Opts.json = as_json
    target, r = ops.rollback(_kernel(backend), state_dir, dry_run=dry_run)
    when = datetime.fromtimestamp(target["applied_at"], UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    what = f"generation #{target['id']} ({target['source']}, applied {when}: {target['summary']})"
    if r.action == "dry-run":
        text = _drift(r.diff) + r.diff.changes + f"dry run: would roll back to {what}; nothing was changed\n"
    elif r.action == "in-sync":
        text = f"rolled back to {what}; the kernel already matched it\n"
    else:
        text = f"rolled back to {what} in {r.seconds:.2f} s\n"
    _out(as_json, {"generation": target, **r.as_dict()}, text)


@app.command()
def doctor(
    file: Annotated[
        Path | None, typer.Argument(help="The pools file to check against (optional).", metavar="[FILE]")
    ] = None,
    backend: BackendOpt = None,
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
    from nftlb import doctor as doctorlib

    _Opts.json = as_json
    config = pools_file.load(file) if file is not None else None
    try:
        nft = _kernel(backend)
    except NftlbError:
        nft = None
    checks = doctorlib.run(config, nft)
    code = doctorlib.exit_code(checks)
    _out(as_json, {"ok": code == 0, "checks": [c.as_dict() for c in checks]}, doctorlib.text(checks))
    if code:
        raise typer.Exit(code)


def _client(text: str) -> tuple[str, int | None]:
    try:
        parsed = schema._parse_short(text)
        schema._address(parsed["address"], "client")
    except ValueError as e:
        raise UsageError(f"--client {text!r}: {e}") from None
    return parsed["address"].strip("[]"), parsed.get("port")


def _logging(level: int = logging.INFO, fmt: str = "text") -> None:
    """One line per event on stderr. text: journald adds time and unit, the level leads when it
    matters; json: one object per line, for log shippers."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(levelname_)s%(message)s"))
        handler.addFilter(_level_prefix)
    logger = logging.getLogger("nftlb")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


def _level_prefix(record: logging.LogRecord) -> bool:
    record.levelname_ = "" if record.levelno <= logging.INFO else f"{record.levelname.lower()}: "
    return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "message": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def _report(e: NftlbError) -> None:
    problems = e.problems if isinstance(e, ConfigError) else []
    for line in (str(p) for p in problems) if problems else [f"nftlb: {e}"]:
        print(line, file=sys.stderr)
    if _Opts.json:
        doc = {"ok": False, "exit_code": e.exit_code, "error": str(e), "problems": [p.as_dict() for p in problems]}
        print(json.dumps(doc, indent=2, sort_keys=True))


def main(argv: list[str] | None = None) -> int:
    _Opts.debug = _Opts.json = False
    try:
        app(args=argv, prog_name="nftlb")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except NftlbError as e:
        _report(e)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a bug: say so plainly, keep the traceback for --debug
        if _Opts.debug or os.environ.get("NFTLB_DEBUG"):
            raise
        print(f"nftlb: internal error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_SYSTEM
    return 0
