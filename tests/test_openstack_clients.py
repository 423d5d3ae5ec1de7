"""The OpenStack clients people already use, unmodified, against a real ``freezeframe serve`` (no Keystone, no
Glance): openstacksdk, the ``openstack`` command (python-openstackclient) and python-novaclient.

They authenticate with our own tokens through keystoneauth's ``admin_token`` plugin (it sends ``X-Auth-Token``),
discover the compute API at ``/v2.1`` and read the resulting images from the read-only view at ``/v2/images``.
No guest boots: the instances are defined, shut-off libvirt domains (alpha: 3 disks, the volumes createImage must
all capture; beta: another project's), and their sets are offline copies, as in test_api_auth.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import libvirt
import pytest

from freezeframe.testbed.api_server import ServerProcess, issue_token, running_server

MiB = 1 << 20
PROJECT_NS = "https://freezeframe.dev/xmlns/1"
OPENSTACK = Path(sys.executable).with_name("openstack")

novaclient = pytest.importorskip("novaclient.client", reason="python-novaclient is not installed (dev extras)")
nova_exceptions = pytest.importorskip("novaclient.exceptions")
ks_session = pytest.importorskip("keystoneauth1.session", reason="keystoneauth1 is not installed (dev extras)")
ks_token = pytest.importorskip("keystoneauth1.token_endpoint")
openstack = pytest.importorskip("openstack", reason="openstacksdk is not installed (dev extras)")


def _domain_xml(name: str, disks: list[Path], project: str) -> str:
    devices = "".join(
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{d}'/>"
        f"<target dev='vd{chr(ord('a') + i)}' bus='virtio'/></disk>"
        for i, d in enumerate(disks)
    )
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <metadata><ff:project xmlns:ff="{PROJECT_NS}">{project}</ff:project></metadata>
  <memory unit='MiB'>96</memory><vcpu>2</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>{devices}</devices>
</domain>"""


@dataclass(frozen=True)
class Cloud:
    server: ServerProcess
    alpha: str
    """UUID of alpha's 3-disk server."""
    beta: str
    tokens: dict[str, str]
    clouds_yaml: Path

    @property
    def compute(self) -> str:
        return f"{self.server.url}/v2.1"

    def nova(self, who: str, version: str = "2.1") -> Any:
        auth = ks_token.Token(self.compute, self.tokens[who])
        return novaclient.Client(version, session=ks_session.Session(auth=auth), endpoint_override=self.compute)

    def sdk(self, who: str) -> Any:
        config = openstack.config.OpenStackConfig(config_files=[str(self.clouds_yaml)])
        return openstack.connection.Connection(config=config.get_one(cloud=who))

    def wait_active(self, image_id: str) -> dict[str, Any]:
        """As clients wait: until the image (the set, and its whole job) is done."""
        deadline = time.monotonic() + 120
        while True:
            image = self.image(image_id)
            if image["status"] in ("active", "killed") or time.monotonic() > deadline:
                assert image["status"] == "active", image
                return image
            time.sleep(0.2)

    def osc(self, who: str, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "OS_CLIENT_CONFIG_FILE": str(self.clouds_yaml), "OS_CLOUD": who}
        for key in [k for k in env if k.startswith("OS_") and k not in ("OS_CLIENT_CONFIG_FILE", "OS_CLOUD")]:
            env.pop(key)
        return subprocess.run(
            [str(OPENSTACK), *args], capture_output=True, text=True, check=False, env=env, timeout=300
        )

    def image(self, image_id: str) -> dict[str, Any]:
        with self.server.client(self.tokens["admin"]) as client:
            response = client.get(f"/v2/images/{image_id}")
            assert response.status_code == 200, response.text
            image: dict[str, Any] = response.json()
            return image


def _clouds_yaml(path: Path, url: str, tokens: dict[str, str]) -> None:
    """A stock clouds.yaml: keystoneauth's admin_token plugin with our token, endpoints given (no catalog)."""
    clouds = {
        who: {
            "auth_type": "admin_token",
            "auth": {"endpoint": f"{url}/v2.1", "token": token},
            "compute_endpoint_override": f"{url}/v2.1",
            "image_endpoint_override": f"{url}/v2",
            "image_api_version": "2",
        }
        for who, token in tokens.items()
    }
    path.write_text(json.dumps({"clouds": clouds}))  # JSON is YAML


