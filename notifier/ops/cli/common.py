"""What every command shares: exit codes, one line per failure, the time format."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any, NoReturn

import click

from notifier.masking import mask_secrets
from notifier.schemas import NotificationError
from notifier.settings import ConfigError, get_settings, mask_url

#: Exit code of a wrong setting, an unreachable service, or an answer of "no".
EXIT_CONFIG = 1
#: Exit code of a wrong option or argument.
EXIT_USAGE = 2


def friendly_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn configuration, connection and validation failures into one line each."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from kombu.exceptions import OperationalError as BrokerError
        from sqlalchemy.exc import OperationalError as DatabaseError

        from notifier.storage.db import describe_db_error

        try:
            return command(*args, **kwargs)
        except ConfigError as exc:
            fail(str(exc), EXIT_CONFIG)
        except NotificationError as exc:
            fail("invalid notification:\n  " + "\n  ".join(exc.problems), EXIT_USAGE)
        except DatabaseError as exc:
            url = mask_url(get_settings().database_url)
            fail(f"NOTIFIER_DATABASE_URL: cannot use {url}: {describe_db_error(exc)}",
                 EXIT_CONFIG)
        except BrokerError as exc:
            url = mask_url(get_settings().broker_url)
            fail(f"NOTIFIER_BROKER_URL: cannot reach {url}: {exc}", EXIT_CONFIG)

    return wrapper


def fail(message: str, code: int) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``code``.

    Masked: a driver's or broker's message may repeat a URL with its password.
    """
    click.echo(f"error: {mask_secrets(message)}", err=True)
    sys.exit(code)


def when(moment: datetime) -> str:
    """A time as the listings print it: "2026-03-30 07:00:00"."""
    return moment.strftime("%Y-%m-%d %H:%M:%S")
