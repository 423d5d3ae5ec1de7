"""The API's listings over the catalog: keyset pages with a next link, filters, project scope in the query, and
the Glance view paged by marker (a real catalog under a scripted service, as in test_api_routes)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from freezeframe.model import SetStatus
from freezeframe.set_query import PROJECT_KEY
from test_api_routes import VM, Api, api
from test_catalog import make_set

__all__ = ["api"]  # fixture

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _sets(a: Api) -> dict[str, list[str]]:
    """Ten sets pinned to alpha, four to beta, three unpinned of VM (mapped to alpha); newest first per owner."""
    made: dict[str, list[str]] = {"alpha": [], "beta": [], "unpinned": []}
    for i in range(17):
        owner = "alpha" if i < 10 else "beta" if i < 14 else "unpinned"
        metadata = {PROJECT_KEY: owner} if owner != "unpinned" else {}
        s = make_set(f"s{i:02d}", created_at=T0 + timedelta(minutes=i), instance=VM.name, instance_uuid=VM.uuid
                     if owner == "unpinned" else str(uuid.uuid4()), metadata=metadata,
                     status=SetStatus.FAILED if i % 4 == 0 else SetStatus.AVAILABLE)  # fmt: skip
        a.service.catalog.add_set(s)
        made[owner].insert(0, s.id)
    return made


def test_pages_follow_the_next_link_within_the_tokens_project(api: Api) -> None:
    made = _sets(api)
    alpha = sorted([*made["alpha"], *made["unpinned"]], key=lambda i: next(
        s.created_at for s in api.service.catalog.load_sets([i])), reverse=True)  # fmt: skip
    seen: list[str] = []
    page = api.client.get("/v1/snapshot-sets", params={"limit": 5, "count": True}, headers=api.as_("alpha")).json()
    assert page["total"] == 13
    while True:
        seen += [s["id"] for s in page["items"]]
        if page["next"] is None:
            assert page["next_cursor"] is None
            break
        assert "count" not in page["next"]
        page = api.client.get(page["next"], headers=api.as_("alpha")).json()
        assert page["total"] is None
    assert seen == alpha
    beta = api.client.get("/v1/snapshot-sets", params={"limit": 50}, headers=api.as_("beta")).json()
    assert [s["id"] for s in beta["items"]] == made["beta"]
    other = api.client.get("/v1/snapshot-sets", params={"project": "beta"}, headers=api.as_("alpha")).json()
    assert other["items"] == []
    admin = api.client.get("/v1/snapshot-sets", params={"project": "alpha", "status": "failed"},
                           headers=api.as_("admin")).json()  # fmt: skip
    assert [s["name"] for s in admin["items"]] == ["s16", "s08", "s04", "s00"]  # s16: unpinned, VM is alpha's


def test_bad_cursor_and_times_are_400(api: Api) -> None:
    bad = api.client.get("/v1/snapshot-sets", params={"cursor": "nope"}, headers=api.as_("admin"))
    assert bad.status_code == 400 and "cursor" in bad.json()["detail"]
    naive = api.client.get("/v1/snapshot-sets", params={"since": "2026-01-01T00:00:00"}, headers=api.as_("admin"))
    assert naive.status_code == 422


def test_since_until_and_kind(api: Api) -> None:
    _sets(api)
    window = api.client.get("/v1/snapshot-sets", params={
        "since": (T0 + timedelta(minutes=3)).isoformat(), "until": (T0 + timedelta(minutes=6)).isoformat(),
    }, headers=api.as_("admin")).json()  # fmt: skip
    assert [s["name"] for s in window["items"]] == ["s05", "s04", "s03"]
    assert api.client.get("/v1/snapshot-sets", params={"kind": "incremental"}, headers=api.as_("admin")).json()[
        "items"] == []  # fmt: skip


def test_glance_images_paged_by_marker_and_scoped(api: Api) -> None:
    made = _sets(api)
    alpha_ids: list[str] = []
    url = "/v2/images?limit=4"
    while url:
        body = api.client.get(url, headers=api.as_("alpha")).json()
        alpha_ids += [i["id"] for i in body["images"]]
        url = body.get("next", "")
    assert sorted(alpha_ids) == sorted([*made["alpha"], *made["unpinned"]]) and len(set(alpha_ids)) == 13
    assert api.client.get(f"/v2/images/{made['beta'][0]}", headers=api.as_("alpha")).status_code == 404
    shown = api.client.get(f"/v2/images/{made['alpha'][0]}", headers=api.as_("alpha")).json()
    assert shown["id"] == made["alpha"][0]
    missing = api.client.get("/v2/images", params={"marker": made["beta"][0]}, headers=api.as_("alpha"))
    assert missing.status_code == 400
