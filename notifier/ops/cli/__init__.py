"""The ``notifier`` command: send, migrate, look at the pipeline and its dead letters.

Every failure an operator can cause (a bad notification, a wrong URL, a server that
does not answer) ends in one line saying what to fix and a non-zero exit code, never a
traceback.
"""

from __future__ import annotations

import click

from notifier.ops.cli import (
    api,
    cancel,
    db,
    dead_letters,
    health,
    inbox,
    metrics,
    queues,
    recipients,
    rules,
    send,
    stats,
    status,
    suppressions,
    webhooks,
)
from notifier.ops.cli.common import EXIT_CONFIG, fail
from notifier.settings import ConfigError, get_settings


@click.group()
@click.version_option(package_name="notifier")
def main() -> None:
    """Operate the notifier pipeline (configuration: NOTIFIER_* environment variables)."""
    from notifier.channels import check_channel_urls

    try:
        check_channel_urls(get_settings())
    except ConfigError as exc:
        fail(str(exc), EXIT_CONFIG)


for _command in (
    send.send, cancel.cancel, rules.rules, metrics.metrics, db.db, status.status,
    dead_letters.dead_letters, inbox.inbox, recipients.recipients, webhooks.webhooks,
    health.health, stats.stats, queues.queues, api.api, api.api_keys,
    suppressions.suppressions, webhooks.callbacks,
):
    main.add_command(_command)
