"""CLI of a multi-host deployment: ``agent``, ``hosts list|enroll``, ``jobs list|show``, ``testbed hosts up|down``.

Every command reads the catalog named by FREEZEFRAME_CATALOG_URL (the PostgreSQL database of the deployment;
``testbed hosts up --json`` prints it under ``env``). Heavy modules are imported when a command runs.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Annotated, Any

import typer

from freezeframe.cli_common import ConnectOpt, HomeOpt, JsonOpt, open_service, print_json, settings_for
from freezeframe.cli_output import Col, print_fields, print_table, say
from freezeframe.errors import PreflightFailed
from freezeframe.validation import validate_name

if TYPE_CHECKING:
    from freezeframe.adapters.host_registry import HostRecord
    from freezeframe.adapters.service_store import Job
    from freezeframe.service import Freezeframe

CONTEXT = {"help_option_names": ["-h", "--help"]}


def agent(
    name: Annotated[str, typer.Option("--name", metavar="HOST", help="this host's enrolled name")],
    concurrency: Annotated[int, typer.Option("--concurrency", metavar="N", min=1, max=32, help="jobs at once")] = 2,
    log_level: Annotated[str, typer.Option("--log-level", metavar="LEVEL", help="debug | info | warning")] = "info",
    connect: ConnectOpt = None,
    home: HomeOpt = None,
) -> None:
    """Run this hypervisor host's agent: repair, heartbeat, and the jobs routed to this host, until SIGTERM.

    Needs FREEZEFRAME_CATALOG_URL (PostgreSQL) and FREEZEFRAME_AGENT_KEY (from `freezeframe hosts enroll HOST`).
    """
    from freezeframe.agent.process import KEY_ENV, AgentConfig, run_agent

    validate_name(name, "--name")
    level = getattr(logging, log_level.upper(), None)
    if log_level not in ("debug", "info", "warning") or not isinstance(level, int):
        raise PreflightFailed(f"--log-level {log_level!r}: use debug, info or warning")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = AgentConfig(name, settings_for(home, connect), os.environ.get(KEY_ENV), concurrency)
    run_agent(config)


# ---- hosts --------------------------------------------------------------------------------------------------

hosts_app = typer.Typer(help="The hypervisor hosts of a multi-host deployment.", no_args_is_help=True,
                        context_settings=CONTEXT, rich_markup_mode=None)  # fmt: skip


def host_dict(h: HostRecord) -> dict[str, Any]:
    return {
        "name": h.name, "uri": h.uri, "state": h.state,
        "last_heartbeat": h.last_heartbeat.isoformat() if h.last_heartbeat else None,
        "instance_count": h.instance_count, "free_repository_bytes": h.free_bytes,
    }  # fmt: skip


HOST_COLUMNS = (Col("name"), Col("uri", wraps=True), Col("state"), Col("last heartbeat"), Col("instances"),
                Col("free repository", drop=1))  # fmt: skip


@hosts_app.command("list")
def hosts_list(as_json: JsonOpt = False, home: HomeOpt = None) -> None:
    """Every enrolled host: name, URI, state (up/down/stopped/enrolled), last heartbeat, instances, free space.

    Into a pipe: one tab-separated line per host, no header, in the column order.
    """
    from freezeframe.adapters.host_registry import HostRegistry

    with open_service(home, None) as service:
        hosts = HostRegistry(service.catalog).hosts()
    if as_json:
        print_json([host_dict(h) for h in hosts])
        return
    rows = [
        [h.name, h.uri or "-", h.state, f"{h.last_heartbeat:%Y-%m-%d %H:%M:%S}" if h.last_heartbeat else "-",
         str(h.instance_count), _gib(h.free_bytes)]
        for h in hosts
    ]  # fmt: skip
    print_table(HOST_COLUMNS, rows, rows)


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / (1 << 30):.1f} GiB"


@hosts_app.command("enroll")
def hosts_enroll(
    name: Annotated[str, typer.Argument(metavar="HOST", help="the host's name")],
    as_json: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Issue the agent key of HOST (again: the old key stops working); shown only now."""
    from freezeframe.adapters.host_registry import HostRegistry

    validate_name(name, "host name")
    with open_service(home, None) as service:
        key = HostRegistry(service.catalog).enroll(name)
    if as_json:
        print_json({"name": name, "key": key})
        return
    say(f"host {name} enrolled; give its agent FREEZEFRAME_AGENT_KEY (shown only now):")
    typer.echo(key)


# ---- jobs ---------------------------------------------------------------------------------------------------

jobs_app = typer.Typer(help="Jobs of the service and of the agents: state, progress, errors.", no_args_is_help=True,
                       context_settings=CONTEXT, rich_markup_mode=None)  # fmt: skip
