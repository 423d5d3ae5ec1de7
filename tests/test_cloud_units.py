"""The rules around Keystone and Glance that need neither: settings from the environment, roles of a Keystone
token, what a createImage puts on its Glance image, Nova's metadata key limit. The real services are in
tests/test_openstack_cloud.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from freezeframe.adapters.keystone import KeystoneIdentity
from freezeframe.api.cloud_links import KEYSTONE_TOKEN_PREFIX, keystone_principal
from freezeframe.api.glance_results import glance_properties
from freezeframe.api.problems import ApiProblem
from freezeframe.cloud_settings import CloudSettings
from freezeframe.config import Settings
from freezeframe.errors import InvalidRequest
from freezeframe.model import DiskSpec, Hardware, Instance, InstanceState
from freezeframe.ops.compute import decode_meta_key, encode_meta_key

KEYS = ("FREEZEFRAME_KEYSTONE_URL", "FREEZEFRAME_KEYSTONE_USERNAME", "FREEZEFRAME_KEYSTONE_PASSWORD",
        "FREEZEFRAME_GLANCE_URL", "FREEZEFRAME_KEYSTONE_PROJECT", "FREEZEFRAME_KEYSTONE_REGION")  # fmt: skip


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in KEYS:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_no_keystone_configured_means_no_cloud(clean_env: pytest.MonkeyPatch) -> None:
    assert CloudSettings.from_env() is None


def test_glance_without_keystone_and_keystone_without_a_service_user_are_refused(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv("FREEZEFRAME_GLANCE_URL", "http://127.0.0.1:9292")
    with pytest.raises(InvalidRequest, match="needs FREEZEFRAME_KEYSTONE_URL"):
        CloudSettings.from_env()
    clean_env.setenv("FREEZEFRAME_KEYSTONE_URL", "http://127.0.0.1:5000/v3")
    with pytest.raises(InvalidRequest, match="FREEZEFRAME_KEYSTONE_USERNAME"):
        CloudSettings.from_env()


def test_settings_round_trip_through_the_environment(clean_env: pytest.MonkeyPatch) -> None:
    made = CloudSettings("http://127.0.0.1:5000/v3", "ff", "pw", region_name="RegionOne", glance="catalog")
    for key, value in made.env().items():
        clean_env.setenv(key, value)
    assert CloudSettings.from_env() == made


@pytest.mark.parametrize(
    ("roles", "ours"),
    [
        (("reader",), "reader"),
        (("member", "reader"), "member"),
        (("admin", "member", "reader"), "admin"),
        (("_member_",), "member"),
        (("Member",), "member"),
        (("load-balancer_observer",), None),
        ((), None),
    ],
)
def test_a_keystone_tokens_strongest_default_role_is_its_role(roles: tuple[str, ...], ours: str | None) -> None:
    assert KeystoneIdentity("u", "user", "p", "proj", roles).role == ours


class _Validator:
    def __init__(self, identity: KeystoneIdentity | None) -> None:
        self.identity = identity

    def validate(self, token: str) -> KeystoneIdentity | None:
        return self.identity


def test_keystone_principal_is_scoped_to_the_project_id() -> None:
    user_id = "0a1b2c3d" * 4  # Keystone's ids: 32 hex digits
    identity = KeystoneIdentity(user_id, "alice", "0123abcd", "demo", ("member", "reader"))
    principal = keystone_principal(_Validator(identity), "tok")  # type: ignore[arg-type]
    assert (principal.role, principal.project) == ("member", "0123abcd")
    assert principal.token_id == KEYSTONE_TOKEN_PREFIX + user_id[:29] and len(principal.token_id) == 32
    assert principal.sees("0123abcd") and not principal.sees("demo")


def test_invalid_tokens_are_401_and_tokens_without_our_roles_403() -> None:
    with pytest.raises(ApiProblem) as invalid:
        keystone_principal(_Validator(None), "tok")  # type: ignore[arg-type]
    assert invalid.value.status == 401
    stranger = KeystoneIdentity("u1", "bob", "p", "demo", ("heat_stack_user",))
    with pytest.raises(ApiProblem) as refused:
        keystone_principal(_Validator(stranger), "tok")  # type: ignore[arg-type]
    assert refused.value.status == 403 and "heat_stack_user" in refused.value.detail


def _instance() -> Any:
    disks = [
        DiskSpec(target=t, bus="virtio", source_path=f"/d/{t}", format="qcow2", virtual_size=1 << 20, boot_order=b)
        for t, b in (("vda", 1), ("vdb", None))
    ]
    hardware = Hardware(vcpus=1, memory_kib=65536, arch="x86_64", machine=None, disks=tuple(disks))
    return Instance(name="vm", uuid="0f0e0d0c-0b0a-0908-0706-050403020100", state=InstanceState.RUNNING,
                    hardware=hardware)  # fmt: skip


def test_glance_properties_name_the_set_the_instance_and_the_backup() -> None:
    props = glance_properties(_instance(), "set-1", "backup", "daily", {"Image Type": "gold"})
    assert props == {
        "Image Type": "gold", "image_type": "backup", "instance_uuid": "0f0e0d0c-0b0a-0908-0706-050403020100",
        "freezeframe_set_uuid": "set-1", "bdm_v2": "True", "root_device_name": "/dev/vda", "backup_type": "daily",
    }  # fmt: skip
    # The request's metadata cannot replace what names the set.
    assert (
        glance_properties(_instance(), "set-2", "snapshot", None, {"freezeframe_set_uuid": "x"})["freezeframe_set_uuid"]
        == "set-2"
    )


def test_metadata_keys_up_to_novas_255_characters() -> None:
    longest = "K" + "e y" * 84 + "x"
    assert len(longest) == 254
    assert decode_meta_key(encode_meta_key(longest + "z")) == longest + "z"
    with pytest.raises(InvalidRequest, match="1-255"):
        encode_meta_key(longest + "zz")


# ---- the publisher: real catalog, repository and qemu-img; a Glance that records what it is asked -------------


class _RecordingGlance:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.uploaded = b""

    def create(self, name: str, disk_format: str, container_format: str, owner: str | None, props: Any) -> Any:
        self.calls.append(("create", name))
        return {"id": "img-new", "status": "queued"}

    def set_properties(self, image_id: str, properties: dict[str, str]) -> None:
        self.calls.append(("set_properties", (image_id, properties)))

    def upload(self, image_id: str, data: Any) -> None:
        self.uploaded = data.read()
        self.calls.append(("upload", image_id))

    def delete(self, image_id: str) -> bool:
        self.calls.append(("delete", image_id))
        return True


def test_publisher_uploads_the_root_records_the_id_and_deletes_rotated_images(tmp_path: Any) -> None:
    import json

    from freezeframe.api.glance_results import GlancePublisher
    from freezeframe.ops.compute import Taken
    from freezeframe.ops.glance_records import GLANCE_KEY
    from freezeframe.ports import MANIFEST
    from freezeframe.service import Freezeframe
    from portable_support import synthetic_set

    hardware = Hardware(vcpus=1, memory_kib=65536, arch="x86_64", machine=None, disks=_instance().hardware.disks)
    with Freezeframe.open(Settings(home=tmp_path)) as ff:
        old = synthetic_set(ff, hardware, {"vda": 1}, instance_uuid="i-1", metadata={GLANCE_KEY: "img-old"})
        new = synthetic_set(ff, hardware, {"vda": 2, "vdb": 3}, instance_uuid="i-1")
        glance = _RecordingGlance()
        publisher = GlancePublisher(glance, ff, "img-new", "i-1")  # type: ignore[arg-type]
        publisher.prepare()
        assert publisher.earlier == {old.id: "img-old"}
        result = publisher.publish(Taken(new, rotated=[old.id]))
        assert result == {"glance_image_id": "img-new", "glance_rotated_out": ["img-old"]}
        delete, (_, (image_id, props)), upload = glance.calls
        bdm = json.loads(props["block_device_mapping"])
        assert image_id == "img-new" and [b["device_name"] for b in bdm] == ["/dev/vda", "/dev/vdb"]
        assert upload == ("upload", "img-new") and delete == ("delete", "img-old")
        root = next(m for m in new.members if m.target == "vda")
        assert glance.uploaded == Path(root.path).read_bytes()  # a standalone qcow2 goes as stored
        (recorded,) = ff.catalog.load_sets([new.id])
        assert recorded.metadata[GLANCE_KEY] == "img-new"
        assert {m.metadata[GLANCE_KEY] for m in recorded.members} == {"img-new"}
        on_disk = json.loads((ff.repository.set_dir(new.id) / MANIFEST).read_text())
        assert {m["metadata"][GLANCE_KEY] for m in on_disk["members"]} == {"img-new"}
        publisher.discard()
        assert glance.calls[-1] == ("delete", "img-new")
