"""Every error the API answers is JSON: ``{"error": "...", "detail": [...]}``.

``error`` is one line for a person; ``detail`` lists what it is about, each an object
(for a refused notification: the item's ``index``, the ``field`` and the ``problem``, in
the words a dead letter would use). Never HTML, never a traceback: an unexpected
failure is logged here and answered 500 ``internal error``.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from notifier.masking import mask_secrets

log = logging.getLogger("notifier.api")


class ErrorBody(BaseModel):
    """What every error answers."""

    error: str
    detail: list[dict[str, Any]] = []


class ApiError(Exception):
    """Raised by a route: answered as ``status`` with this error and detail."""

    def __init__(
        self, status: int, error: str, detail: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(error)
        self.status, self.error, self.detail, self.headers = status, error, detail or [], headers


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` of these error statuses, all with :class:`ErrorBody`."""
    return {status: {"model": ErrorBody, "description": _REASONS.get(status, "error")}
            for status in statuses}


_REASONS = {
    400: "The body is not JSON", 401: "No key, or a key that is unknown or revoked",
    403: "The key lacks the scope", 404: "Not found",
    409: "Too late for that, or a request with the same Idempotency-Key is in flight",
    413: "The body is over the size caps", 422: "Invalid input",
    429: "The key's rate limit is reached (Retry-After says when to try again)",
    503: "The database, broker or state Redis does not answer",
}


def error_response(
    status: int, error: str, detail: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail or []}, status_code=status,
                        headers=headers)


def install(app: FastAPI) -> None:
    """Answer every failure as :class:`ErrorBody`."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    for exc_class, what in _unavailable():
        app.add_exception_handler(exc_class, _unavailable_handler(what))
    app.add_exception_handler(Exception, _internal_error)


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.error, exc.detail, exc.headers)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own: an unknown path (404), a method not allowed (405)."""
    assert isinstance(exc, StarletteHTTPException)
    error = {404: "not found", 405: "method not allowed"}.get(exc.status_code)
    return error_response(exc.status_code, error or str(exc.detail).lower(),
                          headers=getattr(exc, "headers", None))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """A path or query parameter FastAPI refused (a malformed id, a bad filter)."""
    assert isinstance(exc, RequestValidationError)
    detail = [
        {"field": ".".join(str(part) for part in error["loc"]),
         "problem": mask_secrets(str(error["msg"]))[:300]}
        for error in exc.errors()
    ]
    return error_response(422, "invalid request", detail)


def _unavailable() -> list[tuple[type[Exception], str]]:
    from kombu.exceptions import OperationalError as BrokerError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
    from sqlalchemy.exc import OperationalError as DatabaseError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    return [(BrokerError, "the broker"), (DatabaseError, "the database"),
            (PoolTimeout, "the database"), (RedisConnectionError, "the state Redis"),
            (RedisTimeoutError, "the state Redis"), (ConnectionError, "the broker"),
            (TimeoutError, "the broker")]


def _unavailable_handler(what: str) -> Any:
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        log.warning("%s %s: %s does not answer: %s", request.method, request.url.path, what,
                    mask_secrets(str(exc))[:500])
        return error_response(503, f"{what} does not answer; try again",
                              headers={"Retry-After": "1"})

    return handler


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal error")
