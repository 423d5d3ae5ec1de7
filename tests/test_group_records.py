"""The pure parts around groups: the two-instance ledger's verdict and the catalog's group records."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from freezeframe.adapters.catalog import SqlCatalog
from freezeframe.adapters.group_records import SqlGroups
from freezeframe.errors import GroupNotFound, InvalidRequest
from freezeframe.group_model import Group, GroupMember, GroupSet
from freezeframe.model import Consistency, SetStatus
from freezeframe.testbed.linked_ledger import judge_link


def _journal(*records: int) -> bytes:
    return b"".join(b"%019d\n" % r for r in records)


@pytest.mark.parametrize(
    ("sender", "receiver", "ok"),
    [
        ((1, 2, 3), (1, 2, 3), True),
        ((1, 2, 3, 4), (1, 2, 3), True),
        ((), (), True),
        ((1,), (), True),
        ((1, 2), (1, 2, 3), False),  # B captured later than A
        ((1, 2, 3, 4, 5), (1, 2, 3), False),  # A captured later than B
        ((1, 3), (1,), False),  # a gap in a journal
    ],
)
def test_the_link_verdict(sender: tuple[int, ...], receiver: tuple[int, ...], ok: bool) -> None:
    assert judge_link(_journal(*sender), _journal(*receiver)).ok is ok


def test_a_torn_trailing_record_is_ignored_and_a_missing_journal_fails() -> None:
    verdict = judge_link(_journal(1, 2) + b"00000", _journal(1))
    assert verdict.ok and verdict.sender_last == 2
    assert not judge_link(None, _journal(1)).ok


def test_groups_and_group_sets_round_trip(tmp_path: Path) -> None:
    groups = SqlGroups(SqlCatalog(f"sqlite:///{tmp_path / 'c.sqlite'}"))
    now = datetime.now(UTC)
    members = (GroupMember("u1", "db"), GroupMember("u2", "app"))
    groups.create_group(Group("shop", members, now))
    assert groups.get_group("shop").members == members
    with pytest.raises(InvalidRequest, match="exists already"):
        groups.create_group(Group("shop", (), now))
    groups.set_members("shop", members[::-1])
    assert [m.instance_name for m in groups.get_group("shop").members] == ["app", "db"]
    gs = GroupSet("0123abcd-0000-4000-8000-000000000001", "nightly", "shop", Consistency.FILESYSTEM,
                  SetStatus.CREATING, now, list(members))  # fmt: skip
    groups.add_group_set(gs)
    gs.status, gs.achieved, gs.window_ms = SetStatus.AVAILABLE, Consistency.CRASH, 12.5
    groups.update_group_set(gs)
    for ref in (gs.id, "0123abcd", "nightly"):
        got = groups.get_group_set(ref)
        assert got.achieved is Consistency.CRASH and got.window_ms == 12.5 and got.instances == list(members)
    groups.delete_group("shop")
    with pytest.raises(GroupNotFound):
        groups.get_group("shop")
    assert [g.id for g in groups.list_group_sets("shop")] == [gs.id], "a group set outlives its group"
    groups.delete_group_set(gs.id)
    with pytest.raises(GroupNotFound):
        groups.get_group_set(gs.id)


def test_the_barrier_board_lets_two_hosts_meet_and_keeps_the_first_abort(tmp_path: Path) -> None:
    """The catalog's board, as the hosts' agents use it: two threads meet at ``ready``; an abort reaches both."""
    import threading

    from freezeframe.adapters.barrier_board import SqlBarrierBoard
    from freezeframe.errors import GroupBarrierFailed
    from freezeframe.group_barrier import BarrierTimeouts, HostBarrier

    board = SqlBarrierBoard(SqlCatalog(f"sqlite:///{tmp_path / 'catalog.sqlite'}"))
    timeouts = BarrierTimeouts(ready_s=5.0, poll_s=0.01)
    errors: list[BaseException] = []

    def share(host: str) -> None:
        try:
            HostBarrier(board, "g1", host, ["h1", "h2"], timeouts).ready()
        except BaseException as exc:  # noqa: BLE001 - checked below
            errors.append(exc)

    threads = [threading.Thread(target=share, args=(h,)) for h in ("h1", "h2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert errors == [] and board.state("g1").arrived["ready"] == {"h1", "h2"}
    board.arrive("g1", "h1", "ready")  # twice: harmless
    board.abort("g1", "h2", "its guest shut down")
    board.abort("g1", "h1", "second")
    with pytest.raises(GroupBarrierFailed, match="host h2 aborted the group snapshot: its guest shut down"):
        HostBarrier(board, "g1", "h1", ["h1", "h2"], timeouts).frozen(deadline=float("inf"))
    lonely = HostBarrier(board, "g2", "h1", ["h1", "h2"], BarrierTimeouts(ready_s=0.1, poll_s=0.01))
    with pytest.raises(GroupBarrierFailed, match=r"h2 did not reach 'ready'"):
        lonely.ready()
    assert board.state("g2").aborted_by == "h1"
    board.forget("g1")
    assert board.state("g1") == board.state("never")
