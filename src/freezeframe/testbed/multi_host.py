"""The PostgreSQL database a multi-host test bed shares (catalog + job queue)."""

from __future__ import annotations

import os

from freezeframe.testbed.instance import TestbedError


def catalog_url() -> str:
    url = os.environ.get("FREEZEFRAME_CATALOG_URL", "")
    if not url.startswith("postgresql"):
        raise TestbedError("set FREEZEFRAME_CATALOG_URL to a PostgreSQL database")
    return url
