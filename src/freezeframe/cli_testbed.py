"""CLI commands of the test bed: ``testbed ceph up|down|status [--json]`` (a real one-node Ceph cluster).

Only tests, the demo and benchmarks need these; the test bed is imported when a command runs.
"""

from __future__ import annotations

import dataclasses

import typer

from freezeframe.cli_common import HomeOpt, JsonOpt, print_json
from freezeframe.cli_output import say
from freezeframe.errors import PreflightFailed

CONTEXT = {"help_option_names": ["-h", "--help"]}

testbed_app = typer.Typer(help="Real systems for tests and the demo (a Ceph cluster, a PostgreSQL server).",
                          no_args_is_help=True, context_settings=CONTEXT)  # fmt: skip
ceph_app = typer.Typer(
    help="A one-node Ceph cluster on 127.0.0.1 (mon, mgr, memstore OSD, cephx, a pool, a libvirt secret); state in "
    "$FREEZEFRAME_CEPH_TESTBED_DIR (default /var/tmp/freezeframe-ceph).",
    no_args_is_help=True,
    context_settings=CONTEXT,
)
testbed_app.add_typer(ceph_app, name="ceph")
postgres_app = typer.Typer(
    help="A PostgreSQL server on 127.0.0.1 (Debian's postgresql, initdb in a private directory) with a database and "
    "role freezeframe; state in $FREEZEFRAME_PG_TESTBED_DIR (default /var/tmp/freezeframe-pg), port "
    "$FREEZEFRAME_PG_TESTBED_PORT (default 54329).",
    no_args_is_help=True,
    context_settings=CONTEXT,
)
testbed_app.add_typer(postgres_app, name="postgres")


@ceph_app.command("up")
def ceph_up(as_json: JsonOpt = False) -> None:
    """Bring the cluster up (a healthy one is left as it is) and print how to reach it."""
    from freezeframe.testbed.ceph import Cluster
    from freezeframe.testbed.instance import TestbedError

    try:
        info = Cluster().up()
    except TestbedError as exc:
        raise PreflightFailed(f"testbed ceph up: {exc}") from exc
    if as_json:
        print_json(dataclasses.asdict(info))
        return
    for key, value in dataclasses.asdict(info).items():
        say(f"{key}: {value}")
    for key, value in info.env().items():
        say(f"export {key}={value}")


@ceph_app.command("down")
def ceph_down() -> None:
    """Stop the daemons and remove the cluster's data (the libvirt secret stays, it is reused)."""
    from freezeframe.testbed.ceph import Cluster

    Cluster().down()
    say("ceph test bed stopped")


@ceph_app.command("status")
def ceph_status(as_json: JsonOpt = False) -> None:
    """Which daemons run and whether the pool answers; exit code 1 when it is not healthy."""
    from freezeframe.testbed.ceph import Cluster

    status = Cluster().status()
    if as_json:
        print_json(status)
    else:
        say(f"state: {status['state_dir']}")
        say(f"daemons: {status['daemons']}")
        say(f"healthy: {status['healthy']}")
    if not status["healthy"]:
        raise typer.Exit(1)


openstack_app = typer.Typer(
    help="A real Keystone and Glance (Debian's packages, SQLite, fernet tokens, file store) on 127.0.0.1, and a "
    "`freezeframe serve` on the current data home registered as `compute`; state in "
    "$FREEZEFRAME_OPENSTACK_TESTBED_DIR (default /var/tmp/freezeframe-openstack).",
    no_args_is_help=True,
    context_settings=CONTEXT,
)
testbed_app.add_typer(openstack_app, name="openstack")


@openstack_app.command("up")
def openstack_up(as_json: JsonOpt = False, home: HomeOpt = None) -> None:
    """Bring Keystone, Glance and the serve up (a running test bed is left as it is) and say how to reach them."""
    from freezeframe.cli_common import settings_for
    from freezeframe.testbed.instance import TestbedError
    from freezeframe.testbed.openstack import OpenStackTestbed, info_dict

    try:
        info = info_dict(OpenStackTestbed().up(settings_for(home, None).home))
    except TestbedError as exc:
        raise PreflightFailed(f"testbed openstack up: {exc}") from exc
    if as_json:
        print_json(info)
        return
    for key, value in info.items():
        say(f"{key}: {value}")
    say(f"export OS_CLIENT_CONFIG_FILE={info['clouds_yaml']} OS_CLOUD={info['cloud']}")


