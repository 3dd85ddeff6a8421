"""The `trial` command: run the system, print a development token, migrate, verify a store."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import typer

from shared.auth import issue_dev_token
from shared.settings import SERVICES, Settings

EMBEDDED_SESSION_TIMEOUT_MS = 2000
app = typer.Typer(help="NCT03424629 trial backend", no_args_is_help=True)


def _write(out: Path, document: dict[str, Any]) -> None:
    """A published document, as the unit tests compare it with the generated one."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    typer.echo(f"wrote {out}")


@app.command()
def asyncapi(out: Path = typer.Option(Path("docs/asyncapi.json"), help="where to write")) -> None:
    """Write the AsyncAPI 3 document of every topic (what pharmacy systems code against)."""
    from services.gateway.asyncapi import asyncapi_document

    _write(out, asyncapi_document())


@app.command()
def token(role: str = typer.Option(..., help="site_coordinator, investigator, pharmacist, "
                                               "monitor, dsmb or admin"),
          site: str | None = typer.Option(None, help="required for the three site roles"),
          sub: str | None = typer.Option(None, help="the person or system"),
          ttl: int = typer.Option(8 * 3600, help="seconds until it expires")) -> None:
    """Print a development token signed with TRIAL_JWT_SECRET (HS256)."""
    try:
        typer.echo(issue_dev_token(Settings().jwt_secret, role, site, sub, ttl))
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


@app.command()
def run(kafka_port: int = typer.Option(9092, envvar="TRIAL_RUN_KAFKA_PORT",
                                     help="port of the embedded broker"),
        clock_file: Path | None = typer.Option(
            None, help="demonstrations (`trial demo`): dosing and efficacy read \"now\" from this "
                       "file (TRIAL_CLOCK_FILE; the wall clock written there if it is missing) "
                       "and sweep for missed visits every second, unless "
                       "TRIAL_DOSING/EFFICACY_SWEEP_INTERVAL_S say otherwise")) -> None:
    """Start the embedded broker, the gateway and every service; stop them on Ctrl-C."""
    from deploy import infra
    from tooling.launcher import System

    settings = Settings()
    # A new broker of this run's own, which dies with it (however it dies): never one an
    # earlier run left holding its events (issue 15).
    bootstrap = infra.start_tansu(kafka_port, owned=True)
    data_dir = settings.data_dir
    urls = {s: f"sqlite+aiosqlite:///{data_dir / f'{s}.db'}" for s in SERVICES}
    # The embedded broker gives a joining consumer its partitions after half its session: a
    # short session has every consumer reading within a second of start (unless set otherwise).
    embedded = {"TRIAL_KAFKA_SESSION_TIMEOUT_MS": os.environ.get(
        "TRIAL_KAFKA_SESSION_TIMEOUT_MS", str(EMBEDDED_SESSION_TIMEOUT_MS))}
    if clock_file is not None:
        from shared.clock import FileClock, SystemClock

        clock_file = clock_file.resolve()
        if not clock_file.exists():  # before any service reads it
            clock_file.parent.mkdir(parents=True, exist_ok=True)
            FileClock(clock_file).set(SystemClock().now())
        embedded["TRIAL_CLOCK_FILE"] = str(clock_file)
        for sweep in ("TRIAL_DOSING_SWEEP_INTERVAL_S", "TRIAL_EFFICACY_SWEEP_INTERVAL_S"):
            embedded[sweep] = os.environ.get(sweep, "1")
    system = System(bootstrap=bootstrap, database_urls=urls, ports=settings.service_ports(),
                    log_dir=data_dir.parent / "logs", env=embedded)
    system.migrate()
    system.start()
    try:
        system.wait_ready()
        typer.echo(f"Gateway:          {system.url()}  (docs: {system.url()}/docs)")
        for service in SERVICES:  # each one answered its /readyz (database and broker)
            typer.echo(f"  {service + ':':<16}{system.url(service)}  ready")
        if clock_file is not None:
            typer.echo(f"Clock file:       {clock_file}  (dosing and efficacy read now here)")
        typer.echo(f"Kafka bootstrap:  {bootstrap}")
        typer.echo(f"Logs:             {system.log_dir}/   Ctrl-C stops everything.")
        # sigtimedwait needs the signals blocked, or Python's own SIGINT handler (and SIGTERM's
        # default) would act instead; the children were started before, so they keep theirs.
        # Meanwhile a service that dies is started again, with backoff, and said so.
        stop_signals = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
        system.supervise(lambda wait: signal.sigtimedwait(stop_signals, wait) is not None,
                         say=lambda line: typer.echo(line),
                         broker=(lambda: infra.tansu_running(kafka_port),
                                 lambda: infra.start_tansu(kafka_port, owned=True)))
    finally:
        system.stop()
        infra.stop_tansu(kafka_port)