@pytest.fixture(scope="module")
def cloud(libvirt_conn: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    if not OPENSTACK.exists():
        pytest.fail(f"the openstack command is not installed next to {sys.executable}; run scripts/setup-host.sh")
    work = tmp_path_factory.mktemp("osc")
    suffix = uuid.uuid4().hex[:8]
    defined = []
    try:
        uuids = {}
        for project, count in (("alpha", 3), ("beta", 1)):
            disks = [work / f"{project}-{i}.qcow2" for i in range(count)]
            for disk in disks:
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(8 * MiB)], check=True)
            dom = libvirt_conn.defineXML(_domain_xml(f"ffosc-{project}-{suffix}", disks, project))
            defined.append(dom)
            uuids[project] = dom.UUIDString()
        home = work / "home"
        with running_server(home) as server:
            tokens = {
                "admin": issue_token(home, "admin"),
                "alpha": issue_token(home, "member", "alpha"),
                "alpha-reader": issue_token(home, "reader", "alpha"),
            }
            _clouds_yaml(work / "clouds.yaml", server.url, tokens)
            yield Cloud(server, uuids["alpha"], uuids["beta"], tokens, work / "clouds.yaml")
    finally:
        for dom in defined:
            try:
                dom.undefine()
            except libvirt.libvirtError as exc:
                print(f"could not undefine {dom.name()}: {exc}")
        shutil.rmtree(work, ignore_errors=True)


# ---- discovery, the token header, servers ---------------------------------------------------------------------


def test_version_documents_are_what_keystoneauth_discovery_reads(cloud: Cloud) -> None:
    from keystoneauth1 import discover

    session = ks_session.Session(auth=ks_token.Token(cloud.compute, cloud.tokens["alpha"]))
    data = discover.get_version_data(session, f"{cloud.server.url}/")
    assert [(v["id"], v["min_version"], v["links"][0]["href"]) for v in data] == [
        ("v2.1", "2.1", f"{cloud.server.url}/v2.1/")
    ]
    endpoint = session.get_endpoint_data(endpoint_override=cloud.compute, service_type="compute")
    assert endpoint is not None and endpoint.min_microversion == (2, 1) and endpoint.max_microversion >= (2, 45)
    with httpx.Client(base_url=cloud.server.url) as raw:
        one = raw.get("/v2.1").json()["version"]
        assert one["id"] == "v2.1" and one["links"][0] == {"rel": "self", "href": f"{cloud.server.url}/v2.1/"}
        # X-Auth-Token and Bearer carry the same tokens; no token is Nova's 401.
        by_header = raw.get(f"/v2.1/servers/{cloud.alpha}", headers={"X-Auth-Token": cloud.tokens["alpha"]})
        bearer = {"Authorization": f"Bearer {cloud.tokens['alpha']}"}
        by_bearer = raw.get(f"/v2.1/servers/{cloud.alpha}", headers=bearer)
        assert by_header.status_code == by_bearer.status_code == 200
        none = raw.get(f"/v2.1/servers/{cloud.alpha}")
        assert none.status_code == 401 and none.json()["unauthorized"]["code"] == 401
        # X-Auth-Token works on the /v1 API too.
        v1 = raw.get(f"/v1/instances/{cloud.alpha}", headers={"X-Auth-Token": cloud.tokens["alpha"]})
        assert v1.status_code == 200, v1.text


def test_novaclient_reads_servers_in_novas_shapes(cloud: Cloud) -> None:
    nova = cloud.nova("alpha", "2.96")
    server = nova.servers.get(cloud.alpha)
    assert server.id == cloud.alpha and server.status == "SHUTOFF" and server.tenant_id == "alpha"
    assert [v["id"] for v in getattr(server, "os-extended-volumes:volumes_attached")] == ["vda", "vdb", "vdc"]
    assert server.flavor["vcpus"] == 2 and server.flavor["ram"] == 96  # embedded flavor from 2.47
    assert "id" in cloud.nova("alpha").servers.get(cloud.alpha).flavor  # 2.1: a flavor reference
    names = [s.name for s in nova.servers.list(search_opts={"name": server.name})]
    assert names == [server.name]
    assert [s.id for s in nova.servers.list(detailed=False)] == [cloud.alpha]  # beta's server is not listed
    with pytest.raises(nova_exceptions.NotFound):
        nova.servers.get(cloud.beta)
    with pytest.raises(nova_exceptions.NotFound):
        nova.servers.get(str(uuid.uuid4()))


