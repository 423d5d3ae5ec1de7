"""What every route module shares: the state and caller dependencies, path and paging parameters, the
documented problem responses, and the small helpers that turn results into responses."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from freezeframe.adapters.service_store import TOKEN_PREFIX, Job
from freezeframe.api.access import Principal
from freezeframe.api.cloud_links import keystone_principal
from freezeframe.api.problems import PROBLEM_JSON, unauthorized
from freezeframe.api.schemas import REF_PATTERN, UUID_PATTERN, JobView, Problem
from freezeframe.api.state import AppState
from freezeframe.api.views import job_view

T = TypeVar("T")

_bearer = HTTPBearer(auto_error=False, description="`freezeframe token create` issues tokens")
_auth_token = APIKeyHeader(name="X-Auth-Token", auto_error=False, description="the same tokens, as OpenStack sends")


async def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.ff
    return state


def get_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    x_auth_token: Annotated[str | None, Depends(_auth_token)],
) -> Principal:
    """The token of ``Authorization: Bearer`` or of ``X-Auth-Token`` (how every OpenStack client sends it)."""
    secret = credentials.credentials if credentials is not None and credentials.credentials else x_auth_token
    if not secret:
        raise unauthorized(
            "send an 'Authorization: Bearer <token>' or 'X-Auth-Token: <token>' header; `freezeframe token create` "
            "makes one"
        )
    state: AppState = request.app.state.ff
    token = state.tokens.authenticate(secret)
    if token is not None:
        return Principal.of(token)
    if state.cloud.keystone is not None and not secret.startswith(f"{TOKEN_PREFIX}_"):
        return keystone_principal(state.cloud.keystone, secret)  # one of ours that failed is not Keystone's
    raise unauthorized("the token is unknown or revoked")


StateDep = Annotated[AppState, Depends(get_state)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
InstanceId = Annotated[str, PathParam(pattern=REF_PATTERN, max_length=64, description="instance name or UUID")]
SetId = Annotated[str, PathParam(pattern=UUID_PATTERN, description="snapshot set id")]
JobId = Annotated[str, PathParam(pattern=UUID_PATTERN)]
ImageId = Annotated[str, PathParam(pattern=UUID_PATTERN)]
Limit = Annotated[int, Query(ge=1, le=500)]
Offset = Annotated[int, Query(ge=0, le=1_000_000)]


def problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The problem responses a route documents in /openapi.json (the common ones always)."""
    descriptions = {
        400: "invalid request", 401: "no or bad token", 403: "the token's role does not allow it",
        404: "not found or not visible to this token", 409: "conflict (busy, wrong state)",
        413: "request body too large", 422: "input does not match the schema", 500: "internal error",
        502: "hypervisor error", 503: "catalog unavailable",
    }  # fmt: skip
    schema = {"$ref": "#/components/schemas/Problem"}
    return {
        code: {
            "model": Problem,
            "description": descriptions[code],
            "content": {PROBLEM_JSON: {"schema": schema}},
        }
        for code in sorted({400, 401, 422, 500, 502, 503, *codes})
    }


def json_response(model: BaseModel) -> Response:
    """Already a validated model: serialize once (FastAPI would dump, re-validate and dump it again)."""
    return Response(content=model.model_dump_json(), media_type="application/json")


def page(items: Sequence[T], limit: int, offset: int) -> tuple[list[T], int | None]:
    chunk = list(items[offset : offset + limit])
    return chunk, (offset + limit if offset + limit < len(items) else None)


def accepted(response: Response, job: Job) -> JobView:
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_view(job)
