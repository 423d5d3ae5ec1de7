"""Errors as RFC 9457 problem details, with host paths and libvirt internals kept out of what clients see.

Every error leaves the service as ``application/problem+json`` (``type``, ``title``, ``status``, ``detail``).
Typed freezeframe errors keep their actionable message, minus paths and URIs; errors from the hypervisor or the
catalog, and anything unexpected, get a generic detail with an error id that is also in the server log.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from freezeframe.errors import by_slug, category

log = logging.getLogger("freezeframe.api")

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "https://freezeframe.dev/problems/"

_URI_RE = re.compile(r"\b[a-z][a-z0-9+.-]*://\S*", re.IGNORECASE)
_PATH_RE = re.compile(r"(?<![\w.\-])/[^\s'\"`,;()\[\]{}<>]+")


def redact(message: str) -> str:
    """Replace URIs and absolute paths: a client may read the outcome, not the host's layout."""
    message = _URI_RE.sub("<uri>", message)
    return _PATH_RE.sub("<path>", message)


class ApiProblem(Exception):
    """Raised by the routes for a problem they have decided on (status, slug, title, detail)."""

    def __init__(self, status: int, slug: str, title: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.title = title
        self.detail = detail
        self.extra = extra


def _problem(slug: str, detail: str, **extra: Any) -> ApiProblem:
    status, title = describe(slug)
    return ApiProblem(status, slug, title, detail, **extra)


def unauthorized(detail: str) -> ApiProblem:
    return _problem("unauthorized", detail)


def forbidden(detail: str) -> ApiProblem:
    return _problem("forbidden", detail)


def not_found(what: str) -> ApiProblem:
    """The same answer whether it does not exist or belongs to another project: nothing leaks either way."""
    return _problem("not-found", f"{what} does not exist or is not visible to this token")


def conflict(detail: str, **extra: Any) -> ApiProblem:
    return _problem("conflict", detail, **extra)


def invalid(detail: str) -> ApiProblem:
    return _problem("invalid-request", detail)


@dataclass(frozen=True)
class Classified:
    status: int
    slug: str
    title: str
    detail: str


def classify(exc: BaseException, error_id: str | None = None) -> Classified:
    """What a client sees of an error, from the error table (``freezeframe.errors``).

    A public category keeps its message (redacted); hypervisor, catalog and unexpected errors get a generic one.
    """
    if isinstance(exc, ApiProblem):
        return Classified(exc.status, exc.slug, exc.title, exc.detail)
    row = category(exc)
    if row.public:
        return Classified(row.http_status, row.slug, row.title, redact(str(exc)) or type(exc).__name__)
    ref = f" (error id {error_id}; the server log has the details)" if error_id else " (see the server log)"
    return Classified(row.http_status, row.slug, row.title, f"{row.title.lower()}: the details are not shown" + ref)


HTTP_ONLY: dict[str, tuple[int, str]] = {
    "bad-request": (400, "Bad request"),
    "unauthorized": (401, "Authentication required"),
    "forbidden": (403, "Not allowed"),
    "method-not-allowed": (405, "Method not allowed"),
    "conflict": (409, "Conflict"),
    "too-large": (413, "Request body too large"),
    "validation-error": (422, "Invalid input"),
    "http-error": (500, "HTTP error"),
}
"""Problems only the HTTP layer decides on (``ApiProblem``); every other slug is a row of the error table."""


def describe(slug: str) -> tuple[int, str]:
    """(status, title) of a slug stored earlier, e.g. in a failed job's row."""
    row = by_slug(slug)
    if row is not None:
        return row.http_status, row.title
    return HTTP_ONLY.get(slug, (500, "Operation failed"))


def problem_body(
    status: int, slug: str, title: str, detail: str, instance: str | None = None, **extra: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {"type": TYPE_BASE + slug, "title": title, "status": status, "detail": detail}
    if instance is not None:
        body["instance"] = instance
    body.update({k: v for k, v in extra.items() if v is not None})
    return body


def problem_response(
    status: int, slug: str, title: str, detail: str, instance: str | None = None, **extra: Any
) -> JSONResponse:
    headers = {"WWW-Authenticate": 'Bearer realm="freezeframe"'} if status == 401 else None
    return JSONResponse(
        problem_body(status, slug, title, detail, instance, **extra),
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=headers,
    )


# ---- handlers ----------------------------------------------------------------------------------------------


async def handle_api_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiProblem)
    return problem_response(exc.status, exc.slug, exc.title, exc.detail, request.url.path, **exc.extra)


async def handle_freezeframe_error(request: Request, exc: Exception) -> JSONResponse:
    error_id = uuid.uuid4().hex[:12]
    c = classify(exc, error_id)
    if c.status >= 500:
        log.error("error %s on %s %s: %s", error_id, request.method, request.url.path, exc, exc_info=exc)
    return problem_response(c.status, c.slug, c.title, c.detail, request.url.path)


async def handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
    error_id = uuid.uuid4().hex[:12]
    log.error("unexpected error %s on %s %s", error_id, request.method, request.url.path, exc_info=exc)
    c = classify(exc, error_id)
    return problem_response(c.status, c.slug, c.title, c.detail, request.url.path)


async def handle_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    slug = {404: "not-found", 405: "method-not-allowed", 413: "too-large", 400: "bad-request"}.get(
        exc.status_code, "http-error"
    )
    detail = exc.detail if isinstance(exc.detail, str) else "the request could not be handled"
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no such endpoint: {request.method} {request.url.path} (see /openapi.json)"
    response = problem_response(exc.status_code, slug, describe(slug)[1], redact(detail), request.url.path)
    for key, value in (exc.headers or {}).items():
        response.headers[key] = value
    return response


async def handle_validation_error(request: Request, exc: Exception) -> JSONResponse:
    """422 listing each bad field and why; the offending input is not echoed back."""
    assert isinstance(exc, RequestValidationError)
    errors = [
        {
            "loc": [str(part) for part in e.get("loc", ())],
            "msg": str(e.get("msg", "invalid")),
            "type": str(e.get("type")),
        }
        for e in exc.errors()
    ]
    summary = "; ".join(f"{'.'.join(e['loc'][1:] or e['loc'])}: {e['msg']}" for e in errors[:5])
    return problem_response(
        422,
        "validation-error",
        describe("validation-error")[1],
        redact(summary or "the request does not match the API schema"),
        request.url.path,
        errors=errors,
    )


# ---- request body limit ------------------------------------------------------------------------------------

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyLimit:
    """Refuse bodies over ``max_bytes`` with 413, by Content-Length up front or while the body streams in."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0:
                    path = scope.get("path")
                    await problem_response(
                        400, "bad-request", describe("bad-request")[1], "invalid Content-Length", path
                    )(scope, receive, send)
                    return
                if declared > self.max_bytes:
                    await self._too_large(scope, receive, send)
                    return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise StarletteHTTPException(413, self._detail())
            return message

        await self.app(scope, limited, send)

    def _detail(self) -> str:
        return f"request bodies are limited to {self.max_bytes} bytes"

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        title = describe("too-large")[1]
        response = problem_response(413, "too-large", title, self._detail(), scope.get("path"))
        await response(scope, receive, send)
