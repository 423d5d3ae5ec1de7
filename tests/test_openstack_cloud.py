"""The OpenStack clients against a real cloud: Keystone and Glance from Debian's packages, brought up by
``freezeframe testbed openstack up``, with ``freezeframe serve`` registered as ``compute`` in Keystone's catalog.

The clients read only the test bed's stock ``clouds.yaml`` (password auth; endpoints from the catalog): Keystone
tokens reach freezeframe (validated by keystonemiddleware), the images createImage/createBackup make are real
Glance images the clients wait on. The servers are defined, shut-off domains (alpha: 3 disks, in project
ff-demo; beta: in ff-other), so their sets are offline copies and no guest boots.
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

from freezeframe.config import Settings
from freezeframe.service import Freezeframe
from freezeframe.testbed.api_server import issue_token
from freezeframe.testbed.openstack import OpenStackTestbed

MiB = 1 << 20
OPENSTACK = Path(sys.executable).with_name("openstack")

novaclient = pytest.importorskip("novaclient.client", reason="python-novaclient is not installed (dev extras)")
nova_exceptions = pytest.importorskip("novaclient.exceptions")
openstack = pytest.importorskip("openstack", reason="openstacksdk is not installed (dev extras)")


def _domain_xml(name: str, disks: list[Path]) -> str:
    devices = "".join(
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{d}'/>"
        f"<target dev='vd{chr(ord('a') + i)}' bus='virtio'/></disk>"
        for i, d in enumerate(disks)
    )
    return f"""<domain type='qemu'><name>{name}</name><memory unit='MiB'>96</memory><vcpu>2</vcpu>
  <os><type arch='x86_64'>hvm</type></os><devices>{devices}</devices></domain>"""


def _cli(home: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "freezeframe.cli", *args], capture_output=True, text=True, check=False, timeout=600,
        env={**os.environ, **env, "FREEZEFRAME_HOME": str(home)},
    )  # fmt: skip


@dataclass(frozen=True)
class Cloud:
    info: dict[str, Any]
    home: Path
    alpha: str
    beta: str

    def connection(self, who: str) -> Any:
        config = openstack.config.OpenStackConfig(config_files=[self.info["clouds_yaml"]])
        return openstack.connection.Connection(config=config.get_one(cloud=who))

    def nova(self, who: str, version: str = "2.1") -> Any:
        return novaclient.Client(version, session=self.connection(who).session)

    def osc(self, who: str, *args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
        env.update(OS_CLIENT_CONFIG_FILE=self.info["clouds_yaml"], OS_CLOUD=who)
        return subprocess.run([str(OPENSTACK), *args], capture_output=True, text=True, check=False, env=env,
                              timeout=600)  # fmt: skip

    def glance_image(self, image_id: str) -> dict[str, Any]:
        """The image as Glance answers it (every property flat, as the API has them)."""
        response = self.connection("ff-admin").image.get(f"/images/{image_id}")
        assert response.status_code == 200, response.text
        image: dict[str, Any] = response.json()
        return image

    def sets(self) -> list[Any]:
        with Freezeframe.open(Settings.from_env(home=self.home)) as service:
            return service.catalog.list_sets()


@pytest.fixture(scope="module")
def cloud(libvirt_conn: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    if not OPENSTACK.exists():
        pytest.fail(f"the openstack command is not installed next to {sys.executable}; run scripts/setup-host.sh")
    work = tmp_path_factory.mktemp("oscloud")
    home = work / "home"
    up = _cli(home, {}, "testbed", "openstack", "up", "--json")
    assert up.returncode == 0, up.stderr
    info = json.loads(up.stdout)
    env = OpenStackTestbed().settings().env()
    suffix = uuid.uuid4().hex[:8]
    defined = []
    made_images: list[str] = []
    try:
        uuids = {}
        for key, count, project in (("alpha", 3, info["project"]), ("beta", 1, info["other_project_id"])):
            disks = [work / f"{key}-{i}.qcow2" for i in range(count)]
            for disk in disks:
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(8 * MiB)], check=True)
            dom = libvirt_conn.defineXML(_domain_xml(f"ffos-{key}-{suffix}", disks))
            defined.append(dom)
            uuids[key] = dom.UUIDString()
            # alpha by the Keystone project's name, beta by its id: both are recorded as the id
            assigned = _cli(home, env, "project", "assign", dom.name(), project)
            assert assigned.returncode == 0, assigned.stderr
        yield Cloud(info, home, uuids["alpha"], uuids["beta"])
        made_images = [s.metadata.get("freezeframe.glance_image_id", "") for s in Cloud(info, home, "", "").sets()]
    finally:
        OpenStackTestbed().stop_serve()  # Keystone and Glance stay up for the next run, as the Ceph test bed does
        admin = Cloud(info, home, "", "").connection("ff-admin")
        for image_id in filter(None, made_images):
            admin.image.delete_image(image_id, ignore_missing=True)
        for dom in defined:
            try:
                dom.undefine()
            except libvirt.libvirtError as exc:
                print(f"could not undefine {dom.name()}: {exc}")
        shutil.rmtree(work, ignore_errors=True)


def test_testbed_up_answers_with_the_catalog_and_a_stock_clouds_yaml(cloud: Cloud) -> None:
    info = cloud.info
    assert {"clouds_yaml", "cloud", "project", "auth_url", "serve_url"} <= set(info)
    clouds = json.loads(Path(info["clouds_yaml"]).read_text())["clouds"]
    assert set(clouds) == {"ff-admin", "ff-member", "ff-reader", "ff-other"} and info["cloud"] == "ff-member"
    assert clouds["ff-member"]["auth"]["project_name"] == info["project"]
    conn = cloud.connection(info["cloud"])
    assert conn.session.get_endpoint(service_type="compute", interface="public") == info["serve_url"] + "/v2.1"
    assert conn.session.get_endpoint(service_type="image", interface="public").rstrip("/") == info["glance_url"]
    # A second `up` leaves the running test bed as it is; `status` says it is healthy.
    serve_pid = (Path(info["state_dir"]) / "serve.pid").read_text()
    again = _cli(cloud.home, {}, "testbed", "openstack", "up", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["serve_url"] == info["serve_url"]
    assert (Path(info["state_dir"]) / "serve.pid").read_text() == serve_pid
    status = _cli(cloud.home, {}, "testbed", "openstack", "status", "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["healthy"] is True, status.stdout
    # project assign takes Keystone's names and ids only: an unknown one is not-found (exit code 2).
    unknown = _cli(cloud.home, OpenStackTestbed().settings().env(), "project", "assign", cloud.alpha, "no-such")
    assert unknown.returncode == 2 and "Keystone has no project" in unknown.stderr, unknown.stderr
    env_lines = Path(info["env_file"]).read_text()
    assert f"export FREEZEFRAME_KEYSTONE_URL={info['auth_url']}" in env_lines


def test_keystone_tokens_scope_servers_by_project_and_role(cloud: Cloud) -> None:
    assert [s.id for s in cloud.connection("ff-member").compute.servers()] == [cloud.alpha]
    assert [s.id for s in cloud.connection("ff-other").compute.servers()] == [cloud.beta]
    assert {s.id for s in cloud.connection("ff-admin").compute.servers()} >= {cloud.alpha, cloud.beta}
    server = cloud.nova("ff-member", "2.96").servers.get(cloud.alpha)
    assert server.tenant_id == cloud.info["project_id"]
    with httpx.Client(base_url=cloud.info["serve_url"]) as raw:
        bad = raw.get("/v2.1/servers", headers={"X-Auth-Token": "gAAAAAnot-a-fernet-token"})
        assert bad.status_code == 401 and bad.json()["unauthorized"]["code"] == 401
        # Our own tokens keep working next to Keystone's.
        own = issue_token(cloud.home, "member", cloud.info["project_id"])
        mine = raw.get(f"/v2.1/servers/{cloud.alpha}", headers={"X-Auth-Token": own})
        assert mine.status_code == 200, mine.text


def test_openstack_server_image_create_waits_on_glance_and_captures_every_disk(cloud: Cloud) -> None:
    done = cloud.osc("ff-member", "server", "image", "create", "--name", "Snap 1", "--wait", cloud.alpha, "-f", "json")
    assert done.returncode == 0, done.stderr
    image_id = json.loads(done.stdout)["id"]
    props = cloud.glance_image(image_id)
    assert props["status"] == "active" and props["name"] == "Snap 1" and props["size"] > 0
    assert props["owner"] == cloud.info["project_id"] and props["disk_format"] == "qcow2"
    bdm = json.loads(props["block_device_mapping"])
    assert [(b["device_name"], b["boot_index"]) for b in bdm] == [("/dev/vda", 0), ("/dev/vdb", -1), ("/dev/vdc", -1)]
    assert props["image_type"] == "snapshot" and props["instance_uuid"] == cloud.alpha
    (made,) = [s for s in cloud.sets() if s.id == props["freezeframe_set_uuid"]]
    assert sorted(m.target for m in made.members) == ["vda", "vdb", "vdc"]
    assert made.metadata["freezeframe.glance_image_id"] == image_id
    shown = cloud.osc("ff-member", "image", "show", image_id, "-f", "json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["status"] == "active", shown.stderr
    listed = cloud.osc("ff-member", "image", "list", "-f", "json")
    assert image_id in [i["ID"] for i in json.loads(listed.stdout)], listed.stderr


def test_openstack_server_backup_create_rotates_out_of_glance_too(cloud: Cloud) -> None:
    ids = []
    for n in range(3):
        done = cloud.osc("ff-member", "server", "backup", "create", "--name", f"nightly {n}", "--type", "daily",
                         "--rotate", "2", "--wait", cloud.alpha, "-f", "json")  # fmt: skip
        assert done.returncode == 0, done.stderr
        ids.append(json.loads(done.stdout)["id"])
    admin = cloud.connection("ff-admin")
    kept = [i.id for i in admin.image.images(owner=cloud.info["project_id"]) if i.properties.get("backup_type")]
    assert ids[0] not in kept and set(ids[1:]) <= set(kept)
    assert admin.image.find_image(ids[0]) is None
    backups = [s for s in cloud.sets() if s.backup_type == "daily"]
    assert sorted(s.metadata["freezeframe.glance_image_id"] for s in backups) == sorted(ids[1:])


def test_sdk_and_novaclient_get_glance_image_ids(cloud: Cloud) -> None:
    conn = cloud.connection("ff-member")
    image = conn.compute.create_server_image(cloud.alpha, "sdk image", wait=True, timeout=300)
    assert conn.image.get_image(image.id).status == "active"
    nova = cloud.nova("ff-member", "2.45")
    long_key = "Image Type " + "k" * 244  # Nova's limit: 255 characters
    image_id = nova.servers.create_image(cloud.alpha, "nova image", metadata={long_key: "gold"})
    deadline = time.monotonic() + 300
    while (status := cloud.glance_image(image_id)["status"]) != "active" and time.monotonic() < deadline:
        time.sleep(1)
    assert status == "active" and cloud.glance_image(image_id)[long_key] == "gold"


def test_errors_reach_the_clients_with_their_exit_codes_and_exceptions(cloud: Cloud) -> None:
    member = cloud.nova("ff-member", "2.45")
    with pytest.raises(nova_exceptions.NotFound):
        member.servers.get(cloud.beta)  # another project's server
    with pytest.raises(nova_exceptions.NotFound):
        member.servers.create_image(cloud.beta, "not mine")
    with pytest.raises(nova_exceptions.BadRequest):
        member.servers.backup(cloud.alpha, "b", "daily", "-1")  # rotation must be non-negative
    with pytest.raises(nova_exceptions.Forbidden):
        cloud.nova("ff-reader", "2.45").servers.create_image(cloud.alpha, "reader's")
    unknown = cloud.osc("ff-member", "server", "image", "create", "--name", "x", str(uuid.uuid4()))
    assert unknown.returncode == 1 and "No Server found" in unknown.stderr, unknown.stderr
    reader = cloud.osc("ff-reader", "server", "image", "create", "--name", "x", cloud.alpha)
    assert reader.returncode == 1 and "403" in reader.stderr and "reader role" in reader.stderr, reader.stderr
    # Nothing half-made: none of the refused requests left an image in Glance.
    names = {i.name for i in cloud.connection("ff-admin").image.images(owner=cloud.info["project_id"])}
    assert not names & {"not mine", "reader's", "b", "x"}


def test_export_to_glance_and_import_from_it(cloud: Cloud, libvirt_conn: Any) -> None:
    env = OpenStackTestbed().settings().env()
    if not [s for s in cloud.sets() if s.instance_uuid == cloud.alpha]:  # run alone (-k): make a set first
        cloud.connection("ff-member").compute.create_server_image(cloud.alpha, "for export", wait=True, timeout=300)
    source = next(s for s in cloud.sets() if s.instance_uuid == cloud.alpha and len(s.members) == 3)
    done = _cli(cloud.home, env, "export", source.id, "--to-glance", "--name", "alpha OVA", "--json")
    assert done.returncode == 0, done.stderr
    image_id = json.loads(done.stdout)["image_id"]
    image = cloud.glance_image(image_id)
    assert (image["status"], image["container_format"], image["disk_format"]) == ("active", "ova", "qcow2")
    assert image["freezeframe_set_uuid"] == source.id and image["architecture"] == "x86_64"
    assert (image["freezeframe_vcpus"], image["freezeframe_memory_mib"]) == ("2", "96")
    (recorded,) = [s for s in cloud.sets() if s.id == source.id]
    assert {m.metadata["freezeframe.glance_image_id"] for m in recorded.members} == {image_id}
    name = f"ffos-imported-{uuid.uuid4().hex[:8]}"
    try:
        imported = _cli(cloud.home, env, "import", image_id, "--as", name, "--json")
        assert imported.returncode == 0, imported.stderr
        assert [d["target"] for d in json.loads(imported.stdout)["disks"]] == ["vda", "vdb", "vdc"]
    finally:
        try:
            libvirt_conn.lookupByName(name).undefine()
        except libvirt.libvirtError as exc:
            print(f"no imported domain to clean up: {exc}")
        cloud.connection("ff-admin").image.delete_image(image_id, ignore_missing=True)
    # Not an OVA: refused with one line and the invalid-request exit code, nothing defined.
    admin = cloud.connection("ff-admin")
    bare = admin.image.create_image("not a package", data=b"\0" * 4096, disk_format="raw", container_format="bare")
    try:
        refused = _cli(cloud.home, env, "import", bare.id, "--as", name + "x")
        assert refused.returncode == 3 and "only active 'ova' images" in refused.stderr, refused.stderr
        assert name + "x" not in libvirt_conn.listDefinedDomains()
    finally:
        admin.image.delete_image(bare.id, ignore_missing=True)
