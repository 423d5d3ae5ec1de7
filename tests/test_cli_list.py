"""``freezeframe list`` over a real catalog (SQLite and PostgreSQL): newest page, cursor, --all streamed, --json
array, filters, --since/--until, and one-line errors for bad input."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cli_helpers import pipe, run_cli
from freezeframe.adapters.catalog import SqlCatalog
from freezeframe.errors import InvalidRequest
from freezeframe.model import SetStatus, SnapshotSet
from freezeframe.set_query import parse_time
from pg_helpers import catalog_url, pg_server, pg_url
from test_catalog import make_set

__all__ = ["catalog_url", "pg_server", "pg_url"]  # fixtures

NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture
def made(catalog_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[SnapshotSet]]:
    """45 sets an hour apart, newest first; every third failed; the CLI pointed at their catalog."""
    sets = [
        make_set(f"s{i:02d}", created_at=NOW - timedelta(hours=i), status=SetStatus.FAILED if i % 3 == 0 else
                 SetStatus.AVAILABLE, metadata={"env": "prod" if i < 10 else "test"})
        for i in range(45)
    ]  # fmt: skip
    with SqlCatalog(catalog_url) as catalog:
        for s in sets:
            catalog.add_set(s)
    monkeypatch.setenv("FREEZEFRAME_CATALOG_URL", catalog_url)
    monkeypatch.setenv("FREEZEFRAME_HOME", str(tmp_path / "home"))
    pipe(monkeypatch)
    yield sets


def ids(out: str) -> list[str]:
    return [line.split("\t")[0] for line in out.splitlines()]


def test_newest_page_then_the_cursor_then_all(capsys: pytest.CaptureFixture[str], made: list[SnapshotSet]) -> None:
    first = run_cli(capsys, "list")
    assert first.code == 0, first.err
    assert ids(first.out) == [s.id for s in made[:20]]
    assert "more: 25 older set(s)" in first.err
    cursor = first.err.split("--cursor ")[1].split()[0]
    second = run_cli(capsys, "list", "--cursor", cursor, "--limit", "30")
    assert ids(second.out) == [s.id for s in made[20:]] and "more:" not in second.err
    everything = run_cli(capsys, "list", "--all", "--count")
    assert ids(everything.out) == [s.id for s in made] and "total: 45" in everything.err


def test_json_is_one_array_paged_or_streamed(capsys: pytest.CaptureFixture[str], made: list[SnapshotSet]) -> None:
    page = json.loads(run_cli(capsys, "list", "--json", "-n", "5").out)
    assert [s["id"] for s in page] == [s.id for s in made[:5]] and "hardware" not in page[0]
    streamed = json.loads(run_cli(capsys, "list", "--json", "--all").out)
    assert [s["id"] for s in streamed] == [s.id for s in made]
    empty = run_cli(capsys, "list", "--json", "--all", "--status", "deleting")
    assert json.loads(empty.out) == []


def test_filters_and_time_range(capsys: pytest.CaptureFixture[str], made: list[SnapshotSet]) -> None:
    failed = run_cli(capsys, "list", "--all", "--status", "failed")
    assert ids(failed.out) == [s.id for i, s in enumerate(made) if i % 3 == 0]
    prod = run_cli(capsys, "list", "--meta", "env=prod")
    assert ids(prod.out) == [s.id for s in made[:10]]
    recent = run_cli(capsys, "list", "--since", "5h")  # set 5 was made 5 h before the test started: just out
    assert ids(recent.out) == [s.id for s in made[:5]]
    window = run_cli(capsys, "list", "--since", (NOW - timedelta(hours=12)).isoformat(),
                     "--until", (NOW - timedelta(hours=10)).isoformat())  # fmt: skip
    assert ids(window.out) == [made[11].id, made[12].id]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cursor", "garbage"], "cursor 'garbage' is not one a listing returned"),
        (["--since", "yesterday"], "--since 'yesterday' is not a time"),
        (["--kind", "differential"], "kind 'differential' is not one of full, incremental"),
        (["--limit", "0"], "greater than or equal to 1"),
    ],
)
def test_bad_input_is_one_line(
    capsys: pytest.CaptureFixture[str], made: list[SnapshotSet], args: list[str], message: str
) -> None:
    result = run_cli(capsys, "list", *args)
    assert result.code != 0 and message in result.err and "Traceback" not in result.err
    assert len(result.err.strip().splitlines()) == 1, result.err


def test_parse_time_forms() -> None:
    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    assert parse_time("36h", "--since", now) == now - timedelta(hours=36)
    assert parse_time("2w", "--since", now) == now - timedelta(weeks=2)
    assert parse_time("2026-11-30", "--since") == datetime(2026, 11, 30, tzinfo=UTC)
    assert parse_time("2026-11-30T08:00:00+01:00", "--since") == datetime(2026, 11, 30, 7, 0, tzinfo=UTC)
    with pytest.raises(InvalidRequest):
        parse_time("7 days", "--since")
