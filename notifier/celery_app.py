"""The Celery application: ``celery -A notifier worker|beat`` finds it as ``notifier.app``."""

from __future__ import annotations

from celery import Celery

try:  # an installed wheel carries the settings inside the package
    from notifier import celeryconfig
except ImportError:  # a checkout has them at the repository root
    import celeryconfig  # type: ignore[no-redef]

app = Celery("notifier", include=["notifier.tasks"])
app.config_from_object(celeryconfig)