# ---- createImage / createBackup -------------------------------------------------------------------------------


def test_novaclient_create_image_returns_the_image_id_at_2_1_and_2_45(cloud: Cloud) -> None:
    old = cloud.nova("alpha", "2.1")
    image_id = old.servers.create_image(cloud.alpha, "Backup 1", metadata={"Image Type": "nightly"})
    image = cloud.wait_active(image_id)  # 2.1: from Location, which names the image (not a job)
    assert image["id"] == image_id and image["name"] == "Backup 1" and image["Image Type"] == "nightly"
    new = cloud.nova("alpha", "2.96")
    image_id = new.servers.create_image(cloud.alpha, "café ☕ " + "x" * 200)
    assert uuid.UUID(image_id) and cloud.wait_active(image_id)["name"] == "café ☕ " + "x" * 200
    backup = new.servers.backup(cloud.alpha, "nightly backup", "", 1)
    backup_id = backup["image_id"] if isinstance(backup, dict) else backup.get("image_id")  # 2.45+: {"image_id"}
    assert cloud.wait_active(backup_id)["name"] == "nightly backup"


def test_openstack_server_image_create_waits_and_captures_every_volume(cloud: Cloud) -> None:
    made = cloud.osc("alpha", "server", "image", "create", "--name", "all volumes", "--wait", "-f", "json", cloud.alpha)
    assert made.returncode == 0, made.stderr
    image_id = json.loads(made.stdout)["id"]
    shown = cloud.osc("alpha", "image", "show", "-f", "json", image_id)
    assert shown.returncode == 0, shown.stderr
    image = json.loads(shown.stdout)
    assert image["status"] == "active" and image["name"] == "all volumes"
    properties = image.get("properties") or image
    bdm = json.loads(properties["block_device_mapping"])
    assert sorted(b["device_name"] for b in bdm) == ["/dev/vda", "/dev/vdb", "/dev/vdc"]
    sdk = cloud.sdk("alpha")
    assert sdk.image.get_image(image_id).status == "active"
    made_by_sdk = sdk.compute.create_server_image(cloud.alpha, "sdk image", wait=True, timeout=120)
    assert made_by_sdk.status == "active" and made_by_sdk.name == "sdk image"
    assert sdk.compute.get_server(cloud.alpha).status == "SHUTOFF"
    listed = cloud.osc("alpha", "image", "list", "-f", "json")
    assert listed.returncode == 0, listed.stderr
    assert image_id in [i["ID"] for i in json.loads(listed.stdout)]


