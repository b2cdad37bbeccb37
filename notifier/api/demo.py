"""``/inbox/demo``: a page showing one recipient's inbox live, for development only.

Served only with ``NOTIFIER_API_DEMO=true`` (404 otherwise, and absent from the OpenAPI
description). The page is one static file shipped in the package
(``static/inbox-demo.html``: plain JS, no build step, no secret in it); it asks
``/inbox/demo/token?recipient=…`` for a recipient token, which this route mints for
anyone who asks. That is what makes it a demo: a real page gets its token from its own
backend, which checks who the user is first (``docs/api.md``).

The page's inline script and style are allowed by their hashes in a
``Content-Security-Policy``: nothing else runs on it, whatever a message holds.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from importlib.resources import files
from typing import Annotated

from fastapi import APIRouter, FastAPI, Query
from fastapi.responses import HTMLResponse, JSONResponse

from notifier.api.errors import ApiError
from notifier.pipeline.recipient_tokens import mint
from notifier.settings import get_settings

router = APIRouter(prefix="/inbox/demo", include_in_schema=False)

PAGE = "static/inbox-demo.html"


def install(app: FastAPI) -> None:
    """Add the demo's routes when ``NOTIFIER_API_DEMO`` is on (else they are 404)."""
    if get_settings().api_demo:
        app.include_router(router)


@router.get("")
def demo_page() -> HTMLResponse:
    html, policy = _page()
    return HTMLResponse(html, headers={
        "Content-Security-Policy": policy, "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
    })


@router.get("/token")
def demo_token(
    recipient: Annotated[str, Query(min_length=1, max_length=255,
                                    pattern=r"^[^\x00-\x1f\x7f]+$")],
) -> JSONResponse:
    """A recipient token for anyone who asks: the demo's whole point, and its danger."""
    ttl = get_settings().api_token_ttl
    try:
        token = mint(recipient, ttl)
    except ValueError as exc:
        raise ApiError(422, "invalid request", [
            {"field": "recipient", "problem": str(exc).partition(": ")[2]}]) from None
    return JSONResponse({"token": token, "expires_in": ttl},
                        headers={"Cache-Control": "no-store"})


@cache
def _page() -> tuple[str, str]:
    """The page and the policy allowing exactly its inline script and style."""
    html = (files("notifier.api") / PAGE).read_text(encoding="utf-8")
    scripts = _hashes(html, "script")
    styles = _hashes(html, "style")
    policy = (f"default-src 'none'; script-src {scripts}; style-src {styles};"
              " connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none';"
              " frame-ancestors 'none'")
    return html, policy


def _hashes(html: str, tag: str) -> str:
    found = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
    return " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()}'"
        for text in found)
