"""``notifier webhooks secret``: a receiver's signing secret."""

from __future__ import annotations

import json
from datetime import UTC

import click

from notifier.ops.cli.common import EXIT_USAGE, fail, friendly_errors, when
from notifier.settings import get_settings


@click.group()
def webhooks() -> None:
    """Webhook receivers' signing secrets."""


@webhooks.group("secret")
def webhook_secret() -> None:
    """A receiver's own signing secret (each recipient with a webhook has one)."""


@webhook_secret.command("show")
@click.argument("recipient")
@click.option("--json", "as_json", is_flag=True, help="Also when it was made and rotated.")
@friendly_errors
def show_webhook_secret(recipient: str, as_json: bool) -> None:
    """Print RECIPIENT's signing secret (made now if it has none yet).

    Give it to the receiver: it verifies each request's X-Notifier-Signature with it.
    With ``notifier callbacks secret``, the only commands that print a secret.
    """
    from notifier.storage.db import session_scope
    from notifier.storage.webhook_secrets import secret_info

    with session_scope() as session:
        info = secret_info(session, recipient)
    if info is None:
        _no_recipient(recipient)
        return
    if not as_json:
        click.echo(info.secret)
        return
    click.echo(json.dumps({
        "recipient": info.recipient_id, "secret": info.secret,
        "created_at": info.created_at, "rotated_at": info.rotated_at,
        "previous_valid_until": info.previous_valid_until,
    }, default=str, indent=2))


@webhook_secret.command("rotate")
@click.argument("recipient")
@click.option("--overlap", help="How long the previous secret keeps signing too, beside the"
              " new one: 24h, 90m, 0 for not at all [NOTIFIER_WEBHOOK_SECRET_OVERLAP].")
@friendly_errors
def rotate_webhook_secret(recipient: str, overlap: str | None) -> None:
    """Give RECIPIENT a new signing secret.

    During the overlap every request carries two signatures, by the new secret and by
    the previous one, so the receiver can switch to the new one without losing
    messages. Print the new one with `notifier webhooks secret show RECIPIENT`.
    """
    from datetime import timedelta

    from notifier.pipeline.rules import parse_duration
    from notifier.storage.db import session_scope
    from notifier.storage.webhook_secrets import rotate_secret

    if overlap is None:
        span = timedelta(seconds=get_settings().webhook_secret_overlap)
    elif overlap.strip() in ("0", "0s"):
        span = timedelta(0)
    else:
        try:
            span = parse_duration(overlap.strip())
        except ValueError as exc:
            fail(f"--overlap: {exc}", EXIT_USAGE)
            return
    with session_scope() as session:
        info = rotate_secret(session, recipient, span)
    if info is None:
        _no_recipient(recipient)
        return
    until = (f"the previous one also signs until"
             f" {when(info.previous_valid_until.astimezone(UTC))} UTC"
             if info.previous_valid_until else "the previous one no longer signs")
    click.echo(f"rotated the webhook secret of {recipient}: {until};"
               f" print the new one with `notifier webhooks secret show {recipient}`")


def _no_recipient(recipient: str) -> None:
    fail(f"no recipient {recipient!r}; create one with"
         f" `notifier recipients set {recipient} --address webhook=URL`", EXIT_USAGE)


@click.group()
def callbacks() -> None:
    """Status callbacks' signing secrets (docs/callbacks.md)."""


@callbacks.command("secret")
@click.argument("url")
@friendly_errors
def show_callback_secret(url: str) -> None:
    """Print the signing secret of the receiver of callback URL (made now if it has
    none). One per origin (scheme, host and port): every callback URL on that server
    shares it. The receiver verifies X-Notifier-Signature with it, as a webhook's.
    With ``notifier webhooks secret show``, the only commands that print a secret."""
    from notifier.channels.base import endpoint_of
    from notifier.storage.callback_secrets import signing_secrets
    from notifier.storage.db import session_scope

    origin = endpoint_of(url)
    if origin is None:
        fail(f"not an http(s) URL: {url!r}", EXIT_USAGE)
        return
    with session_scope() as session:
        click.echo(signing_secrets(session, [origin])[origin].current)
