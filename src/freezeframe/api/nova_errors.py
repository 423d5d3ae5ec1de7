"""Errors on the Nova surface and the image view in Nova's shape; everywhere else the problem documents.

Each app-wide handler is wrapped: a request under ``/``, ``/v2.1`` or ``/v2`` gets ``{"itemNotFound": {...}}``
with the same status and the same (redacted) message the problem document would carry.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from freezeframe.api.nova import fault_response, on_surface
from freezeframe.api.problems import classify, log, redact

Handler = Callable[[Request, Exception], Awaitable[JSONResponse]]


def _fault_of(request: Request, exc: Exception) -> tuple[int, str]:
    if isinstance(exc, RequestValidationError):
        first: dict[str, Any] = dict(next(iter(exc.errors()), {}))
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "body"
        return 400, redact(f"Invalid input for field/attribute {where}: {first.get('msg', 'invalid')}")
    if isinstance(exc, StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else "the request could not be handled"
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no such resource: {request.method} {request.url.path}"
        return exc.status_code, redact(detail)
    error_id = uuid.uuid4().hex[:12]
    c = classify(exc, error_id)
    if c.status >= 500:
        log.error("error %s on %s %s: %s", error_id, request.method, request.url.path, exc, exc_info=exc)
    return c.status, c.detail


def nova_aware(handler: Handler) -> Handler:
    """``handler`` off the Nova surface; Nova's fault body on it."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        if not on_surface(request):
            return await handler(request, exc)
        status, message = _fault_of(request, exc)
        return fault_response(status, message)

    return handle
