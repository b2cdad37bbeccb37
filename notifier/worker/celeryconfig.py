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
  On Redis a message is taken off its queue and recorded as unacknowledged in one
  atomic step (``notifier/broker_redis.py``), so no kill or broken connection loses it.
* Ingest forms batches out of the messages a worker holds unacknowledged, so prefetch
  is several batches; critical batches go to the pool first, and the worker pauses its
  bulk queues while enough is waiting (``notifier/worker/batching.py``).
* Only JSON crosses the broker.
* On RabbitMQ: quorum queues with a delivery limit, publisher confirms, countdowns by
  native delayed delivery (``notifier/broker_topology.py``). Quorum queues make Celery
  apply the prefetch count per consumer (``worker_detect_quorum_queues``), one window
  per queue, so bulk messages never hold the window critical ones need.
"""

from notifier.broker_topology import celery_settings, declare_queue
from notifier.settings import get_settings, queue_name
from notifier.worker.queues import ALL_QUEUES, BEAT_QUEUE

_settings = get_settings()

# The broker, its transport options (Redis: visibility timeout, queue order, restore
# scans; RabbitMQ: publisher confirms) and how queues are made: notifier/broker_topology.py.
_broker = celery_settings(_settings)
broker_url = _broker["broker_url"]
# On Redis our transport, which receives a message and records it as unacknowledged in
# one atomic step (notifier/broker_redis.py); None elsewhere (the URL's own).
broker_transport = _broker["broker_transport"]
broker_failover_strategy = _broker["broker_failover_strategy"]
broker_transport_options = _broker["broker_transport_options"]
task_create_missing_queue_type = _broker["task_create_missing_queue_type"]
task_create_missing_queue_exchange_type = _broker["task_create_missing_queue_exchange_type"]
broker_native_delayed_delivery_queue_type = _broker["broker_native_delayed_delivery_queue_type"]
broker_connection_retry_on_startup = True

task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
task_ignore_result = True
result_backend = None

# Declared by notifier/broker_topology.py: on Redis exactly as a plain Celery app declares
# ``queue="notifier.<priority>"`` (so foreign producers and we agree), on RabbitMQ as
# quorum queues with a delivery limit on topic exchanges. A worker without ``-Q``
# consumes them in this order: critical ingest, critical deliveries, then the bulk
# ingest queues, then each channel's delivery queue.
task_queues = [declare_queue(name, _settings) for name in ALL_QUEUES]
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
    # Status callbacks' outbox (notifier/pipeline/callbacks.py): publishes what the
    # deliveries' status changes wrote, often, so a callback follows its status closely.
    "sweep-callbacks": {
        "task": "notifier.sweep_callbacks",
        "schedule": _settings.callback_sweep_interval,
        "options": {"queue": BEAT_QUEUE, "expires": _settings.callback_sweep_interval},
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
