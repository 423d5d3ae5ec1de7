"""The Nova-compatible surface at ``/v2.1``: servers (our instances) and the createImage/createBackup actions.

Thin: it reads what Nova's clients send (microversion, Nova's validation and its leniency), turns it into the same
``ops.compute`` order the ``/v1`` routes queue, and answers in Nova's shapes (``nova_views``). The image an action
makes is the snapshot set (same id), readable at ``/v2/images`` (``routes_glance``).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import replace
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request, Response
from fastapi.responses import JSONResponse

from freezeframe.api.deps import PrincipalDep, StateDep
from freezeframe.api.glance_results import GlancePublisher, glance_properties
from freezeframe.api.nova import (
    IMAGE_ID_IN_BODY,
    IMAGE_PREFIX,
    NovaFault,
    base_url,
    microversion,
    version_document,
    version_headers,
    versions_document,
)
from freezeframe.api.nova_views import server_detail, server_summary
from freezeframe.api.problems import ApiProblem
from freezeframe.api.routes_snapshots import submit_order
from freezeframe.api.state import AppState
from freezeframe.errors import InvalidRequest
from freezeframe.model import Instance
from freezeframe.ops.compute import Order, nova_order
from freezeframe.ops.glance_records import GLANCE_KEY

router = APIRouter(tags=["nova"])
_UUID = re.compile(r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$")
_DIGITS = re.compile(r"^\s*\d{1,6}\s*$")


@router.get("/", include_in_schema=False)
def versions(request: Request) -> JSONResponse:
    return JSONResponse(versions_document(request), status_code=200)


@router.get("/v2.1", include_in_schema=False)
@router.get("/v2.1/", include_in_schema=False)
def version(request: Request) -> JSONResponse:
    return JSONResponse(version_document(request))


def _answer(request: Request, content: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(content, status_code=status, headers=version_headers(microversion(request)))


def _server(state: AppState, principal: PrincipalDep, server_id: str) -> tuple[Instance, str | None]:
    """Nova finds servers by UUID only; another project's server is as missing as an unknown one."""
    if not _UUID.match(server_id):
        raise NovaFault(404, f"Instance {server_id[:64]} could not be found.")
    try:
        instance, project, _ = state.instance(str(uuid.UUID(server_id)), principal)
    except ApiProblem as exc:
        if exc.status == 404:
            raise NovaFault(404, f"Instance {server_id} could not be found.") from None
        raise
    return instance, project


@router.get("/v2.1/servers/detail", include_in_schema=False)
def list_servers_detail(request: Request, state: StateDep, principal: PrincipalDep, name: str | None = None) -> Any:
    version = microversion(request)
    servers = [server_detail(i, p, base_url(request), version) for i, p in _matching(state, principal, name)]
    return _answer(request, {"servers": servers})


@router.get("/v2.1/servers", include_in_schema=False)
def list_servers(request: Request, state: StateDep, principal: PrincipalDep, name: str | None = None) -> Any:
    servers = [server_summary(i, base_url(request)) for i, _ in _matching(state, principal, name)]
    return _answer(request, {"servers": servers})


def _matching(state: AppState, principal: PrincipalDep, name: str | None) -> list[tuple[Instance, str | None]]:
    """Nova's ``name`` filter is a regular expression; here it is a plain substring (no pattern from a client runs
    on the server), which answers what clients send: the exact name, then matched exactly on their side."""
    found = state.visible_instances(principal)
    return [(i, p) for i, p in found if name is None or name in i.name]


@router.get("/v2.1/servers/{server_id}", include_in_schema=False)
def show_server(server_id: str, request: Request, state: StateDep, principal: PrincipalDep) -> Any:
    version = microversion(request)
    instance, project = _server(state, principal, server_id)
    return _answer(request, {"server": server_detail(instance, project, base_url(request), version)})


@router.post("/v2.1/servers/{server_id}/action", include_in_schema=False)
def server_action(
    server_id: str,
    request: Request,
    state: StateDep,
    principal: PrincipalDep,
    body: Annotated[Any, Body()] = None,
) -> Response:
    """createImage / createBackup as Nova validates and answers them (202; before 2.45 the image's URL in
    ``Location``, from 2.45 ``{"image_id": …}``). createImage captures every disk, like Nova's snapshot of a
    volume-backed server."""
    version = microversion(request)
    action, args = _action(body)
    instance, project = _server(state, principal, server_id)
    principal.require_write()
    set_id = str(uuid.uuid4())
    try:
        if action == "createImage":
            order = nova_order(_name(args), set_id, _metadata(args))
            kind = "snapshot"
        else:
            rotation = _rotation(args)
            backup_type = args.get("backup_type")
            if not isinstance(backup_type, str):
                raise NovaFault(400, "Invalid input for field/attribute backup_type: a string is required")
            order = nova_order(_name(args), set_id, _metadata(args), backup_type=backup_type, rotation=rotation)
            kind = "backup"
    except InvalidRequest as exc:
        raise NovaFault(400, str(exc)) from None
    glance = state.cloud.glance
    if glance is None:
        submit_order(state, principal, instance, project, order, {action: args}, kind, set_id=set_id)
        image_id, image_root = set_id, f"{base_url(request)}{IMAGE_PREFIX}"
    else:
        image_id, image_root = _submit_to_glance(state, principal, instance, project, order, action, args, kind, set_id)
    headers = version_headers(version)
    if version >= IMAGE_ID_IN_BODY:
        return JSONResponse({"image_id": image_id}, status_code=202, headers=headers)
    headers["Location"] = f"{image_root}/images/{image_id}"
    return Response(status_code=202, headers=headers)


