"""Celery settings of the notifier app, derived from the NOTIFIER_* environment.

Why each choice (docs/architecture.md, "Ingest"; docs/operating.md, "Recovery after a crash"):

* One queue per priority, consumed in a fixed order (``queue_order_strategy``:
  ``priority``, honoured by kombu >= 5.7): a worker that listens to all four always
  takes critical work first. Every message stays at one message priority
  (``task_default_priority`` 0 and kombu's default ``priority_steps``), the same a plain
  Celery producer uses, because kombu's Redis transport orders its lists by message
  priority before queue order: a message sent with another priority would jump the
  queue order, and a consumer with other steps would never read it.
* Messages are acknowledged late, after their rows are committed; a killed worker's
  messages come back after ``visibility_timeout`` seconds (Redis) or at once (RabbitMQ).
* Ingest forms batches out of the messages a worker holds unacknowledged, so prefetch
  is several batches; critical batches go to the pool first, and the worker pauses its
  bulk queues while enough is waiting (``notifier/worker/batching.py``).
* Only JSON crosses the broker.
"""

from kombu import Exchange, Queue

from notifier.settings import get_settings, queue_name
from notifier.worker.queues import ALL_QUEUES, BEAT_QUEUE

_settings = get_settings()

broker_url = _settings.broker_url
broker_connection_retry_on_startup = True
broker_transport_options = {
    "visibility_timeout": _settings.visibility_timeout,
    "queue_order_strategy": "priority",
    "unacked_restore_interval": _settings.unacked_restore_interval,
    "unacked_restore_throttle": 1,
    # The lock around that scan; kombu's default (300 s) means a worker killed while
    # holding it stops every other worker from restoring messages for five minutes.
    "unacked_mutex_expire": 10,
    # Behind Sentinel: the master's name (and the Sentinels' password), from the settings.
    **_settings.broker_sentinel_options,
}

task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
task_ignore_result = True
result_backend = None

# Declared exactly as a plain Celery app declares ``queue="notifier.<priority>"`` (an
# exchange and routing key of the queue's name), so foreign producers and we agree.
# A worker without ``-Q`` consumes them in this order: critical ingest, critical
# deliveries, then the bulk ingest queues, then each channel's delivery queue.
def _queue(name: str) -> Queue:
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


task_queues = [_queue(name) for name in ALL_QUEUES]
task_default_queue = queue_name("normal")
task_default_priority = 0
task_create_missing_queues = True

task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = _settings.prefetch_multiplier
# Task events, for Flower's dashboard and /metrics (by task name). Workers send received,
# started, succeeded, failed (as `celery worker -E` would); an ingest batch sends one set
# for the whole batch (notifier/worker/batching.py). Producers send no task-sent event: one more
# broker publish per message made a single notify() 40 % slower.
worker_send_task_events = True
task_send_sent_event = False
worker_hijack_root_logger = False

beat_schedule = {
    "flush-aggregation-windows": {
        "task": "notifier.flush_windows",
        "schedule": _settings.flush_interval,
        "options": {"queue": BEAT_QUEUE, "expires": _settings.flush_interval},
    },
    "sweep-deliveries": {
        "task": "notifier.sweep_deliveries",
        "schedule": _settings.sweep_interval,
        "options": {"queue": BEAT_QUEUE, "expires": _settings.sweep_interval},
    },
    # Retention of every table (notifier/pipeline/retention.py); a run that outlives the next tick
    # is harmless (SKIP LOCKED), one that waited a whole interval is dropped.
    "purge-expired-rows": {
        "task": "notifier.purge_expired",
        "schedule": _settings.retention_interval,
        "options": {"queue": queue_name("low"), "expires": _settings.retention_interval},
    },
    # Beat's heartbeat for `notifier health`; it expires once too late to tell anything.
    "heartbeat": {
        "task": "notifier.heartbeat",
        "schedule": _settings.heartbeat_interval,
        "options": {"queue": BEAT_QUEUE,
                    "expires": _settings.health_beat_max_age},
    },
}

timezone = "UTC"
enable_utc = True
