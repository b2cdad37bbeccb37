"""``/v1/notifications``: send one or a list, read one's status, cancel one.

Sending checks every item with the task contract's schema (``notifier.schemas``,
through :func:`notifier.client.validated`: one schema, the same words as a dead letter)
and publishes only if all pass, through the client's publish path: a list many per
message (:func:`notifier.client.publish_many`, in the thread pool), a single
notification handed to :mod:`notifier.api.publisher`, which publishes the single sends
waiting at once together. On RabbitMQ each publish waits for the broker's confirm, so a
202 means the broker holds the notifications. A single send, the hot path, is checked
on the event loop (one notification: cheaper than a thread hop) and answered with bytes
encoded here, not through pydantic. With an ``Idempotency-Key`` header a
retry is answered with the first request's ids (``notifier.api.idempotency``).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette import types as asgi
from starlette.concurrency import run_in_threadpool

from notifier import client, records
from notifier.api import idempotency, publisher
from notifier.api.body import read_json
from notifier.api.callbacks import with_key_callback
from notifier.api.errors import ApiError, responses
from notifier.api.keys import authorized_header, bearer, require
from notifier.pipeline.cancel import cancel_by
from notifier.schemas import NotificationError, NotificationIn, to_message
from notifier.settings import get_settings
from notifier.storage.api_keys import KeyInfo, Scope
from notifier.storage.state import state_redis

router = APIRouter(prefix="/v1/notifications", tags=["notifications"])


class Sent(BaseModel):
    """The ids of the notifications sent, in the order given."""

    ids: list[uuid.UUID]


class DeliveryView(BaseModel):
    id: uuid.UUID
    channel: str
    status: str
    attempts: int
    last_error: str | None
    next_attempt_at: datetime | None
    sent_at: datetime | None
    #: The channel's provider that sent it (``0:smtp.example.com:465``), once sent.
    provider: str | None = None
    #: What the provider's last receipt said, and when (docs/receipts.md).
    provider_detail: str | None = None
    provider_status_at: datetime | None = None
    #: Set when this is the delivery of the digest the notification was folded into.
    digest_id: uuid.UUID | None
    updated_at: datetime


class NotificationView(BaseModel):
    id: uuid.UUID
    recipient_id: str
    type: str
    priority: str
    channels: list[str] | None
    status: str
    #: Why it has this status (suppressed by a preference, cancelled on request, ...).
    reason: str | None
    idempotency_key: str | None
    digest_id: uuid.UUID | None
    send_at: datetime | None
    created_at: datetime
    updated_at: datetime
    deliveries: list[DeliveryView]


class Cancelled(BaseModel):
    id: uuid.UUID
    status: str


def _openapi_extra() -> dict[str, Any]:
    """What FastAPI would have read from a signature of dependencies: the key, the
    ``Idempotency-Key`` header; and the request body, the contract's model alone or in a
    list (read by the route itself, bounded: ``notifier.api.body``)."""
    ref = {"$ref": "#/components/schemas/NotificationIn"}
    header = {"anyOf": [{"type": "string", "minLength": 1,
                         "maxLength": idempotency.HEADER_CHARS}, {"type": "null"}],
              "description": _HEADER_DESCRIPTION, "title": idempotency.HEADER}
    return {
        "security": [{bearer.scheme_name: []}],
        "parameters": [{"name": idempotency.HEADER, "in": "header", "required": False,
                        "schema": header, "description": _HEADER_DESCRIPTION}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "anyOf": [ref, {"type": "array", "items": ref, "minItems": 1}],
        }}}},
    }


_HEADER_DESCRIPTION = ("A repeat within the dedup window with the same body is answered"
                       " with the first request's ids (header `Idempotent-Replayed: true`);"
                       " with another body 422; while the first is in flight 409.")


class _DirectRoute(APIRoute):
    """A route FastAPI describes in OpenAPI like any other but does not serve: the
    endpoint takes the Request and checks the key and the header itself, and is called
    as a plain ASGI app. For the single send, the hot path, FastAPI's per-request
    machinery (dependency solving, exit stacks, a second exception wrapper: the app's
    ``ExceptionMiddleware`` answers the endpoint's errors all the same) cost more CPU
    than validating the notification."""

    def __init__(self, path: str, endpoint: Callable[[Request], Awaitable[Response]],
                 **options: Any) -> None:
        super().__init__(path, endpoint, **options)

        async def app(scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
            response = await endpoint(Request(scope, receive, send))
            await response(scope, receive, send)

        self.app = app


async def send(request: Request) -> Response:
    """Body: a notification (the task contract's fields) or a list of them. Every item
    is checked first; if any is refused, the answer is 422 naming each item's index,
    field and problem, and nothing of the request is published."""
    key = await authorized_header(request.headers.get("authorization"), Scope.SEND)
    idempotency_key = request.headers.get(idempotency.HEADER)
    if idempotency_key is not None:
        _header_length_checked(idempotency_key)
    settings = get_settings()
    raw = await read_json(request, settings.max_message_bytes)
    single = not isinstance(raw, list)
    items: list[Any] = with_key_callback([raw] if single else raw, key)
    if not items:
        raise ApiError(422, "the list is empty", [_problem(None, "body: must hold at least"
                                                                  " one notification")])
    if len(items) > settings.max_message_notifications:
        raise ApiError(413, f"{len(items)} notifications in one request, more than the limit"
                            f" of {settings.max_message_notifications}"
                            " (NOTIFIER_MAX_MESSAGE_NOTIFICATIONS)",
                       [{"items": len(items), "limit": settings.max_message_notifications}])
    if idempotency_key is None and single:  # the hot path: no thread pool, no pydantic out
        [notification] = _checked(items, single, None)
        await publisher.publish(notification)
        return _sent([str(notification.id)])
    if idempotency_key is None:  # a list: checked in the pool, published by the lanes
        messages = await run_in_threadpool(_checked_messages, items, None)
        await publisher.publish_messages(messages)
        return _sent([message["id"] for message in messages])
    header = idempotency.checked_header(idempotency_key)
    answer = await run_in_threadpool(_send_once, key.id, header, raw,
                                     settings.dedup_window, items, single)
    if isinstance(answer, idempotency.Replay):
        return _sent(answer.ids, replayed=True)
    return _sent(answer)


#: ``POST /v1/notifications``, added to the app's own routes (an included router's
#: matching costs as much again as this route's).
send_route = _DirectRoute(
    "/v1/notifications", send, methods=["POST"], tags=["notifications"], status_code=202,
    response_model=Sent, openapi_extra=_openapi_extra(),
    summary="Send one notification, or a list of them",
    responses=responses(400, 401, 403, 409, 413, 422, 429, 503),
)


def _header_length_checked(value: str) -> None:
    """The bounds FastAPI checked when the header was a declared parameter, answered in
    its words (``notifier.api.errors``); :func:`idempotency.checked_header` checks the
    rest."""
    if not value:
        problem = "String should have at least 1 character"
    elif len(value) > idempotency.HEADER_CHARS:
        problem = f"String should have at most {idempotency.HEADER_CHARS} characters"
    else:
        return
    raise ApiError(422, "invalid request", [{"field": f"header.{idempotency.HEADER}",
                                             "problem": problem}])


def _sent(ids: list[str], replayed: bool = False) -> Response:
    """:class:`Sent`, encoded here: the ids are our own UUIDs' text, nothing to escape."""
    body = b'{"ids":["' + '","'.join(ids).encode() + b'"]}'
    headers = {idempotency.REPLAYED_HEADER: "true"} if replayed else None
    return Response(body, status_code=202, media_type="application/json", headers=headers)


def _send_once(
    key_id: int, header: str, raw: Any, window: int, items: list[Any], single: bool,
) -> list[str] | idempotency.Replay:
    """The first answer under this key, or publish and keep the answer (in the thread
    pool); a failure keeps nothing."""
    redis = state_redis()
    claim = idempotency.begin(redis, key_id, header, raw, window)
    if isinstance(claim, idempotency.Replay):
        return claim
    try:
        ids = _check_and_publish(items, single, (key_id, header))
    except Exception:
        if claim is not None:
            idempotency.release(redis, claim)
        raise
    if claim is not None:
        idempotency.store(redis, claim, ids)
    return ids


def _check_and_publish(
    items: list[Any], single: bool, header_key: tuple[int, str] | None,
) -> list[str]:
    """Check every item, then publish all of them or none (in the thread pool)."""
    if single:
        [notification] = _checked(items, single, header_key)
        client.publish_one(notification)
        return [str(notification.id)]
    return client.publish_messages(_checked_messages(items, header_key))


def _checked_messages(
    items: list[Any], header_key: tuple[int, str] | None,
) -> list[dict[str, Any]]:
    """A list's messages, ids made, every item checked by the task contract's schema, or
    the 422 naming each problem. All at once when all pass (the usual case:
    :func:`client.validated_messages`); else each alone, for its own reasons."""
    try:
        keyed = [_with_key(item, index, header_key) for index, item in enumerate(items)]
    except NotificationError:
        keyed = None
    messages = None if keyed is None else client.validated_messages(keyed)
    if messages is None:
        messages = [to_message(notification)
                    for notification in _checked(items, False, header_key)]
    return messages


def _checked(
    items: list[Any], single: bool, header_key: tuple[int, str] | None,
) -> list[NotificationIn]:
    """Every item checked by the task contract's schema, or the 422 naming each problem."""
    checked: list[NotificationIn] = []
    problems: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        try:
            checked.append(client.validated(_with_key(item, None if single else index,
                                                      header_key)))
        except NotificationError as exc:
            problems.extend(_problem(index, problem) for problem in exc.problems)
    if problems:
        count = len({problem["index"] for problem in problems})
        raise ApiError(422, "invalid notification" if single else
                       f"{count} of {len(items)} notifications are invalid; none was sent",
                       problems)
    return checked


def _with_key(item: Any, index: int | None, header_key: tuple[int, str] | None) -> Any:
    """The item with the ``Idempotency-Key`` header as its ``idempotency_key``, in the
    API key's namespace (``header_key`` is the key's id and the header)."""
    if not isinstance(item, dict):
        return item
    own = item.get("idempotency_key")
    if isinstance(own, str) and own.strip().startswith(idempotency.ITEM_KEY_PREFIX):
        raise NotificationError([f"idempotency_key: may not start with"
                                 f" {idempotency.ITEM_KEY_PREFIX!r}, kept for the"
                                 " Idempotency-Key header's keys"])
    if header_key is None:
        return item
    key_id, header = header_key
    if own is not None and own != (header if index is None else f"{header}:{index}"):
        raise NotificationError(["idempotency_key: give it in the Idempotency-Key header or"
                                 " in the notification, not both"])
    return {**item, "idempotency_key": idempotency.item_key(key_id, header, index)}


def _problem(index: int | None, problem: str) -> dict[str, Any]:
    """``"title: is required"`` as ``{"index", "field", "problem", "message"}``."""
    field, _, what = problem.partition(": ")
    return {"index": 0 if index is None else index, "field": field, "problem": what,
            "message": problem if index is None else f"[{index}] {problem}"}


@router.get(
    "/{notification_id}", response_model=NotificationView,
    summary="A notification's status, reason, and deliveries",
    responses=responses(401, 403, 404, 422, 429, 503),
)
def show(
    notification_id: uuid.UUID, key: Annotated[KeyInfo, Depends(require(Scope.READ))],
) -> dict[str, Any]:
    """404 also for a notification just sent and not stored yet (moments, normally)."""
    found = records.notification(notification_id)
    if found is None:
        raise ApiError(404, f"no notification {notification_id}")
    return found


@router.post(
    "/{notification_id}/cancel", response_model=Cancelled,
    summary="Cancel a notification that has not gone out yet",
    responses=responses(401, 403, 404, 409, 422, 429, 503),
)
def cancel(
    notification_id: uuid.UUID, key: Annotated[KeyInfo, Depends(require(Scope.SEND))],
) -> Cancelled:
    """Works while it waits in an aggregation window or its deliveries are held (quiet
    hours, ``send_at``); 409 once something of it was sent or it is in a digest."""
    outcome = cancel_by(str(notification_id), None)
    if outcome.cancelled:
        return Cancelled(id=notification_id, status="cancelled")
    if outcome.status == "not found":
        raise ApiError(404, f"no notification {notification_id}")
    raise ApiError(409, f"cannot cancel {notification_id}: it is {outcome.status} already",
                   [{"status": outcome.status}])
