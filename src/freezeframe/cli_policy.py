"""CLI of policies: ``policy create|list|show|run|pause|resume|delete``. ``freezeframe serve`` runs them on time."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from freezeframe.cli_common import ConnectOpt, HomeOpt, JsonOpt, open_service, print_json
from freezeframe.cli_output import Col, print_fields, print_table, say

if TYPE_CHECKING:
    from freezeframe.ports.policies import PolicyState

CONTEXT = {"help_option_names": ["-h", "--help"]}
policy_app = typer.Typer(help="Policies: snapshot, copy off-site and prune on a schedule (run by `serve`).",
                         no_args_is_help=True, context_settings=CONTEXT)  # fmt: skip
PolicyArg = Annotated[str, typer.Argument(metavar="NAME", help="policy name")]


def _keep(help_text: str, flag: str) -> object:
    return typer.Option(flag, metavar="N", min=0, help=help_text)


def policy_view(state: PolicyState) -> dict[str, object]:
    p = state.policy
    return {
        "name": p.name, "instance": p.instance, "group": p.group, "schedule": p.schedule, "every_s": p.every_s,
        "cron": p.cron, "consistency": p.consistency, "mode": p.mode, "keep": p.keep.to_dict(), "copy_to": p.copy_to,
        "remote_keep": p.remote_keep.to_dict(), "paused": state.paused, "created_at": state.created_at.isoformat(),
        "last_tick": state.last_tick.isoformat() if state.last_tick else None, "last_job_id": state.last_job_id,
        "last_outcome": state.last_outcome, "last_error": state.last_error,
    }  # fmt: skip


@policy_app.command("create")
def create(
    name: PolicyArg,
    instance: Annotated[str | None, typer.Option("--instance", metavar="INSTANCE", help="instance name")] = None,
    group: Annotated[str | None, typer.Option("--group", metavar="GROUP", help="consistency group")] = None,
    every: Annotated[str | None, typer.Option("--every", metavar="INTERVAL", help="e.g. 30m, 1h, 1d")] = None,
    cron: Annotated[str | None, typer.Option("--cron", metavar="EXPR", help="cron expression, UTC")] = None,
    consistency: Annotated[str, typer.Option("--consistency", help="crash, filesystem, application")] = "filesystem",
    mode: Annotated[str, typer.Option("--mode", help="auto, full, incremental")] = "auto",
    keep_last: Annotated[int, _keep("keep the N newest sets", "--keep-last")] = 0,
    keep_hourly: Annotated[int, _keep("newest set of each of N hours", "--keep-hourly")] = 0,
    keep_daily: Annotated[int, _keep("newest set of each of N days", "--keep-daily")] = 0,
    keep_weekly: Annotated[int, _keep("newest set of each of N ISO weeks", "--keep-weekly")] = 0,
    keep_monthly: Annotated[int, _keep("newest set of each of N months", "--keep-monthly")] = 0,
    keep_yearly: Annotated[int, _keep("newest set of each of N years", "--keep-yearly")] = 0,
    copy_to: Annotated[str | None, typer.Option("--copy-to", metavar="REMOTE", help="copy each set there")] = None,
    remote_keep_last: Annotated[int, _keep("on the remote: N newest", "--remote-keep-last")] = 0,
    remote_keep_hourly: Annotated[int, _keep("on the remote: hourly", "--remote-keep-hourly")] = 0,
    remote_keep_daily: Annotated[int, _keep("on the remote: daily", "--remote-keep-daily")] = 0,
    remote_keep_weekly: Annotated[int, _keep("on the remote: weekly", "--remote-keep-weekly")] = 0,
    remote_keep_monthly: Annotated[int, _keep("on the remote: monthly", "--remote-keep-monthly")] = 0,
    remote_keep_yearly: Annotated[int, _keep("on the remote: yearly", "--remote-keep-yearly")] = 0,
    as_json: JsonOpt = False,
    connect: ConnectOpt = None,
    home: HomeOpt = None,
) -> None:
    """Create a policy. Pruning follows `borg prune` (docs/remotes.md); no --keep-… rule: nothing is pruned."""
    keep = {"last": keep_last, "hourly": keep_hourly, "daily": keep_daily, "weekly": keep_weekly,
            "monthly": keep_monthly, "yearly": keep_yearly}  # fmt: skip
    remote_keep = {
        "last": remote_keep_last, "hourly": remote_keep_hourly, "daily": remote_keep_daily,
        "weekly": remote_keep_weekly, "monthly": remote_keep_monthly, "yearly": remote_keep_yearly,
    }  # fmt: skip
    with open_service(home, connect) as service:
        if group is not None:
            service.groups.show(group)  # a typo is refused now (nothing is created), not at the first run
        if copy_to is not None:
            service.offsite.remote(copy_to)
        state = service.policies.create(
            name, instance, group=group, every=every, cron=cron, consistency=consistency, mode=mode, keep=keep,
            copy_to=copy_to, remote_keep=remote_keep,
        )  # fmt: skip
    if as_json:
        print_json(policy_view(state))
    else:
        say(f"policy {state.policy.name}: {state.policy.target}, {state.policy.schedule}")


@policy_app.command("list")
def list_policies(as_json: JsonOpt = False, connect: ConnectOpt = None, home: HomeOpt = None) -> None:
    """The policies with their last outcome."""
    with open_service(home, connect) as service:
        states = service.policies.all()
    if as_json:
        print_json([policy_view(s) for s in states])
        return
    rows = [[s.policy.name, s.policy.target, s.policy.schedule, "paused" if s.paused else "active",
             s.last_outcome or "-"] for s in states]  # fmt: skip
    cols = (Col("name"), Col("snapshots", wraps=True), Col("schedule"), Col("state"), Col("last run", drop=1))
    print_table(cols, rows, rows)


@policy_app.command("show")
def show(name: PolicyArg, as_json: JsonOpt = False, connect: ConnectOpt = None, home: HomeOpt = None) -> None:
    """One policy, its last run's job, outcome and error."""
    with open_service(home, connect) as service:
        view = policy_view(service.policies.get(name))
    if as_json:
        print_json(view)
    else:
        print_fields([(k, str(v)) for k, v in view.items()])


