"""``/v1/recipients/{id}/preferences``: the recipient's fields and preferences, the
model ``notifier recipients set|show`` edits (``notifier.pipeline.preferences``).

``PUT`` changes the fields it names and leaves the others as they are, exactly as the
CLI's ``set`` does: ``null`` clears a recipient field or restores a preference's
default, ``addresses`` is merged per channel (``null`` removes one). It creates the
recipient if missing, and checks the whole result before writing anything (422 naming
each bad field). Addresses that are URLs are shown masked, as the CLI shows them.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from pydantic import BaseModel, ConfigDict, create_model
from starlette.concurrency import run_in_threadpool

from notifier import records
from notifier.api.body import read_json
from notifier.api.errors import ApiError, responses
from notifier.api.keys import require
from notifier.masking import mask_address
from notifier.pipeline.preferences import RECIPIENT_FIELDS, Preferences
from notifier.schemas import NotificationError, RecipientIn
from notifier.storage.api_keys import KeyInfo, Scope

router = APIRouter(prefix="/v1/recipients", tags=["recipients"])

#: Largest preferences body: a few addresses, opt-outs and quiet spans.
MAX_BODY_BYTES = 64 * 1024

#: A recipient's id as ``notifier.schemas.Identifier`` allows it: no control characters.
RecipientId = Annotated[
    str, Path(min_length=1, max_length=255, pattern=r"^[^\x00-\x1f\x7f]+$"),
]


def _optional(model: type[BaseModel], names: list[str]) -> dict[str, Any]:
    return {name: (model.model_fields[name].rebuild_annotation() | None, None)
            for name in names}


#: The body of PUT, for OpenAPI: every field of the model the CLI edits, each optional
#: (the checks are :func:`notifier.pipeline.preferences.set_preferences`'s, not these).
PreferencesChange: type[BaseModel] = create_model(
    "PreferencesChange", __config__=ConfigDict(extra="forbid"),
    **_optional(RecipientIn, list(RECIPIENT_FIELDS)),
    **_optional(Preferences, list(Preferences.model_fields)),
)

#: What GET and PUT answer: the recipient's id and fields, and every preference.
RecipientPreferences: type[BaseModel] = create_model(  # type: ignore[call-overload]
    "RecipientPreferences", id=(str, ...), timezone=(str, ...),
    addresses=(dict[str, str], ...),
    **_optional(RecipientIn, [name for name in RECIPIENT_FIELDS
                              if name not in ("timezone", "addresses")]),
    **{name: (field.rebuild_annotation(), field.default)
       for name, field in Preferences.model_fields.items()},
)


def _body_schema() -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/PreferencesChange"}}}}}


@router.get(
    "/{recipient_id}/preferences", response_model=RecipientPreferences,
    summary="A recipient's fields and preferences (defaults filled in)",
    responses=responses(401, 403, 404, 422, 429, 503),
)
def get_preferences(
    recipient_id: RecipientId, key: Annotated[KeyInfo, Depends(require(Scope.READ))],
) -> dict[str, Any]:
    found = records.get_preferences(recipient_id)
    if found is None:
        raise ApiError(404, f"no recipient {recipient_id!r}")
    return _masked(found)


@router.put(
    "/{recipient_id}/preferences", response_model=RecipientPreferences,
    openapi_extra=_body_schema(),
    summary="Change a recipient's fields and preferences (those named; creates it)",
    responses=responses(400, 401, 403, 413, 422, 429, 503),
)
async def put_preferences(
    recipient_id: RecipientId, request: Request,
    key: Annotated[KeyInfo, Depends(require(Scope.SEND))],
) -> dict[str, Any]:
    changes = await read_json(request, MAX_BODY_BYTES)
    if not isinstance(changes, dict):
        raise _invalid(["body: must be a JSON object of the fields to change"])
    if "recipient_id" in changes:  # the path names it; records' own argument
        raise _invalid(["recipient_id: is not a known field"])
    try:
        stored = await run_in_threadpool(lambda: records.set_preferences(recipient_id,
                                                                         **changes))
    except NotificationError as exc:
        raise _invalid(exc.problems) from None
    return _masked(stored)


def _invalid(problems: list[str]) -> ApiError:
    return ApiError(422, "invalid preferences", [
        {"field": field, "problem": problem, "message": line}
        for line in problems for field, _, problem in [line.partition(": ")]
    ])


def _masked(found: dict[str, Any]) -> dict[str, Any]:
    """URL addresses may carry secrets (tokens in a webhook's path): masked."""
    return {**found, "addresses": {channel: mask_address(str(address))
                                   for channel, address in found["addresses"].items()}}
