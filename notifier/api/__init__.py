"""The HTTP API: one more producer beside the workers (``docs/api.md``).

It checks notifications with the task contract's own schema and publishes them to the
same Celery queues as :mod:`notifier.client`, through the client's publish path; it
never writes a notification itself, so the pipeline keeps one path. The reads and
actions (status, cancel, preferences, dead letters) call the same functions as the CLI
and :mod:`notifier.records`.

One module per area, each an ``APIRouter``: :mod:`~notifier.api.notifications`,
:mod:`~notifier.api.preferences`, :mod:`~notifier.api.dead_letters`; authentication
and scopes in :mod:`~notifier.api.keys` (one dependency, :func:`~notifier.api.keys.require`),
the error format in :mod:`~notifier.api.errors`, the app in :mod:`~notifier.api.app`
(served by ``notifier api``).
"""