@policy_app.command("run")
def run(name: PolicyArg, as_json: JsonOpt = False, connect: ConnectOpt = None, home: HomeOpt = None) -> None:
    """Run the policy now, in this process (a job row records it); exit code of the failure if it fails."""
    from freezeframe.errors import by_slug

    with open_service(home, connect) as service:
        job, report = service.policies.run_now(name)
    if as_json:
        print_json({"job": job.id, "state": job.state, "result": job.result, "error": job.error})
    elif report is not None:
        say(f"policy {name}: set {report.set_id}", f", copied to {report.copied_to}" if report.copied_to else "",
            f", pruned {len(report.deleted_local)} local, {len(report.deleted_remote)} remote")  # fmt: skip
    if report is None:
        row = by_slug(job.error_type or "")
        if not as_json:
            say(f"freezeframe: error: policy {name} failed: {job.error}", stderr=True)
        raise typer.Exit(row.exit_code if row else 1)


@policy_app.command("pause")
def pause(name: PolicyArg, connect: ConnectOpt = None, home: HomeOpt = None) -> None:
    """The scheduler skips it until `policy resume`."""
    with open_service(home, connect) as service:
        service.policies.pause(name)
    say(f"policy {name} paused")


@policy_app.command("resume")
def resume(name: PolicyArg, connect: ConnectOpt = None, home: HomeOpt = None) -> None:
    with open_service(home, connect) as service:
        service.policies.pause(name, paused=False)
    say(f"policy {name} resumed")


@policy_app.command("delete")
def delete(name: PolicyArg, connect: ConnectOpt = None, home: HomeOpt = None) -> None:
    """Delete the policy (its sets and copies stay)."""
    with open_service(home, connect) as service:
        service.policies.remove(name)
    say(f"policy {name} deleted (its sets stay)")


def register(app: typer.Typer) -> None:
    app.add_typer(policy_app, name="policy")
