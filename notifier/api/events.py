"""``/v1/events``: receipts in, what providers say became of our messages.

* ``POST /v1/events/{channel}``: our own format, for any provider a relay translates
  (or a caller's own system): ``{"delivery_id", "event", "permanent", "detail"}``. It
  needs a key with the ``events`` scope (or ``admin``): a relay that posts events can
  then neither send notifications nor read anyone's, and a leaked relay key can do no
  more than report outcomes, which only ever move a sent delivery forward.
* ``POST /v1/events/twilio``: Twilio's status callbacks, signed by Twilio.
* ``POST /v1/events/mailgun``: Mailgun's webhooks, signed by Mailgun.

The two providers' routes answer 404 until their settings are there, and take no API
key (a provider cannot send one): their signature is the authentication
(``notifier.api.providers``). Every event ends in
``notifier.pipeline.receipts.apply_receipt``; every refusal is counted
(``notifier_receipts_refused_total``) and answered with one line naming the problem.
Mailgun retries any answer but 200 and 406 for hours, so an event it should not send
again (an unknown delivery) is answered 406 there.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from notifier.api import metrics
from notifier.api.body import read_json
from notifier.api.errors import ApiError, responses
from notifier.api.keys import require
from notifier.api.providers import (
    MAX_FORM_FIELDS,
    ProviderEvent,
    Refused,
    check_mailgun,
    check_twilio,
    mailgun_event,
    twilio_event,
)
from notifier.pipeline.receipts import Receipt, ReceiptOutcome, apply_receipt
from notifier.settings import CHANNEL_NAMES, get_settings
from notifier.storage.api_keys import KeyInfo, Scope
from notifier.storage.db import session_scope
from notifier.storage.state import state_redis

log = logging.getLogger("notifier.api")
router = APIRouter(prefix="/v1/events", tags=["events"])

#: The largest event body read (Mailgun's carry the message's headers: a few KB).
MAX_EVENT_BYTES = 64 * 1024


#: Mailgun's webhook body as far as we read it (its other fields pass untouched).
_MAILGUN_BODY: dict[str, Any] = {
    "type": "object", "required": ["signature", "event-data"],
    "properties": {
        "signature": {"type": "object", "required": ["timestamp", "token", "signature"],
                      "properties": {name: {"type": "string"}
                                     for name in ("timestamp", "token", "signature")}},
        "event-data": {"type": "object", "required": ["event"],
                       "properties": {"event": {"type": "string"}}},
    },
}


class EventIn(BaseModel):
    """One provider event in our own words."""

    model_config = ConfigDict(extra="forbid")

    delivery_id: uuid.UUID
    event: Literal["delivered", "bounced", "complained", "failed"]
    #: For bounced and failed: the address itself is the problem (a hard bounce).
    permanent: StrictBool = False
    #: The provider's reason (an SMTP answer, an error code).
    detail: str = Field("", max_length=500)
    #: When it happened, if the provider said (else: when we take it).
    occurred_at: datetime | None = None


class EventOut(BaseModel):
    delivery_id: uuid.UUID
    #: applied (the status moved, or the address was suppressed), unchanged (a
    #: duplicate, a late or a soft event), ignored (an event we do not act on).
    result: str
    #: The delivery's status after it.
    status: str | None
    #: This event put the address on the suppression list.
    suppressed: bool


@router.post(
    "/twilio", response_model=EventOut,
    summary="Twilio's status callbacks (signed; 404 until configured)",
    responses=responses(401, 404, 409, 413, 422, 503),
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/x-www-form-urlencoded": {"schema": {"type": "object", "properties": {
            name: {"type": "string"} for name in (
                "MessageSid", "MessageStatus", "ErrorCode", "To", "From", "AccountSid")}}}}}},
)
async def twilio(
    request: Request,
    delivery_id: Annotated[str | None, Query(
        max_length=40, description="Ours, in the StatusCallback URL Twilio signs")] = None,
) -> EventOut:
    settings = get_settings()
    public, token = settings.events_public_url, _twilio_token()
    if not public or not token:
        raise _refused("twilio", Refused(
            404, "not configured", "Twilio events need NOTIFIER_EVENTS_PUBLIC_URL and"
            " NOTIFIER_CHANNELS__SMS set"))
    body = await _read_form(request)
    url = public.rstrip("/") + request.url.path
    if request.url.query:
        url += "?" + request.url.query
    try:
        check_twilio(token, url, body, request.headers.get("x-twilio-signature"))
        event = twilio_event(delivery_id, dict(body))
    except Refused as refused:
        raise _refused("twilio", refused) from None
    return await run_in_threadpool(_apply, "sms", "twilio", event)


@router.post(
    "/mailgun", response_model=EventOut,
    summary="Mailgun's webhooks (signed; 404 until configured)",
    responses=responses(400, 401, 404, 406, 409, 413, 422, 503),
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
        "schema": _MAILGUN_BODY}}}},
)
async def mailgun(request: Request) -> EventOut:
    key = get_settings().mailgun_webhook_signing_key
    if key is None:
        raise _refused("mailgun", Refused(
            404, "not configured", "Mailgun events need NOTIFIER_MAILGUN_WEBHOOK_SIGNING_KEY"))
    body = await read_json(request, MAX_EVENT_BYTES)
    try:
        token = check_mailgun(body, key.get_secret_value(), get_settings().events_max_age)
        event = mailgun_event(body)
    except Refused as refused:
        raise _refused("mailgun", refused) from None
    return await run_in_threadpool(_apply_once, token, event)


@router.post(
    "/{channel}", response_model=EventOut,
    summary="A provider's event about one delivery, in our own words (events scope)",
    responses=responses(400, 401, 403, 404, 409, 413, 422, 429, 503),
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/EventIn"}}}}},
)
async def generic(
    request: Request,
    channel: Annotated[str, Path(max_length=32, pattern=r"^[a-z_]+$")],
    key: Annotated[KeyInfo, Depends(require(Scope.EVENTS))],
) -> EventOut:
    if channel not in CHANNEL_NAMES:
        raise _refused("api", Refused(404, "unknown channel", f"no channel {channel!r}"))
    raw = await read_json(request, MAX_EVENT_BYTES)
    try:
        given = EventIn.model_validate(raw)
    except ValidationError as exc:
        metrics.RECEIPTS_REFUSED.labels("api", "malformed").inc()
        raise ApiError(422, "invalid event", [
            {"field": ".".join(str(p) for p in error["loc"]) or "body",
             "problem": error["msg"][:300]} for error in exc.errors()
        ]) from None
    event = ProviderEvent(given.delivery_id, given.event, given.permanent, given.detail,
                          given.occurred_at, given.event)
    return await run_in_threadpool(_apply, channel, "api", event)


def _apply(channel: str, source: str, event: ProviderEvent) -> EventOut:
    """Apply it (one transaction) and count it; refusals as :class:`ApiError`."""
    if event.event is None:
        metrics.RECEIPTS.labels(channel, source, event.name, "ignored").inc()
        return EventOut(delivery_id=event.delivery_id, result="ignored", status=None,
                        suppressed=False)
    receipt = Receipt(event.delivery_id, channel, event.event, event.permanent, event.detail,
                      event.at, event.address)
    with session_scope() as session:
        outcome = apply_receipt(session, receipt, get_settings())
    if outcome.result == "unknown delivery":
        status = 406 if source == "mailgun" else 404
        raise _refused(source, Refused(status, "unknown delivery",
                                       f"no {channel} delivery {event.delivery_id}"))
    if outcome.result == "not sent":
        raise _refused(source, Refused(
            409, "not sent", f"delivery {event.delivery_id} is {outcome.status}: a receipt"
            " only follows a sent delivery"))
    _count(channel, source, event, outcome)
    return EventOut(delivery_id=event.delivery_id, result=outcome.result,
                    status=outcome.status, suppressed=outcome.suppressed)


def _apply_once(token: str, event: ProviderEvent) -> EventOut:
    """Mailgun's: refused as a replay if its token was seen within
    ``events_max_age``; the token is forgotten again if the event could not be applied,
    so that Mailgun's retry is taken."""
    state = state_redis()
    seen = f"notifier.events.mailgun.{token}"
    ttl = max(int(get_settings().events_max_age * 2), 1)
    if not state.set(seen, 1, nx=True, ex=ttl):
        raise _refused("mailgun", Refused(409, "replayed", "signature.token: seen before"))
    try:
        return _apply("email", "mailgun", event)
    except ApiError as refused:
        if refused.status >= 500:
            state.delete(seen)
        raise
    except Exception:
        state.delete(seen)
        raise


