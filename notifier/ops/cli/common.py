"""What every command shares: exit codes, one line per failure, the time format."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any

import click

from notifier.masking import mask_secrets
from notifier.schemas import NotificationError
from notifier.settings import ConfigError, get_settings, mask_url

EXIT_CONFIG = 1
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
            _fail(str(exc), EXIT_CONFIG)
        except NotificationError as exc:
            _fail("invalid notification:\n  " + "\n  ".join(exc.problems), EXIT_USAGE)
        except DatabaseError as exc:
            url = mask_url(get_settings().database_url)
            _fail(f"NOTIFIER_DATABASE_URL: cannot use {url}: {describe_db_error(exc)}",
                  EXIT_CONFIG)
        except BrokerError as exc:
            url = mask_url(get_settings().broker_url)
            _fail(f"NOTIFIER_BROKER_URL: cannot reach {url}: {exc}", EXIT_CONFIG)

    return wrapper


def _fail(message: str, code: int) -> None:
    # Masked: a driver's or broker's message may repeat a URL with its password.
    click.echo(f"error: {mask_secrets(message)}", err=True)
    sys.exit(code)


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S")
