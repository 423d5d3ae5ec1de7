"""The bodies of the jobs that work on one set - verify, revert, delete - wherever they run: the embedded
service's workers, or the agent of the host that holds the set's members (``serve --multi-host``). One body
each, so both modes do exactly the same work and report it in the same shape."""

from __future__ import annotations

from typing import Any

from freezeframe.api.jobs import JobContext
from freezeframe.api.problems import redact
from freezeframe.service import Freezeframe

ON_MEMBERS_HOST = ("verify", "revert", "delete")
"""Kinds a multi-host deployment runs on the host whose repository holds the set's members."""


def run_verify(service: Freezeframe, ctx: JobContext, set_id: str, *, boot: bool) -> dict[str, Any]:
    """Recompute every member's SHA-256 (``boot``: also boot a throw-away clone); the report is the result."""
    ctx.phase("verifying")
    report = service.lifecycle.verify(set_id, boot=boot)
    return {
        "ok": report.ok,
        "booted": report.booted,
        "checks": [
            {"subject": c.subject, "check": c.what, "ok": c.ok, "detail": redact(c.detail)} for c in report.checks
        ],
    }


def run_revert(service: Freezeframe, ctx: JobContext, set_id: str, *, safety: bool) -> dict[str, Any]:
    """Roll the (shut-off) instance back to the set, all disks together; a safety set of its state first."""
    ctx.phase("reverting")
    result = service.lifecycle.revert(set_id, safety=safety)
    return {
        "instance": {"name": result.instance_name, "uuid": result.instance_uuid},
        "set_id": result.set_id,
        "safety_set_id": result.safety_set_id,
        "reverted": sorted(result.reverted),
        "untouched": list(result.untouched),
    }


def run_delete(service: Freezeframe, ctx: JobContext, set_id: str, *, force: bool) -> dict[str, Any]:
    """Remove the set and its data (``force``: flatten copy-on-write dependants into their own disks first)."""
    ctx.phase("deleting")
    result = service.lifecycle.delete(set_id, force=force)
    return {
        "deleted": result.set_id,
        "name": result.set_name,
        "flattened": sorted({d.instance_name for d in result.flattened}),
    }