JOB_COLUMNS = (Col("id"), Col("kind"), Col("state"), Col("instance", wraps=True), Col("host"), Col("phase", drop=2),
               Col("progress", drop=1), Col("error", wraps=True))  # fmt: skip


def job_dict(job: Job, host: str | None) -> dict[str, Any]:
    from freezeframe.api.views import job_view

    return {**job_view(job).model_dump(mode="json"), "host": host}


@jobs_app.command("list")
def jobs_list(
    state: Annotated[str | None, typer.Option("--state", help="queued | running | succeeded | failed")] = None,
    as_json: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Jobs, newest first. Into a pipe: one tab-separated line per job, no header, in the column order."""
    from freezeframe.adapters.host_registry import HostRegistry
    from freezeframe.adapters.service_store import JOB_STATES, JobStore

    if state is not None and state not in JOB_STATES:
        raise PreflightFailed(f"--state {state!r}: use {', '.join(JOB_STATES)}")
    with open_service(home, None) as service:
        jobs = JobStore(service.catalog).query(state=state)
        registry = HostRegistry(service.catalog)
        hosts = {j.id: registry.job_host(j.id) for j in jobs}
    if as_json:
        print_json([job_dict(j, hosts[j.id]) for j in jobs])
        return
    rows = [
        [j.id, j.kind, j.state, j.instance_name or "-", hosts[j.id] or "(service)", j.phase or "-",
         f"{j.progress_done}/{j.progress_total}" if j.progress_total else "-", j.error or "-"]
        for j in jobs
    ]  # fmt: skip
    print_table(JOB_COLUMNS, rows, rows)


@jobs_app.command("show")
def jobs_show(
    job_id: Annotated[str, typer.Argument(metavar="JOB_ID")], as_json: JsonOpt = False, home: HomeOpt = None
) -> None:
    """One job: state, host, phase, progress, result or error."""
    from freezeframe.adapters.host_registry import HostRegistry
    from freezeframe.adapters.service_store import JobStore

    with open_service(home, None) as service:
        job = JobStore(service.catalog).get(job_id)
        host = HostRegistry(service.catalog).job_host(job.id)
    view = job_dict(job, host)
    if as_json:
        print_json(view)
        return
    print_fields(
        [(k, str(view[k])) for k in ("id", "kind", "state", "host", "set_id", "created_at", "started_at",
                                     "finished_at")]
        + [("progress", str(view["progress"])), ("result", str(view["result"])), ("error", str(view["error"]))]
    )  # fmt: skip


# ---- restore onto another host ---------------------------------------------------------------------------------


def restore_on_host(set_ref: str, name: str, host: str, *, start: bool, full: bool, as_json: bool) -> None:
    """``restore SET --as NAME --host H``: a job on H's agent (members transferred there, verified), followed with
    a progress bar until it finishes."""
    from freezeframe.adapters.host_registry import HostRegistry
    from freezeframe.api.cluster import ClusterJobs

    validate_name(name, "--as")
    validate_name(host, "--host")
    with open_service(None, None) as service:
        snapshot_set = service.catalog.get_set(set_ref)
        jobs = ClusterJobs(service.catalog, service.settings.catalog_url, HostRegistry(service.catalog))
        request = {"name": name, "start": start, "full": full, "host": host}
        job = jobs.submit_restore(snapshot_set, request, project=None, token_id=None)
        job = follow_job(service, job, f"restoring on {host}", f"restore on {host}", as_json)
    if as_json:
        print_json(job_dict(job, host))
        return
    result = job.result or {}
    moved = f", members transferred from {result['transferred_from']}" if result.get("transferred_from") else ""
    say(f"instance {name} restored on host {host} from set {snapshot_set.name}{moved}")


def follow_job(service: Freezeframe, job: Job, label: str, what: str, as_json: bool) -> Job:
    """Wait for a job queued on an agent, with a progress bar; returns it once it succeeded, else prints why
    (``--json``: the job too) and exits with its error's code."""
    import time

    from freezeframe.adapters.host_registry import HostRegistry
    from freezeframe.adapters.service_store import SUCCEEDED, JobStore
    from freezeframe.cli_output import progress_bar
    from freezeframe.errors import by_slug

    store = JobStore(service.catalog)
    with progress_bar(not as_json, label) as progress:
        while not job.finished:
            time.sleep(0.2)
            job = store.get(job.id)
            if progress is not None and job.progress_total:
                progress(job.progress_done, job.progress_total)
    if job.state == SUCCEEDED:
        return job
    if as_json:
        print_json(job_dict(job, HostRegistry(service.catalog).job_host(job.id)))
    category = by_slug(job.error_type or "")
    say(f"{what} failed: {job.error}", stderr=True)
    raise typer.Exit(category.exit_code if category else 1)


def register(app: typer.Typer) -> None:
    app.command("agent")(agent)
    app.add_typer(hosts_app, name="hosts")
    app.add_typer(jobs_app, name="jobs")
