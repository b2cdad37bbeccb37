"""``notifier cancel``: a notification still waiting."""

from __future__ import annotations

import click

from notifier.ops.cli.common import EXIT_CONFIG, EXIT_USAGE, fail, friendly_errors


@click.command()
@click.argument("notification_id", required=False)
@click.option("--idempotency-key", help="Name it by the key it was sent with instead.")
@friendly_errors
def cancel(notification_id: str | None, idempotency_key: str | None) -> None:
    """Cancel a notification still waiting (in a digest window or held by quiet hours).

    Exits 1 when it is too late (sent, or already in a digest) or not found.
    """
    from notifier.pipeline.cancel import cancel_by

    if (notification_id is None) == (idempotency_key is None):
        fail("give a NOTIFICATION_ID or --idempotency-key (one of them)", EXIT_USAGE)
    outcome = cancel_by(notification_id, idempotency_key)
    if outcome.cancelled:
        click.echo(f"cancelled {outcome.notification_id}")
        return
    if outcome.notification_id is None or outcome.status == "not found":
        fail(outcome.status if outcome.notification_id is None
             else f"no notification {outcome.notification_id}", EXIT_CONFIG)
    fail(f"cannot cancel {outcome.notification_id}: it is {outcome.status} already",
         EXIT_CONFIG)
