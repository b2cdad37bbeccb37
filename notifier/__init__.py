"""notifier: a Celery-based notification pipeline.

Producers use :mod:`notifier.client`; operators use ``celery -A notifier worker|beat``
(which finds the app as ``notifier.app``) and the ``notifier`` command.
"""

from typing import Any

__all__ = ["app"]


def __getattr__(name: str) -> Any:
    # Loaded on first use so that `notifier --help` and a bad setting in the CLI never
    # fail while the package itself is being imported.
    if name == "app":
        from notifier.worker.app import app

        return app
    raise AttributeError(f"module 'notifier' has no attribute {name!r}")
