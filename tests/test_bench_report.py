"""The benchmark's report writer: JSON, Markdown and plots from hand-made outcomes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from bench import report
from bench.config import BenchConfig
from bench.scenarios import Outcome
from bench.series import percentile, quantiles, rates, relative, summary

MACHINE = {
    "date": "2026-11-23T12:00:00+00:00", "host": "vm", "cpu_count": 2, "cpu_model": "AMD EPYC",
    "load_average_at_start": [1.0, 1.0, 1.0], "load_average_at_end": [2.0, 1.5, 1.0],
    "python": "3.11", "postgres": "15", "redis": "7", "celery": "5.6", "kombu": "5.7",
    "psycopg": "3.3", "git_commit": "abc1234",
}
SETTINGS = {"ingest_batch_size": 500}


def outcomes() -> dict[str, Outcome]:
    ramp = [(t / 10, int(t * 100)) for t in range(11)]
    return {
        "naive": Outcome("naive", "naive", 1000, 4.0, 1.0, 1000, series=ramp),
        "notify_many": Outcome("notify_many", "notify_many()", 5000, 0.5, 0.2, 5000,
                               series=ramp),
        "critical_under_backlog": Outcome(
            "critical_under_backlog", "critical + backlog", 5000, 1.0, 0.2, 5000,
            extra={"criticals": 3, "critical_rows": 3, "critical_spacing_ms": 5,
                   "critical_latency_ms": {"count": 3, "p50": 10, "p99": 60, "max": 61},
                   "backlog_latency_ms": {"count": 5000, "p50": 300, "p99": 900, "max": 950},
                   "criticals_committed_after_backlog": 0,
                   "at_first_critical": {"rows_pending": 10, "messages_in_redis": 0,
                                         "messages_in_worker": 1},
                   "at_last_critical": {"rows_pending": 0, "messages_in_redis": 0,
                                        "messages_in_worker": 0},
                   "criticals_send_seconds": 0.1},
            series=ramp, samples={"critical": [5.0, 10.0, 61.0],
                                  "backlog": [float(i) for i in range(5000)]}),
        "aggregation_efficiency": Outcome(
            "aggregation_efficiency", "100 notifications", 100, 1.0, 1.0, 100,
            extra={"messages_out": 35, "digest_messages": 10, "naive_messages_out": 100,
                   "messages_saved": 0.65, "notifications_per_message": 2.86,
                   "per_type": {"alert": {"in": 60, "out": 20},
                                "reminder": {"in": 40, "out": 15}},
                   "statuses": {}}),
        "flush_latency": Outcome(
            "flush_latency", "1,000 waiting", 1000, 5.0, 5.0, 1000,
            extra={"windows": 200, "digests_queued": 200, "per_window": 5,
                   "spread_seconds": 4.0, "fill_seconds": 1.0, "windows_left": 0,
                   "flush_interval_s": 1.0, "flush_batch_size": 100,
                   "flush_latency_ms": {"count": 200, "p50": 500.0, "p99": 1005.0,
                                        "max": 1010.0}},
            series=[(-1.0, 0), (0.5, 50), (5.0, 200)],
            samples={"flush": [float(i * 5) for i in range(200)]}),
    }


def test_series_helpers() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == pytest.approx(2.5)
    assert summary([]) == {"count": 0, "p50": None, "p99": None, "max": None}
    assert quantiles([1.0, 3.0], steps=2) == [1.0, 2.0, 3.0]
    assert relative([(10.5, 3), (10.0, 0), (9.0, 7)], 10.0) == [(0.0, 0), (0.5, 3)]
    times, values = rates([(0.0, 0), (0.25, 10), (0.5, 100), (1.0, 200)])
    assert times == [0.25, 0.75] and values == [200.0, 200.0]


def test_aims_read_the_aggregation_figures() -> None:
    reached = report.aims(outcomes())
    assert reached["aggregation_efficiency"]["met"] is True
    assert reached["flush_latency"] == {
        "aim": "flush p99 <= 1000 ms at 1,000 waiting", "value": 1005.0, "met": False}
    assert reached["notify_many"]["value"] == pytest.approx(40.0)


def test_report_json_markdown_and_plots(tmp_path: Path) -> None:
    doc = report.document(outcomes(), MACHINE, BenchConfig(), 0.1, SETTINGS)
    saved = json.loads(report.write_json(doc, tmp_path / "latest.json").read_text())
    critical = saved["scenarios"]["critical_under_backlog"]
    assert critical["latency_ms"]["critical"]["count"] == 3
    assert len(critical["latency_ms"]["backlog"]["quantiles"]) == 201
    assert "samples" not in critical
    assert saved["scenarios"]["naive"]["series"][-1] == [1.0, 1000]

    plots: dict[str, Path] = {}
    if importlib.util.find_spec("matplotlib"):  # the ``bench`` extra
        from bench.plots import write_plots

        plots = write_plots(saved, tmp_path)
        assert set(plots) == {"throughput", "latency", "aggregation"}
        assert all(path.stat().st_size > 10_000 for path in plots.values())
    text = report.write_markdown(outcomes(), doc, plots, path=tmp_path / "report.md").read_text()
    assert "| aggregation_efficiency | >= 60% fewer messages than naive | 65.0% | yes |" in text
    assert "| flush_latency | flush p99 <= 1000 ms at 1,000 waiting | 1,005.0 ms | **no** |" in text
    assert "| alert | 60 | 20 | 66.7% | 3.00 |" in text
    assert "host vm: 2 CPUs (AMD EPYC)" in text
    for name in plots:
        assert f"![{name}]({name}.png)" in text
