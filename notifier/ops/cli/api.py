"""``notifier api``: serve the HTTP API; ``notifier api-keys``: its keys."""

from __future__ import annotations

import json

import click

from notifier.ops.cli.common import EXIT_CONFIG, EXIT_USAGE, fail, friendly_errors, when
from notifier.settings import get_settings, mask_url

#: The app factory uvicorn imports in each worker process (a string, so this command
#: does not import the API itself: it sits above the operator tools, ``pyproject.toml``).
APP_FACTORY = "notifier.api.app:create_app"
SCOPES = ("send", "read", "events", "admin")


@click.command()
@click.option("--address", help="Address to listen on [NOTIFIER_API_ADDRESS].")
@click.option("--port", type=click.IntRange(1, 65535), help="Port [NOTIFIER_API_PORT].")
@click.option("--workers", type=click.IntRange(1, 64),
              help="Processes sharing the port [NOTIFIER_API_WORKERS].")
@friendly_errors
def api(address: str | None, port: int | None, workers: int | None) -> None:
    """Serve the HTTP API (docs/api.md) until stopped (SIGINT or SIGTERM)."""
    try:
        import uvicorn
    except ImportError:
        fail("the API needs uvicorn and FastAPI: pip install 'notifier[server]'", EXIT_CONFIG)
    settings = get_settings()
    uvicorn.run(
        APP_FACTORY, factory=True,
        host=address or settings.api_address, port=port or settings.api_port,
        workers=workers or settings.api_workers,
        # The API logs through notifier's logging (masked, text or JSON); uvicorn's
        # access log would print every request's line twice as slowly.
        access_log=False, log_level=settings.log_level.lower(), proxy_headers=False,
        log_config=None,  # uvicorn's lines go through notifier's handler (create_app)
        server_header=False, date_header=True,
        # Live inbox streams never end by themselves: past this, uvicorn ends them.
        timeout_graceful_shutdown=settings.api_shutdown_timeout,
    )


@click.group("api-keys")
def api_keys() -> None:
    """Keys of the HTTP API: create (shown once), list, revoke."""


@api_keys.command("create")
@click.argument("name")
@click.option("--scope", "scopes", multiple=True, type=click.Choice(SCOPES),
              help="What the key may do; repeat (default: send). admin: everything.")
@click.option("--rate-limit", type=click.IntRange(min=0),
              help="Requests per minute for this key [NOTIFIER_API_RATE_LIMIT_PER_MINUTE];"
                   " 0: unlimited.")
@click.option("--callback-url", metavar="URL",
              help="Where the statuses of this key's notifications go when they name no"
                   " callback_url (docs/callbacks.md).")
@friendly_errors
def create_api_key(
    name: str, scopes: tuple[str, ...], rate_limit: int | None, callback_url: str | None,
) -> None:
    """Make a key called NAME; prints it once, on the last line (it is stored hashed)."""
    from notifier.storage.api_keys import Scope, create_key
    from notifier.storage.db import session_scope

    try:
        with session_scope() as session:
            info, key = create_key(session, name, [Scope(s) for s in scopes or ("send",)],
                                   rate_limit, callback_url)
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)
    click.echo(f"created API key {info.prefix}… ({info.name}) with scopes"
               f" {', '.join(info.scopes)}; it is shown only now:")
    if info.callback_url:
        click.echo(f"its notifications' default callback URL: {mask_url(info.callback_url)}")
    click.echo(key)


@api_keys.command("list")
@click.option("--all", "include_revoked", is_flag=True, help="Revoked keys too.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@friendly_errors
def list_api_keys(include_revoked: bool, as_json: bool) -> None:
    """The keys: id, prefix, name, scopes, when made, last used (about), revoked."""
    from dataclasses import asdict

    from notifier.storage.api_keys import list_keys
    from notifier.storage.db import session_scope

    with session_scope() as session:
        keys = list_keys(session, include_revoked=include_revoked)
    if as_json:
        click.echo(json.dumps([asdict(info) for info in keys], default=str, indent=2))
        return
    if not keys:
        click.echo("no API keys")
    for info in keys:
        used = when(info.last_used_at) if info.last_used_at else "never used"
        revoked = f"  REVOKED {when(info.revoked_at)}" if info.revoked_at else ""
        click.echo(f"{info.id:>4}  {info.prefix}…  {info.name:<20} {','.join(info.scopes):<16}"
                   f" made {when(info.created_at)}  {used}{revoked}")


@api_keys.command("revoke")
@click.argument("key")
@friendly_errors
def revoke_api_key(key: str) -> None:
    """Revoke KEY (its prefix, id, or name: every live key of that name) at once."""
    from notifier.storage.api_keys import PREFIX_CHARS, revoke_key
    from notifier.storage.db import session_scope

    with session_scope() as session:
        revoked = revoke_key(session, key.strip().removesuffix("…")[:255]
                             if not key.startswith("nk_") else key[:PREFIX_CHARS])
    if not revoked:
        fail(f"no live API key named or starting {key[:PREFIX_CHARS]!r}", EXIT_CONFIG)
    _tell_api_processes()
    for info in revoked:
        click.echo(f"revoked {info.prefix}… ({info.name})")


def _tell_api_processes() -> None:
    """Make the API processes forget the keys they cached (``notifier.api.keys``); if
    the state Redis does not answer, the revocation stands but a process that cached the
    key may still accept it for up to a minute: say so."""
    from redis.exceptions import RedisError

    from notifier.storage.api_keys import CACHE_SECONDS, bump_generation
    from notifier.storage.state import state_redis

    try:
        bump_generation(state_redis())
    except (RedisError, OSError) as exc:
        click.echo(f"warning: the state Redis did not answer ({str(exc)[:200]}): the key is"
                   f" revoked in Postgres, but API processes that cached it may accept it"
                   f" for up to {CACHE_SECONDS} s", err=True)
        return
    _wait_out_key_reads()


def _wait_out_key_reads() -> None:
    """Return only once every API process refuses the key: a process answers a request
    from a read of the keys' generation begun at most ``NOTIFIER_API_KEY_SYNC_INTERVAL``
    before it (``notifier.api.key_windows``); two intervals, and a margin for the read
    itself, leave no read begun before the bump in use. "revoked", printed after this,
    then means refused everywhere."""
    import time

    from notifier.settings import get_settings

    interval = get_settings().api_key_sync_interval
    if interval:
        time.sleep(2 * interval + 0.02)
