"""notifier: a Celery-based notification pipeline.

Producers use :mod:`notifier.client`; operators use ``celery -A notifier worker|beat``
and the ``notifier`` command.
"""

from notifier.celery_app import app

__all__ = ["app"]
