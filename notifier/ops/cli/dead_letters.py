"""``notifier dead-letters``: list, show, replay and purge what failed for good."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import click

from notifier.masking import mask_secrets
from notifier.ops.cli.common import EXIT_USAGE, fail, friendly_errors, when
from notifier.settings import get_settings


@click.group("dead-letters")
def dead_letters() -> None:
    """Notifications and deliveries that failed for good."""


def filter_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The filters shared by list, replay and purge."""
    for option in reversed([
        click.option("--stage", type=click.Choice(["ingest", "aggregate", "deliver"])),
        click.option("--type", "type_", help="Notification type."),
        click.option("--channel"),
        click.option("--since", type=click.DateTime(), help="Created at or after (UTC)."),
        click.option("--until", type=click.DateTime(), help="Created before (UTC)."),
        click.option("--id", "ids", type=int, multiple=True, help="A dead letter id; repeat."),
    ]):
        command = option(command)
    return command


def _filter(filters: dict[str, Any], replayed: bool | None = None) -> Any:
    from notifier.pipeline.dead_letters import DeadLetterFilter

    return DeadLetterFilter(
        stage=filters["stage"], type=filters["type_"], channel=filters["channel"],
        since=_utc(filters["since"]), until=_utc(filters["until"]), replayed=replayed,
        ids=tuple(filters["ids"]),
    )


def _utc(moment: datetime | None) -> datetime | None:
    return moment.replace(tzinfo=UTC) if moment and moment.tzinfo is None else moment


@dead_letters.command("list")
@filter_options
@click.option("--limit", default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def list_dead_letters(as_json: bool, limit: int, **filters: Any) -> None:
    """The newest dead letters, one line each."""
    from notifier.pipeline.dead_letters import dead_letter_view, find_dead_letters
    from notifier.storage.db import session_scope

    with session_scope() as session:
        rows = find_dead_letters(session, _filter(filters), limit)
    if as_json:
        click.echo(json.dumps([dead_letter_view(row) for row in rows], default=str, indent=2))
        return
    if not rows:
        click.echo("no dead letters")
    for row in rows:
        replayed = " (replayed)" if row.replayed_at else ""
        click.echo(f"{row.id:>6}  {when(row.created_at)}  {row.stage:<8} "
                   f"{row.channel or '-':<8} {mask_secrets(row.type or '-'):<18} "
                   f"{mask_secrets(row.reason)}{replayed}")


@dead_letters.command("replay")
@filter_options
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@friendly_errors
def replay_dead_letters(yes: bool, **filters: Any) -> None:
    """Send matching dead letters again (attempts reset); each is replayed once."""
    from notifier.pipeline.dead_letters import count_dead_letters
    from notifier.storage.db import session_scope

    where = _filter(filters, replayed=False)
    with session_scope() as session:
        total = count_dead_letters(session, where)
    if total == 0:
        click.echo("no dead letters to replay")
        return
    if not yes:
        click.confirm(f"replay {total} dead letters?", abort=True)
    replayed, skipped, purged, refused = _replay_in_chunks(where, total)
    for line in refused:  # a truncated payload: replaying it would send a fragment
        click.echo(line, err=True)
    click.echo(f"replayed {replayed} dead letters"
               + (f"; {skipped} skipped (their delivery is no longer dead)" if skipped else "")
               + (f"; {purged} skipped (their delivery was deleted by retention,"
                  " NOTIFIER_RETENTION_DELIVERIES_DAYS)" if purged else "")
               + (f"; {len(refused)} refused (only a prefix of their payload was kept)"
                  if refused else ""))


def _replay_in_chunks(where: Any, total: int) -> tuple[int, int, int, list[str]]:
    from notifier.pipeline.dead_letters import replay_dead_letters, replayable_ids
    from notifier.storage.db import session_scope
    from notifier.worker.batch_sizing import delivery_sizer
    from notifier.worker.tasks import publish, publish_ingest
    from notifier.worker.transactions import transaction

    replayed = skipped = purged = 0
    refused: list[str] = []
    with session_scope() as session:
        chunks = list(replayable_ids(session, where))
    with click.progressbar(length=total, label="replaying", file=sys.stderr) as bar:
        for ids in chunks:
            with transaction() as tx:
                replay = replay_dead_letters(tx.session, ids, get_settings(),
                                             batch_size=delivery_sizer(get_settings()))
                tx.after_commit(publish, replay.tasks)
                tx.after_commit(publish_ingest, replay.ingest_payloads)
            replayed, skipped = replayed + replay.replayed, skipped + replay.skipped
            purged += replay.purged
            refused += replay.refused
            bar.update(len(ids))
    return replayed, skipped, purged, refused


@dead_letters.command("purge")
@filter_options
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@friendly_errors
def purge_dead_letters(yes: bool, **filters: Any) -> None:
    """Delete matching dead letters for good (their deliveries stay recorded as dead)."""
    from notifier.pipeline.dead_letters import count_dead_letters
    from notifier.pipeline.dead_letters import purge_dead_letters as purge
    from notifier.storage.db import session_scope

    where = _filter(filters)
    with session_scope() as session:
        total = count_dead_letters(session, where)
    if total == 0:
        click.echo("no dead letters to purge")
        return
    if not yes:
        click.confirm(f"delete {total} dead letters for good?", abort=True)
    with session_scope() as session:
        purged = purge(session, where)
    click.echo(f"purged {purged} dead letters")


@dead_letters.command("show")
@click.argument("dead_letter_id", type=int)
@friendly_errors
def show_dead_letter(dead_letter_id: int) -> None:
    """One dead letter with its original message."""
    from notifier.pipeline.dead_letters import dead_letter_view
    from notifier.storage.db import session_scope
    from notifier.storage.models import DeadLetter

    with session_scope() as session:
        row = session.get(DeadLetter, dead_letter_id)
        if row is None:
            fail(f"no dead letter with id {dead_letter_id}", EXIT_USAGE)
        click.echo(json.dumps(dead_letter_view(row), default=str, indent=2))
