"""The HTTP service: ``freezeframe serve`` (FastAPI + uvicorn), versioned under ``/v1``; see docs/api.md.

``create_app`` and ``ApiConfig`` live in ``freezeframe.api.app``; importing this package stays cheap so the CLI's
``token`` and ``project`` commands do not load the web stack.
"""
