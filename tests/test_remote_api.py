"""``/v1/remotes``, ``/v1/snapshot-sets/{id}/copies`` and ``/v1/policies`` against a real ``serve`` process and the
test bed's radosgw (no guest: the set is made on disk, the policy's instance does not exist so its run fails)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from freezeframe import wiring
from freezeframe.config import Settings
from freezeframe.testbed.api_server import issue_token, running_server
from freezeframe.testbed.radosgw import S3Access
from remote_helpers import MiB, bucket_url, make_set


def test_remotes_copies_and_policies_over_http(s3: S3Access, tmp_path: Path) -> None:
    home = tmp_path / "home"
    with wiring.open_service(Settings.from_env(home=home)) as ff:
        made = make_set(ff, writes=((0x61, 0, 2 * MiB),))
    admin, reader = issue_token(home, "admin"), issue_token(home, "reader", "team")
    url = bucket_url()
    with running_server(home) as server, server.client(admin) as client, server.client(reader) as looker:
        body = {"name": "site", "url": url, "endpoint": s3.s3_endpoint}
        assert looker.post("/v1/remotes", json=body).status_code == 403
        created = client.post("/v1/remotes", json=body)
        assert created.status_code == 201, created.text
        assert created.json()["url"] == url and created.json()["encrypted"] is False
        assert client.post("/v1/remotes", json=body).status_code == 400  # exists already
        bad = client.post("/v1/remotes", json={**body, "name": "bad", "url": "http://nope"})
        assert bad.status_code == 400 and "must look like" in bad.json()["detail"]
        assert [r["name"] for r in looker.get("/v1/remotes").json()] == ["site"]

        job = client.post(f"/v1/snapshot-sets/{made.id}/copies", json={"remote": "site"})
        assert job.status_code == 202, job.text
        done = server.wait_job(client, job.json()["id"])
        assert done["state"] == "succeeded" and done["result"]["sets_copied"] == [made.id], done
        assert client.get("/v1/remotes/site").json()["sets"] == [made.id]
        assert client.post(f"/v1/snapshot-sets/{made.id}/copies", json={"remote": "nowhere"}).status_code == 404

        policy = {"name": "nightly", "instance": "ffs3-no-such-vm", "cron": "0 2 * * *", "keep": {"daily": 7}}
        assert looker.get("/v1/policies").status_code == 403
        made_policy = client.post("/v1/policies", json=policy)
        assert made_policy.status_code == 201, made_policy.text
        assert made_policy.json()["schedule"] == "cron 0 2 * * *" and made_policy.json()["keep"]["daily"] == 7
        assert client.post("/v1/policies", json={**policy, "name": "x", "every": "1h"}).status_code == 400
        run = client.post("/v1/policies/nightly/run")
        assert run.status_code == 202
        failed = server.wait_job(client, run.json()["id"])
        assert failed["state"] == "failed" and failed["kind"] == "policy"
        view: dict[str, Any] = client.get("/v1/policies/nightly").json()
        for _ in range(50):
            if view["last_outcome"]:
                break
            time.sleep(0.1)
            view = client.get("/v1/policies/nightly").json()
        assert view["last_outcome"] == "failed" and "ffs3-no-such-vm" in view["last_error"], view
        assert view["last_job_id"] == failed["id"]
        assert client.post("/v1/policies/nightly/pause").json()["paused"] is True
        assert client.post("/v1/policies/nightly/resume").json()["paused"] is False
        assert client.delete("/v1/policies/nightly").status_code == 204
        assert client.get("/v1/policies/nightly").status_code == 404
        assert client.delete("/v1/remotes/site").status_code == 204
        assert client.get("/v1/remotes").json() == []
