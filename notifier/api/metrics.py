"""The API's Prometheus counters: receipts and suppressions (``docs/receipts.md``).

Written to the same multiprocess directory as the workers' (``NOTIFIER_METRICS_DIR``,
``notifier.settings.metrics_directory``), so one ``notifier metrics`` on the host adds
up every API process's values with the workers'. The directory is chosen before
prometheus-client makes a value, as ``notifier.worker.metrics`` does.
"""

from __future__ import annotations

import os

from notifier.settings import get_settings, metrics_directory

os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_directory(get_settings())
os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)

from prometheus_client import Counter  # noqa: E402  (after the directory is chosen)
from prometheus_client import values as _values  # noqa: E402

_values.ValueClass = _values.get_value_class()

RECEIPTS = Counter(
    "notifier_receipts_total",
    "Provider events taken, by channel, source (api, twilio, mailgun), event and result:"
    " applied (a status moved or an address was suppressed), unchanged (a duplicate, a"
    " late or a soft one), ignored (an event we do not act on, such as Twilio's queued).",
    ["channel", "source", "event", "result"],
)
RECEIPTS_REFUSED = Counter(
    "notifier_receipts_refused_total",
    "Provider events refused, by source and why: unsigned, bad signature, stale,"
    " replayed, malformed, unknown delivery, not sent, not configured.",
    ["source", "reason"],
)
SUPPRESSIONS = Counter(
    "notifier_suppressions_total",
    "Addresses put on the suppression list, by channel and source (bounce, complaint,"
    " soft-bounces, manual); and taken off (source removed).",
    ["channel", "source"],
)
