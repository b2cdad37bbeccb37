"""Prometheus metrics from a real prefork worker, scraped over HTTP."""

from __future__ import annotations

import os
import socket
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from notifier import client
from tests.workers import WorkerProcess, wait_for_count


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text) for sample in family.samples
    }


def test_worker_serves_counts_summed_over_its_pool_processes(tmp_path):
    """Two pool processes ingest and deliver; one scrape adds up both, with the
    pipeline's gauges (queue depth, circuit state) read at scrape time."""
    port = _free_port()
    # Its own directory: counters of the run's earlier workers stay in the shared one.
    env = {"NOTIFIER_METRICS_PORT": str(port), "NOTIFIER_METRICS_DIR": str(tmp_path)}
    worker = WorkerProcess.start(env=env, concurrency=2)
    try:
        for i in range(30):  # one message each: batches land on both pool processes
            client.notify(f"m-{i % 3}", "deploy.failed", f"Deploy {i} failed",
                          priority="critical", channels=["inapp"])
        # Types of this test's own: an earlier test's messages left in the broker are
        # ingested by this worker too, and must not change the counts below.
        client.notify_many([{"recipient": "m-9", "type": "metrics.reminder", "title": f"r{i}"}
                            for i in range(7)])
        wait_for_count("SELECT count(*) FROM deliveries d JOIN notifications n"
                       " ON n.id = d.notification_id"
                       " WHERE d.status = 'sent' AND n.type = 'deploy.failed'", 30)
        wait_for_count("SELECT count(*) FROM notifications"
                       " WHERE type IN ('deploy.failed', 'metrics.reminder')", 37)
        samples = _scrape(port)
    finally:
        worker.stop()

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("notifier_notifications_ingested_total",
                 priority="critical", type="deploy.failed") == 30
    assert value("notifier_notifications_ingested_total",
                 priority="normal", type="metrics.reminder") == 7
    assert value("notifier_notifications_routed_total", status="dispatched") >= 30
    assert value("notifier_notifications_routed_total", status="pending") >= 7
    assert value("notifier_deliveries_total", channel="inapp", outcome="sent") >= 30
    assert value("notifier_delivery_latency_seconds_count", channel="inapp") >= 30
    assert value("notifier_ingest_latency_seconds_count") >= 2
    assert value("notifier_batch_size_sum", stage="ingest") >= 37
    assert value("notifier_batch_size_sum", stage="deliver") >= 30
    assert value("notifier_circuit_state", channel="email", provider="0:127.0.0.1:25") == 0
    assert ("notifier_queue_depth", (("queue", "notifier.critical"),)) in samples
    assert value("notifier_oldest_waiting_notification_seconds") >= 0
    # Multiprocess mode: the pool's children wrote the counters into the shared directory.
    writers = {name.rpartition("_")[2].removesuffix(".db")
               for name in os.listdir(tmp_path)
               if name.startswith("counter_")}
    assert writers - {str(worker.process.pid), str(os.getpid())}