@app.command()
def schemas(out: Path = typer.Option(Path("docs/events.schema.json"), help="where to write")) -> None:
    """Write the event catalogue (CloudEvents envelope + every event's data) as JSON Schema."""
    from shared.events import catalogue_document

    _write(out, catalogue_document())


@app.command("report-dsmb")
def report_dsmb(database_url: str = typer.Argument(..., help="the audit ledger's database URL"),
                out: Path = typer.Option(Path("dsmb-report.html"), help="where to write"),
                open_report: bool = typer.Option(
                    False, "--open", help="the monitors' open report (no interim data by arm)")
                ) -> None:
    """Write the DSMB report (the page GET /v1/reports/dsmb serves) from an audit ledger."""
    from services.audit import dsmb_report, query
    from shared.protocol import load_protocol
    from shared.store import EventStore, utcnow

    async def made() -> tuple[str, int]:
        store = EventStore(database_url)
        try:
            history = await query.history(store)
        finally:
            await store.close()
        page = dsmb_report.render(history, load_protocol(Settings().protocol_dir), utcnow(),
                                  interim=not open_report)
        return page, history.position

    page, position = asyncio.run(made())
    out.write_text(page)
    typer.echo(f"wrote {out} (ledger position {position})")


@app.command("export-sdtm")
def export_sdtm(database_url: str = typer.Argument(..., help="the audit ledger's database URL"),
                domain: str = typer.Argument(..., help="DM, EX, AE, DS, QS or SV"),
                fmt: str = typer.Option("csv", "--format", help="csv or xpt"),
                out: Path | None = typer.Option(None, help="default: <domain>.<format>")) -> None:
    """Write one CDISC SDTM domain from an audit ledger (and metadata.json beside it)."""
    from services.audit import query, sdtm
    from shared.protocol import load_protocol
    from shared.store import EventStore

    domain = domain.upper()
    if domain not in sdtm.DOMAINS or fmt not in ("csv", "xpt"):
        typer.echo(f"error: domain one of {', '.join(sdtm.DOMAINS)}, format csv or xpt", err=True)
        raise typer.Exit(2)

    async def read() -> query.History:
        store = EventStore(database_url)
        try:
            return await query.history(store)
        finally:
            await store.close()

    data = sdtm.dataset(asyncio.run(read()), domain, load_protocol(Settings().protocol_dir).trial_id)
    target = out or Path(f"{domain.lower()}.{fmt}")
    if fmt == "csv":
        target.write_text(sdtm.to_csv(data))
    else:
        sdtm.to_xpt(data, target)
    _write(target.with_name("metadata.json"), sdtm.metadata())
    typer.echo(f"wrote {target} ({len(data.rows)} rows) and {target.with_name('metadata.json')}")


@app.command()
def migrate(database_url: str = typer.Argument(..., help="SQLAlchemy async URL, as the owner"),
            service_role: str | None = typer.Option(
                None, envvar="TRIAL_DATABASE_SERVICE_ROLE",
                help="PostgreSQL: then grant this role what the service needs at run time "
                     "(select and insert events, never update, delete or alter)")) -> None:
    """Bring a service database to the newest schema (as the role that owns it)."""
    from shared.migrate import grant_service_role, upgrade

    asyncio.run(upgrade(database_url))
    if service_role:
        asyncio.run(grant_service_role(database_url, service_role))
        typer.echo(f"granted {service_role} the service's rights")


