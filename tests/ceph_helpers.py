"""The real Ceph test bed for tests: brought up once (idempotent ``up``), reached through FREEZEFRAME_CEPH_*."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from freezeframe.adapters.rbd_volumes import CephSettings, RbdVolumes
from freezeframe.testbed.ceph import CephTestbed, Cluster


@pytest.fixture(scope="module")
def ceph_testbed() -> Iterator[CephTestbed]:
    """A healthy cluster, and freezeframe's environment pointing at it for the module's duration."""
    info = Cluster().up()
    saved = {k: os.environ.get(k) for k in info.env()}
    os.environ.update(info.env())
    try:
        yield info
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def volumes_for(info: CephTestbed) -> RbdVolumes:
    return RbdVolumes(CephSettings(conf=info.conf, user=info.user, keyring=info.keyring, secret_uuid=info.secret_uuid))


def dead_conf(info: CephTestbed, where: Path) -> Path:
    """The test bed's ceph.conf with the monitor moved to a port nobody listens on: an unreachable cluster."""
    text = Path(info.conf).read_text().replace(info.mon_host, "127.0.0.1:1")
    path = where / "dead-ceph.conf"
    path.write_text(text)
    return path


def qemu_source(info: CephTestbed, source: str) -> str:
    """A member's ``rbd:POOL/IMAGE@SNAP`` with the options qemu-img needs (the documented form)."""
    return f"{source}:id={info.user}:conf={info.conf}:keyring={info.keyring}"