def test_openstack_server_backup_create_rotates(cloud: Cloud) -> None:
    ids = []
    for n in range(3):
        made = cloud.osc(
            "alpha", "server", "backup", "create", "--name", f"rot {n}", "--type", "daily", "--rotate", "2",
            "--wait", "-f", "json", cloud.alpha,
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        ids.append(json.loads(made.stdout)["id"])
    listed = cloud.osc("alpha", "image", "list", "-f", "json")
    assert listed.returncode == 0, listed.stderr
    names = {i["ID"]: i["Name"] for i in json.loads(listed.stdout)}
    assert ids[0] not in names and ids[1] in names and ids[2] in names  # the oldest daily backup rotated out


# ---- errors, as the clients report them -----------------------------------------------------------------------


def test_errors_reach_novaclient_as_its_exceptions(cloud: Cloud) -> None:
    nova = cloud.nova("alpha", "2.96")
    with pytest.raises(nova_exceptions.NotFound):
        nova.servers.create_image(str(uuid.uuid4()), "x")
    with pytest.raises(nova_exceptions.NotFound):
        nova.servers.create_image(cloud.beta, "x")  # another project's server: not there for this token
    with pytest.raises(nova_exceptions.BadRequest, match="rotation"):
        nova.servers.backup(cloud.alpha, "x", "daily", -1)
    with pytest.raises(nova_exceptions.BadRequest):
        nova.servers.create_image(cloud.alpha, "   ")
    with pytest.raises(nova_exceptions.Forbidden):
        cloud.nova("alpha-reader", "2.96").servers.create_image(cloud.alpha, "x")


def test_errors_reach_the_openstack_command_with_its_exit_codes(cloud: Cloud) -> None:
    unknown = cloud.osc("alpha", "server", "image", "create", "--name", "x", str(uuid.uuid4()))
    assert unknown.returncode == 1 and "No Server found" in unknown.stderr, unknown.stderr
    reader = cloud.osc("alpha-reader", "server", "image", "create", "--name", "x", cloud.alpha)
    assert reader.returncode == 1 and "403" in reader.stderr and "reader role" in reader.stderr, reader.stderr
    other = cloud.osc("alpha", "server", "backup", "create", "--type", "daily", "--rotate", "1", cloud.beta)
    assert other.returncode == 1 and "No Server found" in other.stderr, other.stderr
    missing = cloud.osc("alpha", "image", "show", str(uuid.uuid4()))
    assert missing.returncode == 1 and "No Image found" in missing.stderr, missing.stderr


# ---- what Nova validates and forgives, on the wire ------------------------------------------------------------


def test_nova_validation_leniency_microversion_headers_and_fault_bodies(cloud: Cloud) -> None:
    headers = {"X-Auth-Token": cloud.tokens["alpha"]}
    action = f"/v2.1/servers/{cloud.alpha}/action"
    with httpx.Client(base_url=cloud.server.url, headers=headers, timeout=60) as raw:
        # What Nova accepts and a strict schema would not: backup_type "", metadata null, rotation as digits.
        lenient = {"createBackup": {"name": "Backup 2", "backup_type": "", "rotation": "1", "metadata": None}}
        made = raw.post(action, json=lenient, headers={"OpenStack-API-Version": "compute 2.45"})
        assert made.status_code == 202, made.text
        assert made.headers["openstack-api-version"] == "compute 2.45" and "location" not in made.headers
        backup = cloud.wait_active(made.json()["image_id"])
        assert backup["name"] == "Backup 2" and backup["image_type"] == "backup"
        with cloud.server.client(cloud.tokens["alpha"]) as v1:
            recorded = v1.get(f"/v1/snapshot-sets/{backup['id']}").json()
        assert recorded["name"].startswith("Backup-2-") and len(recorded["members"]) == 3  # safe name, every disk
        # Before 2.45: no body, the image's URL in Location (the legacy header alone picks the version too).
        old = raw.post(
            action, json={"createImage": {"name": "legacy"}}, headers={"X-OpenStack-Nova-API-Version": "2.44"}
        )
        assert old.status_code == 202 and old.content == b"", old.text
        assert old.headers["location"].startswith(f"{cloud.server.url}/v2/images/")
        cloud.wait_active(old.headers["location"].rsplit("/", 1)[1])
        # Nova's faults, with the status novaclient maps to its exceptions.
        cases = [
            ({"createImage": {"name": "x", "all_volumes": True}}, {}, 400, "badRequest", "Additional properties"),
            ({"createImage": {}}, {}, 400, "badRequest", "'name' is a required property"),
            ({"reboot": {"type": "SOFT"}}, {}, 400, "badRequest", "no such action"),
            ({"createImage": {"name": "x", "metadata": {"-bad": "y"}}}, {}, 400, "badRequest", "metadata key"),
            ({"createImage": {"name": "x"}}, {"X-OpenStack-Nova-API-Version": "2.200"}, 406, "notAcceptable", "2.96"),
        ]
        for body, extra, status, fault, words in cases:
            response = raw.post(action, json=body, headers=extra)
            assert response.status_code == status, (body, response.text)
            assert words in response.json()[fault]["message"], response.text
        gone = raw.get(f"/v2.1/servers/{uuid.uuid4()}")
        assert gone.status_code == 404 and gone.json()["itemNotFound"]["code"] == 404
        assert raw.get("/v2/images/not-an-id").json()["itemNotFound"]["code"] == 404
        # The /v1 API keeps its problem documents.
        assert raw.get(f"/v1/instances/{uuid.uuid4()}").headers["content-type"] == "application/problem+json"
