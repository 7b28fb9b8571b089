"""Operator web dashboard: reads the run records (read-only) and serves them to a browser.

``rectalfl dashboard --runs runs/`` (see :mod:`server.dashboard.cli`) serves :func:`create_app`
with uvicorn; ``docs/dashboard.md`` describes the pages and the security model.
"""

from server.dashboard.app import create_app

__all__ = ["create_app"]
