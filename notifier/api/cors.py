"""Cross-origin requests from the browser pages of ``NOTIFIER_API_CORS_ORIGINS``.

Starlette's ``CORSMiddleware``, configured for how browsers use this API: no credentials
(a recipient token travels in ``Authorization`` or ``?token=``, never in a cookie, so a
page of another origin can never ride on a user's session), the methods and request
headers our routes read, and only ``Retry-After`` exposed to the page (nothing secret).
Unset, no middleware is installed and no CORS header is ever sent. A refused preflight
is answered as every error is, in JSON; no ``Access-Control-*`` header ever goes to
another origin.
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import Message, Send

from notifier.api.errors import error_response

METHODS = ["GET", "POST", "PUT"]
HEADERS = ["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID"]
EXPOSED = ["Retry-After"]
#: Seconds a browser may cache a preflight's answer.
MAX_AGE = 600


def install(app: FastAPI, origins: tuple[str, ...]) -> None:
    """Answer CORS for ``origins`` (already checked by the settings); nothing if empty."""
    if origins:
        app.add_middleware(_JsonCors, allow_origins=list(origins), allow_credentials=False,
                           allow_methods=METHODS, allow_headers=HEADERS,
                           expose_headers=EXPOSED, max_age=MAX_AGE)


class _JsonCors(CORSMiddleware):
    """Starlette's, but silent to origins not allowed (it would still send them
    ``Access-Control-Expose-Headers``) and answering refused preflights in JSON."""

    async def send(self, message: Message, send: Send, request_headers: Headers) -> None:
        if message["type"] == "http.response.start" and not self.is_allowed_origin(
                request_headers.get("origin", "")):
            message.setdefault("headers", [])
            MutableHeaders(scope=message).add_vary_header("Origin")
            await send(message)
            return
        await super().send(message, send, request_headers)

    def preflight_response(self, request_headers: Headers) -> Response:
        answer = super().preflight_response(request_headers)
        if answer.status_code == 200:
            return answer
        refused = bytes(answer.body).decode().removeprefix("Disallowed CORS ")
        return error_response(400, f"cross-origin request refused ({refused} not allowed:"
                                   " NOTIFIER_API_CORS_ORIGINS)", headers={"Vary": "Origin"})
