"""The HTTP service: ``freezeframe serve`` (FastAPI + uvicorn), versioned under ``/v1``; see docs/api.md."""

from freezeframe.api.app import ApiConfig, create_app

__all__ = ["ApiConfig", "create_app"]