def _submit_to_glance(
    state: AppState, principal: PrincipalDep, instance: Instance, project: str | None, order: Order, action: str,
    args: dict[str, Any], kind: str, set_id: str,
) -> tuple[str, str]:  # fmt: skip
    """Nova's order: the Glance image first (``queued``, its id answered), the job captures and uploads it."""
    glance = state.cloud.glance
    assert glance is not None
    backup_type = args.get("backup_type") if kind == "backup" else None
    properties = glance_properties(instance, set_id, kind, backup_type, _glance_metadata(_metadata(args)))
    publisher = GlancePublisher.reserve(glance, state.service, _name(args), project, instance, properties)
    order = replace(order, metadata={**order.metadata, GLANCE_KEY: publisher.image_id})
    try:
        submit_order(state, principal, instance, project, order, {action: args}, kind, set_id=set_id,
                     publisher=publisher)  # fmt: skip
    except BaseException:
        publisher.discard()
        raise
    return publisher.image_id, f"{glance.endpoint}{IMAGE_PREFIX}"


_GLANCE_CORE = frozenset({
    "id", "name", "status", "owner", "visibility", "protected", "size", "virtual_size", "checksum", "container_format",
    "disk_format", "created_at", "updated_at", "tags", "locations", "direct_url", "self", "file", "schema", "min_disk",
    "min_ram", "os_hidden", "os_hash_algo", "os_hash_value", "stores",
})  # fmt: skip


def _glance_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """The request's metadata as image properties (as Nova copies it), minus names Glance keeps for itself."""
    return {k: v for k, v in metadata.items() if k not in _GLANCE_CORE and not k.startswith("os_glance")}


_ALLOWED = {"createImage": {"name", "metadata"}, "createBackup": {"name", "backup_type", "rotation", "metadata"}}
_REQUIRED = {"createImage": ("name",), "createBackup": ("name", "backup_type", "rotation")}


def _action(body: Any) -> tuple[str, dict[str, Any]]:
    if not isinstance(body, dict) or len(body) != 1:
        raise NovaFault(400, "Malformed request body: one action object is expected")
    action, args = next(iter(body.items()))
    if action not in _ALLOWED:
        raise NovaFault(400, f"There is no such action: {str(action)[:64]}")
    if not isinstance(args, dict):
        raise NovaFault(400, f"Invalid input for field/attribute {action}. Value: {str(args)[:64]}. not an object")
    extra = sorted(set(args) - _ALLOWED[action])
    if extra:
        raise NovaFault(
            400,
            f"Invalid input for field/attribute {action}. Additional properties are not allowed "
            f"({', '.join(repr(e) for e in extra)} {'was' if len(extra) == 1 else 'were'} unexpected)",
        )
    missing = [k for k in _REQUIRED[action] if k not in args]
    if missing:
        raise NovaFault(400, f"Invalid input for field/attribute {action}. '{missing[0]}' is a required property")
    return action, args


def _name(args: dict[str, Any]) -> str:
    name = args.get("name")
    if not isinstance(name, str):
        raise NovaFault(400, "Invalid input for field/attribute name: a string is required")
    return name


def _metadata(args: dict[str, Any]) -> dict[str, str]:
    """Nova's metadata: an object of strings; ``null`` (which clients send) is no metadata."""
    metadata = args.get("metadata")
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise NovaFault(400, "Invalid input for field/attribute metadata: an object of strings is required")
    return metadata


def _rotation(args: dict[str, Any]) -> int:
    """A non-negative integer, or its digits as a string (Nova's non_negative_integer)."""
    value = args.get("rotation")
    if isinstance(value, bool) or not (
        (isinstance(value, int) and 0 <= value <= 1000) or (isinstance(value, str) and _DIGITS.match(value))
    ):
        raise NovaFault(400, f"Invalid input for field/attribute rotation. Value: {str(value)[:32]}.")
    rotation = int(value)
    if rotation > 1000:
        raise NovaFault(400, "Invalid input for field/attribute rotation: at most 1000")
    return rotation
