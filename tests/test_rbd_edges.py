"""The edges of the RBD operations, without a cluster: names validated once (CLI, API, Python), clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from cli_helpers import run_cli
from freezeframe.api.schemas import ImportRequest
from freezeframe.errors import InvalidRequest
from freezeframe.validation import validate_import_storage, validate_rbd_volume


@pytest.mark.parametrize(
    "bad", ["rbd:pool", "rbd:/img", "rbd:pool/", "pool/img", "rbd:pool/a/b", "rbd:pool/x:conf=/etc/passwd",
            "rbd:pool/img@snap", "rbd:-pool/img", "rbd:pool/" + "x" * 64],
)  # fmt: skip
def test_an_rbd_target_is_two_names(bad: str) -> None:
    with pytest.raises(InvalidRequest, match="RBD"):
        validate_rbd_volume(bad)


def test_a_good_rbd_target() -> None:
    assert validate_rbd_volume("rbd:volumes/web-1.restored_vdb") == "volumes/web-1.restored_vdb"


def test_import_storage_needs_a_pool_only_for_rbd() -> None:
    assert validate_import_storage("file", None) is None
    assert validate_import_storage("rbd", "volumes") == "volumes"
    for storage, pool, why in [("rbd", None, "needs --pool"), ("file", "volumes", "goes with --storage rbd"),
                               ("nfs", None, "use one of file, rbd"), ("rbd", "a:b", "RBD pool")]:  # fmt: skip
        with pytest.raises(InvalidRequest, match=why):
            validate_import_storage(storage, pool)


def test_the_api_import_body_is_checked_by_the_same_rule() -> None:
    assert ImportRequest(name="web", storage="rbd", pool="volumes").pool == "volumes"
    assert ImportRequest(name="web").storage == "file"
    for body in ({"name": "web", "storage": "rbd"}, {"name": "web", "pool": "volumes"},
                 {"name": "web", "storage": "rbd", "pool": "a:b"}, {"name": "web", "storage": "nfs"}):  # fmt: skip
        with pytest.raises(ValidationError):
            ImportRequest.model_validate(body)


def test_cli_refuses_bad_rbd_names_in_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    home = str(tmp_path / "home")
    bad_to = run_cli(capsys, "restore", "0badc0de", "--disk", "vdb", "--to", "rbd:pool/x:id=admin", "--home", home)
    assert bad_to.code != 0 and "RBD image" in bad_to.err and len(bad_to.err.strip().splitlines()) == 1
    no_pool = run_cli(capsys, "import", str(tmp_path / "x.ova"), "--as", "web", "--storage", "rbd", "--home", home)
    assert no_pool.code != 0 and "--storage rbd needs --pool" in no_pool.err and "Traceback" not in no_pool.err