def _count(channel: str, source: str, event: ProviderEvent, outcome: ReceiptOutcome) -> None:
    metrics.RECEIPTS.labels(channel, source, event.event or event.name, outcome.result).inc()
    if outcome.suppressed:
        why = "complaint" if event.event == "complained" else (
            "bounce" if event.permanent else "soft-bounces")
        metrics.SUPPRESSIONS.labels(channel, why).inc()


def _refused(source: str, refused: Refused) -> ApiError:
    metrics.RECEIPTS_REFUSED.labels(source, refused.reason).inc()
    log.info("%s event refused (%s): %s", source, refused.reason, refused.message)
    return ApiError(refused.status, refused.message, [{"reason": refused.reason}])


async def _read_form(request: Request) -> list[tuple[str, str]]:
    """The form-encoded body, bounded (size and field count)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_EVENT_BYTES):
        raise _refused("twilio", Refused(413, "malformed", f"the body is over {MAX_EVENT_BYTES}"
                                                          " bytes"))
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_EVENT_BYTES:
            raise _refused("twilio", Refused(413, "malformed",
                                             f"the body is over {MAX_EVENT_BYTES} bytes"))
    try:
        fields = parse_qsl(body.decode("utf-8"), keep_blank_values=True,
                           max_num_fields=MAX_FORM_FIELDS)
    except (UnicodeDecodeError, ValueError):
        raise _refused("twilio", Refused(422, "malformed", "the body is not a form of at most"
                                         f" {MAX_FORM_FIELDS} fields")) from None
    return fields


def _twilio_token() -> str | None:
    """The auth token of the SMS channel's URL, which Twilio signs with."""
    from notifier.channels import channel_class

    url = get_settings().channels.get("sms")
    if not url:
        return None
    channel: Any = channel_class("sms")(url)
    return str(channel.auth_token) or None

