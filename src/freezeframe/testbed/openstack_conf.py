"""The configuration files of the OpenStack test bed: Keystone, Glance and the clients' ``clouds.yaml``.

Keystone: SQLite, fernet tokens, an in-process cache (without one every authenticated call re-reads the
assignments: seconds per call on a loaded host). Glance: SQLite, the file store, keystonemiddleware with its own
service user. Everything on 127.0.0.1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

REGION = "RegionOne"
DOMAIN = "freezeframe"
PROJECT = "ff-demo"
OTHER_PROJECT = "ff-other"
SERVICE_PROJECT = "service"


@dataclass(frozen=True)
class CloudUser:
    """One user of the test bed and the cloud name it has in ``clouds.yaml``."""

    cloud: str
    project: str
    role: str


USERS = (
    CloudUser("ff-admin", PROJECT, "admin"),
    CloudUser("ff-member", PROJECT, "member"),
    CloudUser("ff-reader", PROJECT, "reader"),
    CloudUser("ff-other", OTHER_PROJECT, "member"),
)
MEMBER_CLOUD = "ff-member"


def keystone_conf(state: Path) -> str:
    return f"""[DEFAULT]
log_file = {state / "keystone-app.log"}
[database]
connection = sqlite:///{state / "keystone.sqlite"}
[token]
provider = fernet
[fernet_tokens]
key_repository = {state / "fernet-keys"}
[fernet_receipts]
key_repository = {state / "fernet-keys"}
[credential]
key_repository = {state / "credential-keys"}
[cache]
enabled = true
backend = dogpile.cache.memory
"""


def glance_conf(state: Path, port: int, auth_url: str, password: str) -> str:
    keystone = auth_url.removesuffix("/v3")
    return f"""[DEFAULT]
log_file = {state / "glance-app.log"}
bind_host = 127.0.0.1
bind_port = {port}
workers = 1
enabled_backends = file:file
[database]
connection = sqlite:///{state / "glance.sqlite"}
[glance_store]
default_backend = file
[file]
filesystem_store_datadir = {state / "images"}
[os_glance_staging_store]
filesystem_store_datadir = {state / "staging"}
[os_glance_tasks_store]
filesystem_store_datadir = {state / "tasks"}
[paste_deploy]
flavor = keystone
config_file = /etc/glance/glance-api-paste.ini
[keystone_authtoken]
www_authenticate_uri = {keystone}
auth_url = {keystone}
auth_type = password
project_domain_name = Default
user_domain_name = Default
project_name = {SERVICE_PROJECT}
username = glance
password = {password}
[oslo_concurrency]
lock_path = {state / "locks"}
"""


def clouds_yaml(auth_url: str, passwords: dict[str, str]) -> str:
    """A stock ``clouds.yaml``: password auth, one cloud per user; the endpoints come from Keystone's catalog.
    Written as JSON, which is YAML too (no YAML writer needed)."""
    clouds = {
        user.cloud: {
            "auth": {
                "auth_url": auth_url,
                "username": user.cloud,
                "password": passwords[user.cloud],
                "project_name": user.project,
                "user_domain_name": DOMAIN,
                "project_domain_name": DOMAIN,
            },
            "region_name": REGION,
            "interface": "public",
            "identity_api_version": 3,
        }
        for user in USERS
    }
    return json.dumps({"clouds": clouds}, indent=2) + "\n"