@openstack_app.command("down")
def openstack_down() -> None:
    """Stop Keystone, Glance and the serve, and remove the test bed's data."""
    from freezeframe.testbed.openstack import OpenStackTestbed

    OpenStackTestbed().down()
    say("openstack test bed stopped")


@openstack_app.command("status")
def openstack_status(as_json: JsonOpt = False) -> None:
    """Which daemons run and whether they answer; exit code 1 when it is not healthy."""
    from freezeframe.testbed.openstack import OpenStackTestbed

    _report_status(OpenStackTestbed().status(), as_json)


@postgres_app.command("up")
def postgres_up(as_json: JsonOpt = False) -> None:
    """Start the server (one already running is left as it is) and print its URL and environment."""
    from freezeframe.testbed.instance import TestbedError
    from freezeframe.testbed.postgres import Server

    try:
        info = Server().up()
    except TestbedError as exc:
        raise PreflightFailed(f"testbed postgres up: {exc}") from exc
    if as_json:
        print_json(info.as_dict())
        return
    for key, value in dataclasses.asdict(info).items():
        say(f"{key}: {value}")
    for key, value in info.env().items():
        say(f"export {key}={value}")


@postgres_app.command("down")
def postgres_down() -> None:
    """Stop the server and remove its directory (every database in it)."""
    from freezeframe.testbed.instance import TestbedError
    from freezeframe.testbed.postgres import Server

    try:
        Server().down()
    except TestbedError as exc:
        raise PreflightFailed(f"testbed postgres down: {exc}") from exc
    say("postgres test bed stopped")


@postgres_app.command("status")
def postgres_status(as_json: JsonOpt = False) -> None:
    """Whether the server runs and the freezeframe role reaches its database; exit code 1 when not healthy."""
    from freezeframe.testbed.postgres import Server

    _report_status(Server().status(), as_json)


hosts_app = typer.Typer(
    help="N libvirt hosts on this machine (own daemons and namespaces, an agent each) sharing a PostgreSQL "
    "catalog and job queue; state in $FREEZEFRAME_HOSTS_TESTBED_DIR (default /var/tmp/freezeframe-hosts).",
    no_args_is_help=True,
    context_settings=CONTEXT,
)
testbed_app.add_typer(hosts_app, name="hosts")


@hosts_app.command("up")
def hosts_up(
    count: int = typer.Argument(3, metavar="N", min=1, max=16, help="how many hosts"), as_json: JsonOpt = False
) -> None:
    """Start (or keep) hosts ffhost1..N with their agents and print each host's name and URI, the catalog URL
    and the environment that points freezeframe commands at this deployment."""
    from freezeframe.testbed.hosts import testbed_dir, up
    from freezeframe.testbed.instance import TestbedError
    from freezeframe.testbed.multi_host import catalog_url

    try:
        testbed = up(count, catalog_url(testbed_dir()))
    except TestbedError as exc:
        raise PreflightFailed(f"testbed hosts up: {exc}") from exc
    if as_json:
        print_json(
            {"hosts": [{"name": h.name, "uri": h.uri} for h in testbed.hosts], "catalog_url": testbed.catalog_url,
             "env": testbed.env}
        )  # fmt: skip
        return
    for host in testbed.hosts:
        say(f"{host.name}: {host.uri}")
    for key, value in testbed.env.items():
        say(f"export {key}={value}")


@hosts_app.command("down")
def hosts_down() -> None:
    """Stop every host: agents, their guests, daemons; remove the hosts' directories (the database stays)."""
    from freezeframe.testbed.hosts import down

    stopped = down()
    say(f"hosts test bed stopped ({', '.join(stopped) or 'nothing was running'})")


def register(app: typer.Typer) -> None:
    app.add_typer(testbed_app, name="testbed")


def _report_status(status: dict[str, object], as_json: bool) -> None:
    """A test bed's status as JSON or ``key: value`` lines; exit code 1 when it is not healthy."""
    if as_json:
        print_json(status)
    else:
        for key, value in status.items():
            say(f"{key}: {value}")
    if not status["healthy"]:
        raise typer.Exit(1)
