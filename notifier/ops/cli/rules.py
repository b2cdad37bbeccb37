"""``notifier rules``: the aggregation rule of every type."""

from __future__ import annotations

import click

from notifier.ops.cli.common import friendly_errors
from notifier.settings import get_settings


@click.command()
@click.option("--file", "path", type=click.Path(dir_okay=False),
              help="A rules file to check instead of NOTIFIER_RULES_FILE.")
@friendly_errors
def rules(path: str | None) -> None:
    """The aggregation rule of every configured type (and check a rules file)."""
    from notifier.pipeline.rules import format_duration, load_rules

    chosen = path or get_settings().rules_file
    loaded = load_rules(chosen)
    click.echo(f"rules from {chosen or 'built-in defaults'}")
    click.echo(f"{'type':<20} {'window':>8} {'max':>5}  {'mode':<8} {'max wait':>8}  digest key")
    for type_, rule in loaded.items():
        if not rule.aggregate:
            click.echo(f"{type_:<20} {'-':>8} {'-':>5}  not aggregated: delivered at once")
            continue
        wait = format_duration(rule.longest_wait) if rule.mode == "sliding" else "-"
        click.echo(f"{type_:<20} {format_duration(rule.window):>8} {rule.max_count:>5}  "
                   f"{rule.mode:<8} {wait:>8}  {rule.digest_key or '-'}")
