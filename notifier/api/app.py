"""The API's ASGI app: ``create_app()``, the factory ``notifier api`` serves.

FastAPI on uvicorn (uvloop and httptools): the OpenAPI description comes from the same
pydantic models the pipeline validates with, the blocking parts (Postgres, kombu) run
in its thread pool, and uvicorn runs several processes on one port
(``NOTIFIER_API_WORKERS``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from notifier.api import (
    cors,
    dead_letters,
    demo,
    errors,
    events,
    inbox,
    inbox_stream,
    notifications,
    preferences,
    suppressions,
    tokens,
)
from notifier.logs import configure
from notifier.schemas import NotificationIn
from notifier.settings import get_settings

API_VERSION = "1"


def create_app() -> FastAPI:
    """The app: every area's router, JSON errors, the OpenAPI description."""
    settings = get_settings()
    configure(settings.log_level, None, settings.log_format == "json",
              settings.log_max_line_bytes)
    app = FastAPI(
        title="notifier", version=API_VERSION,
        description="Send notifications, follow and cancel them, edit recipients'"
                    " preferences, list dead letters, take providers' receipts, manage"
                    " the suppression list (docs/api.md).",
        docs_url=None, redoc_url=None, lifespan=_lifespan,
    )
    errors.install(app)
    app.router.routes.append(notifications.send_route)  # first: the hot path
    for area in (notifications, preferences, dead_letters, inbox, tokens, events,
                 suppressions):
        app.include_router(area.router)
    inbox_stream.install(app)
    demo.install(app)
    cors.install(app, settings.api_cors_origins)
    app.add_api_route("/v1/health", health, methods=["GET"], tags=["health"],
                      summary="The API process answers (no key needed)")
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """At shutdown: the live inbox feed (started by the first stream) closes."""
    yield
    await inbox_stream.close(app)


class Health(BaseModel):
    status: str


def health() -> Health:
    return Health(status="ok")


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's description, plus the bodies the routes read themselves (bounded, see
    ``notifier.api.body``) as components: the task contract's model and the preferences'."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description,
                         routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (NotificationIn, preferences.PreferencesChange, events.EventIn,
                  suppressions.SuppressionIn):
        found = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(found.pop("$defs", {}))
        components[model.__name__] = found
    app.openapi_schema = schema
    return schema