@app.command()
def verify(database_url: str = typer.Argument(..., help="SQLAlchemy async URL"),
           anchors: str | None = typer.Option(
               None, help="Kafka bootstrap: also check an audit ledger against the anchors "
                          "published for it on trial.audit.anchors"),
           ledger_id: str | None = typer.Option(
               None, envvar="TRIAL_AUDIT_LEDGER_ID",
               help="with --anchors: the ledger's pinned name (its hash at position 1); the "
                    "anchors are read for it and a ledger not carrying it fails")) -> None:
    """Walk a store's hash chain; exit 1 and name the first broken position if it is broken.

    With --anchors, exit 1 too if any anchored position no longer holds its hash: the sign of a
    rewrite whose author recomputed the chain after it; or if the ledger no longer carries its
    pinned name (`--ledger-id`): the sign of one from position 1.
    """
    from services.audit.anchors import check_anchors, ledger_name, read_anchors
    from shared.settings import Settings
    from shared.store import EventStore

    async def _verify() -> int:
        store = EventStore(database_url)
        try:
            result = await store.verify()
            line = (f"ok={result.ok} events_checked={result.events_checked} "
                    f"first_broken_position={result.first_broken_position}")
            ok = result.ok
            if anchors is not None:
                name, renamed = ledger_name(result.first_hash, ledger_id)
                found = await check_anchors(store, [] if name is None else await read_anchors(
                    Settings(kafka_bootstrap_servers=anchors), name))
                line += (f" anchors_checked={found.checked} "
                         f"first_anchor_mismatch={found.first_mismatch}"
                         f" pinned_ledger_mismatch={renamed}")
                ok = ok and found.first_mismatch is None and not renamed
        finally:
            await store.close()
        typer.echo(line)
        return 0 if ok else 1

    sys.exit(asyncio.run(_verify()))


@app.command("resolve-safety-record")
def resolve_safety_record(
        database_url: str = typer.Argument(..., help="the service's database URL"),
        record_id: str = typer.Argument(None, help="topic:partition:offset; omit to list them"),
        service: str = typer.Option("dosing", help="dosing or randomization: whose store"),
        by: str = typer.Option(None, help="who resolves it (your name or user id)"),
        reason: str = typer.Option(None, help="how it was resolved")) -> None:
    """List the trial.safety records a service could not apply (each refuses what it may
    concern: doses, or randomizations), or resolve one once it has been applied by hand or found
    not to concern the service."""
    import importlib

    from shared.errors import Refused
    from shared.store import EventStore

    if service not in ("dosing", "randomization"):
        typer.echo("error: --service is dosing or randomization", err=True)
        sys.exit(2)
    commands = importlib.import_module(f"services.{service}.commands")

    async def _run() -> int:
        store = EventStore(database_url)
        try:
            if record_id is None:
                for u in await commands.unapplied_safety_records(store):
                    typer.echo(f"{u.record_id}\t{u.scope}\t{u.target}\t{u.type}\t{u.error}")
                return 0
            if not by or not reason:
                typer.echo("error: --by and --reason are required to resolve", err=True)
                return 2
            try:
                resolved = await commands.resolve_safety_record(store, record_id, by, reason)
            except Refused as exc:
                typer.echo(f"error: {exc}", err=True)
                return 1
            typer.echo(f"resolved {resolved.record_id} ({resolved.scope} {resolved.target})")
            return 0
        finally:
            await store.close()

    sys.exit(asyncio.run(_run()))


from services.randomization.cli import allocation_list  # noqa: E402 (a service's own command)

app.command("allocation-list")(allocation_list)

from tooling import operations  # noqa: E402 (the operators' commands, issue 14)

app.add_typer(operations.dlq_app, name="dlq")
app.command("backup")(operations.backup)
app.command("restore")(operations.restore)
app.command("rebuild-projection")(operations.rebuild_projection)

from tooling.demo import demo  # noqa: E402 (a whole trial on an accelerated clock, issue 14)

app.command("demo")(demo)

if __name__ == "__main__":
    app()
