"""What Nova clients type, kept as typed: display names beside safe set names, metadata keys with spaces, any
backup type (rotation groups by it), Nova's rules for names."""

from __future__ import annotations

import pytest

from freezeframe.errors import InvalidRequest
from freezeframe.ops.compute import (
    DISPLAY_NAME_KEY,
    decode_meta_key,
    encode_meta_key,
    internal_backup_type,
    internal_name,
    nova_order,
    user_metadata,
)
from freezeframe.validation import validate_backup_type, validate_metadata, validate_name

SET_ID = "5e7a1d2c-0000-4000-8000-000000000001"


@pytest.mark.parametrize(
    ("typed", "safe"),
    [
        ("Backup 1", "Backup-1-5e7a1d2c"),
        ("café ☕", "caf-5e7a1d2c"),
        ("☕☕", "image-5e7a1d2c"),
        ("x" * 255, "x" * 40 + "-5e7a1d2c"),
    ],
)
def test_typed_names_get_a_safe_set_name_and_keep_the_typed_one(typed: str, safe: str) -> None:
    order = nova_order(typed, SET_ID, {})
    assert order.name == safe == internal_name(typed, SET_ID)
    validate_name(safe)
    assert order.metadata[DISPLAY_NAME_KEY] == typed


@pytest.mark.parametrize("bad", ["", "   ", "x" * 256, "tab\there", "bell\x07"])
def test_names_nova_refuses_are_refused(bad: str) -> None:
    with pytest.raises(InvalidRequest):
        nova_order(bad, SET_ID, {})


def test_metadata_keys_with_spaces_round_trip_through_our_key_alphabet() -> None:
    order = nova_order("n", SET_ID, {"Image Type": "daily", "os:distro": "debian"})
    stored = validate_metadata(order.metadata, allow_reserved=True)
    assert stored["Image/Type"] == "daily"
    assert user_metadata(stored) == {"Image Type": "daily", "os:distro": "debian"}
    assert decode_meta_key(encode_meta_key("a b.c:d-e_f")) == "a b.c:d-e_f"
    for bad in ("-leading", "freezeframe.set", "x" * 256, "slash/not-nova"):
        with pytest.raises(InvalidRequest):
            encode_meta_key(bad)


def test_any_backup_type_maps_to_a_stable_safe_one() -> None:
    assert internal_backup_type("daily") == "daily"
    for typed in ("", "every night", "téglalap"):
        mapped = internal_backup_type(typed)
        assert mapped == internal_backup_type(typed) and validate_backup_type(mapped) == mapped
    assert internal_backup_type("") != internal_backup_type(" ")
    order = nova_order("n", SET_ID, {}, backup_type="", rotation=2)
    assert order.backup_type == internal_backup_type("") and order.rotation == 2
