"""What the test bed puts in Keystone after ``keystone-manage bootstrap``, with python-keystoneclient as the
bootstrap admin: a domain with two projects and a user per role, the service users, the ``image`` and ``compute``
services with their endpoints. Bootstrap already made the ``admin``, ``member`` and ``reader`` roles."""

from __future__ import annotations

from typing import Any

from keystoneauth1 import session as ks_session
from keystoneauth1.identity import v3
from keystoneclient.v3 import client as ks_client

from freezeframe.testbed.openstack_conf import DOMAIN, OTHER_PROJECT, PROJECT, REGION, SERVICE_PROJECT, USERS

SERVICES = (("glance", "image", "glance_url", ""), ("nova", "compute", "serve_url", "/v2.1"))
"""(name, type, record key of its URL, path after it): freezeframe's ``serve`` answers as ``compute``."""


def bootstrap_identity(record: dict[str, Any]) -> dict[str, str]:
    """Everything the clients and services need; returns project name -> id."""
    auth = v3.Password(
        auth_url=record["auth_url"], username="admin", password=record["passwords"]["admin"], project_name="admin",
        user_domain_id="default", project_domain_id="default",
    )  # fmt: skip
    keystone = ks_client.Client(session=ks_session.Session(auth=auth), interface="public")
    roles = {role.name: role for role in keystone.roles.list()}
    domain = keystone.domains.create(DOMAIN, description="freezeframe test bed")
    projects = {name: keystone.projects.create(name, domain) for name in (PROJECT, OTHER_PROJECT)}
    for user in USERS:
        made = keystone.users.create(user.cloud, domain=domain, password=record["passwords"][user.cloud])
        keystone.roles.grant(roles[user.role], user=made, project=projects[user.project])
    service_project = keystone.projects.create(SERVICE_PROJECT, "default")
    for name in ("glance", "freezeframe"):
        made = keystone.users.create(name, domain="default", password=record["passwords"][name])
        keystone.roles.grant(roles["admin"], user=made, project=service_project)
    for name, kind, key, path in SERVICES:
        service = keystone.services.create(name, type=kind)
        for interface in ("public", "internal", "admin"):
            keystone.endpoints.create(service, record[key] + path, interface=interface, region=REGION)
    return {name: project.id for name, project in projects.items()}
