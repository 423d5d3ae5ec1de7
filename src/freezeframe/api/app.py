"""The FastAPI application: ``/v1`` routes (one module per resource) over the ``Freezeframe`` service, and the
Nova-compatible surface (``/``, ``/v2.1``) with its read-only image view (``/v2/images``) for OpenStack clients.

Routes are plain ``def`` functions (FastAPI runs them in its thread pool) because everything below them blocks:
SQLite, libvirt, qemu-img. Long operations become jobs (``202`` + ``Location: /v1/jobs/{id}``); reads and
deletes answer directly. The HTTP layer only translates: requests to service calls, results to JSON, errors to
problem documents (``problems.py``, from the error table in ``freezeframe.errors``). ``create_app`` builds the
app; its lifespan opens the service, takes the per-home service lock, repairs what a killed predecessor left,
and starts the job workers.

There is no ``/docs`` or ``/redoc``: their pages load scripts from a public CDN, which these hosts often cannot
reach and which should not run next to a bearer token. ``/openapi.json`` describes the API for any local tool.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from freezeframe import __version__
from freezeframe.api import (
    routes_glance,
    routes_groups,
    routes_hosts,
    routes_images,
    routes_instances,
    routes_jobs,
    routes_nova,
    routes_policies,
    routes_remotes,
    routes_sets,
    routes_snapshots,
)
from freezeframe.api.nova import NovaFault, handle_nova_fault
from freezeframe.api.nova_errors import nova_aware
from freezeframe.api.problems import (
    ApiProblem,
    BodyLimit,
    handle_api_problem,
    handle_freezeframe_error,
    handle_http_exception,
    handle_unexpected,
    handle_validation_error,
)
from freezeframe.api.schemas import Health
from freezeframe.api.state import AppState
from freezeframe.config import Settings
from freezeframe.errors import FreezeframeError

MAX_BODY_BYTES = 64 * 1024


@dataclass(frozen=True)
class ApiConfig:
    settings: Settings
    workers: int = 2
    """Jobs running at the same time (each snapshot also holds its instance's lock)."""
    max_body_bytes: int = MAX_BODY_BYTES
    shutdown_grace_s: float = 60.0
    """How long a stop waits for running jobs (longer than the freeze cap, so no guest stays frozen)."""
    multi_host: bool = False
    """A stateless replica of a multi-host deployment: agents run the jobs, PostgreSQL holds catalog and queue."""


def create_app(config: ApiConfig) -> FastAPI:
    """The ASGI app; the service opens in its lifespan, so building the app touches nothing."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = AppState(config.settings, config.workers, config.shutdown_grace_s, config.multi_host)
        try:
            await run_in_threadpool(state.start)
        except BaseException:
            await run_in_threadpool(state.close)
            raise
        app.state.ff = state
        try:
            yield
        finally:
            await run_in_threadpool(state.close)

    app = FastAPI(
        title="freezeframe",
        version=__version__,
        summary="Instance-level snapshot sets of libvirt/QEMU VMs: every disk at one point in time.",
        openapi_url="/openapi.json",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.add_exception_handler(ApiProblem, nova_aware(handle_api_problem))
    app.add_exception_handler(RequestValidationError, nova_aware(handle_validation_error))
    app.add_exception_handler(StarletteHTTPException, nova_aware(handle_http_exception))
    app.add_exception_handler(FreezeframeError, nova_aware(handle_freezeframe_error))
    app.add_exception_handler(NovaFault, handle_nova_fault)
    app.add_exception_handler(Exception, nova_aware(handle_unexpected))
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)

    @app.get("/healthz", response_model=Health, tags=["service"])
    def health() -> Health:
        """Unauthenticated liveness: the service has started (repair at start-up is done)."""
        return Health(status="ok", version=__version__)

    for module in (
        routes_instances, routes_snapshots, routes_jobs, routes_sets, routes_images, routes_nova, routes_glance,
        routes_remotes, routes_policies, routes_hosts,
    ):  # fmt: skip
        app.include_router(module.router)
    app.include_router(routes_groups.router)
    return app
