"""The benchmark's report writer: JSON, Markdown and plots from hand-made outcomes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench import baseline, profile, report, scenarios
from bench import database as bench_database
from bench.config import BenchConfig
from bench.scenarios import Bench, Outcome
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
                   "at_first_critical": {"rows_pending": 10, "messages_in_broker": 0,
                                         "messages_in_worker": 1},
                   "at_last_critical": {"rows_pending": 0, "messages_in_broker": 0,
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
        "aim": "flush p99 <= 500 ms at 1,000 waiting", "value": 1005.0, "met": False}
    assert reached["notify_many"]["value"] == pytest.approx(40.0)


def test_cpu_per_item_and_the_ceiling_it_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every party's cores over the scenario's seconds, per item; the ceiling is the rate
    that CPU would reach with every core busy."""
    monkeypatch.setattr(report.os, "cpu_count", lambda: 2)
    outcome = Outcome("buffered", "b", 50_000, 4.0, 2.0, 40_000,
                      cores={"producer": 0.5, "pool": 1.0, "postgres": 0.5})
    micros, ceiling = report.cpu_per_item(outcome) or (0.0, 0.0)
    assert micros == pytest.approx(2.0 * 4.0 / 40_000 * 1e6)  # 200 µs
    assert ceiling == pytest.approx(10_000)  # 2 cores / 200 µs
    assert report.cpu_per_item(Outcome("x", "x", 0, 1.0, 1.0, 0, cores={"pool": 1.0})) is None
    assert report.cpu_per_item(Outcome("x", "x", 5, 1.0, 1.0, 5)) is None


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
    assert "| flush_latency | flush p99 <= 500 ms at 1,000 waiting | 1,005.0 ms | **no** |" in text
    assert "| alert | 60 | 20 | 66.7% | 3.00 |" in text
    assert "host vm: 2 CPUs (AMD EPYC)" in text
    for name in plots:
        assert f"![{name}]({name}.png)" in text


# -- issue 12: the targets, the CPU profiles, the comparison with the baseline -------------


@pytest.fixture
def bench_on_test_database(database: str) -> Iterator[Bench]:
    """The benchmark's own context, on the test run's database."""
    from tests.conftest import BROKER_URL

    config = BenchConfig(database_url=database, broker_url=BROKER_URL)
    with bench_database.connect(config.libpq_url) as conn:
        yield Bench(config, conn)


def py_spy_or_skip() -> None:
    if profile.py_spy() is None:
        pytest.skip("py-spy is not installed (the bench extra)")


def test_the_real_ingest_pass_is_profiled(
    bench_on_test_database: Bench, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The in-process ingest scenario, real code on a real database, profiled by py-spy
    attached to this process: its own functions lead the inclusive table."""
    py_spy_or_skip()
    monkeypatch.setattr(scenarios, "RESULTS_DIR", tmp_path)
    outcome = scenarios.in_process_ingest(bench_on_test_database, 3000)
    assert outcome.committed == 3000
    # The profiled pass came after a reset and stored everything again: the real path.
    assert bench_database.count_rows(bench_on_test_database.conn) == 3000
    found = outcome.extra["profile"]
    assert found["note"] == "" and found["samples"] > 0
    own = dict(found["own_total_share"])
    assert own, found
    assert any(name.startswith("store_messages ") for name in own)
    shares = [share for _, share in found["self_share"]]
    # Each share is rounded to four places, so their sum may pass 1 by half a unit each.
    assert shares == sorted(shares, reverse=True)
    assert 0 < sum(shares) <= 1.0 + 0.00005 * len(shares)
    assert (tmp_path / found["raw"]).read_text().strip()


def test_a_profile_that_cannot_attach_says_why_and_the_pass_still_runs(tmp_path: Path) -> None:
    py_spy_or_skip()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    ran = []
    with profile.profiling("nothing", gone.pid, tmp_path / "raw.txt") as found:
        ran.append(True)
    assert ran == [True]
    assert found.samples == 0 and found.note.startswith("no profile: py-spy could not record")
    lines = profile.markdown(found.as_dict())
    assert lines == ["", f"**nothing**: {found.note}."]


def test_raw_stacks_are_summarised_by_self_and_own_total_share() -> None:
    raw = "\n".join([
        'process 1:"celery";process 2:"pool";deliver (notifier/worker/tasks.py:105);'
        "_compose (notifier/channels/email.py:353);encode (email/header.py:309) 6",
        'process 1:"celery";process 3:"pool";deliver (notifier/worker/tasks.py:105);'
        "send (smtplib.py:348) 3",
        "main (celery/bin.py:1) 1",
    ])
    stacks, total = profile.parse_raw(raw)
    assert total == 10
    found = profile.summarise("worker", stacks, total)
    assert found.self_share == [("encode (email/header.py:309)", 0.6),
                                ("send (smtplib.py:348)", 0.3), ("main (celery/bin.py:1)", 0.1)]
    assert found.own_total_share == [("deliver (notifier/worker/tasks.py:105)", 0.9),
                                     ("_compose (notifier/channels/email.py:353)", 0.6)]


def test_the_real_worker_less_scenarios_give_comparable_figures(
    bench_on_test_database: Bench, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    """raw_copy and in_process_ingest run for real; their results document (the shape
    latest.json has) yields rate figures, higher being better, and targets."""
    monkeypatch.setattr(scenarios, "RESULTS_DIR", tmp_path)
    bench = bench_on_test_database
    real = {"raw_copy": scenarios.raw_copy(bench, 1000),
            "in_process_ingest": scenarios.in_process_ingest(bench, 1000)}
    doc = json.loads(json.dumps(report.document(real, MACHINE, bench.config, 0.0, SETTINGS),
                                default=str))
    found = baseline.figures(doc)
    assert set(found) == {"raw_copy.rate", "in_process_ingest.rate"}
    assert found["in_process_ingest.rate"]["better"] == baseline.HIGHER
    assert found["in_process_ingest.rate"]["value"] == pytest.approx(
        doc["scenarios"]["in_process_ingest"]["rate_per_s"])
    target = doc["aims"]["in_process_ingest"]
    assert target["aim"] == "ingest code alone >= 25,000/s"
    assert target["met"] is (real["in_process_ingest"].rate >= 25_000)


def all_outcomes() -> dict[str, Outcome]:
    """The hand-made outcomes plus the figures the targets read (shapes as a real run)."""
    found = outcomes()
    found["buffered"] = Outcome("buffered", "BufferedProducer", 5000, 0.25, 0.1, 5000)
    found["in_process_ingest"] = Outcome("in_process_ingest", "ingest code", 30000, 1.0, 1.0,
                                         30000)
    delivery = {"server": "minimal asyncio SMTP, 1 process", "cpu_ms_per_item": 2.0,
                "rates_per_run": [300.0]}
    found["email_naive"] = Outcome("email_naive", "e-mail naive", 600, 2.0, 2.0, 600,
                                   extra=dict(delivery))
    found["email_pooled"] = Outcome("email_pooled", "e-mail pooled", 600, 0.5, 0.5, 600,
                                    extra={**delivery, "cpu_ms_per_item": 1.0})
    return found


def results(found: dict[str, Outcome]) -> dict[str, Any]:
    """A results document as latest.json holds it (written and read back)."""
    doc = report.document(found, MACHINE, BenchConfig(), 0.1, SETTINGS)
    return dict(json.loads(json.dumps(doc, default=str)))


def test_every_target_of_issue_12_is_read_met_or_not() -> None:
    reached = report.aims(all_outcomes())
    assert {name: (aim["value"], aim["met"]) for name, aim in reached.items()
            if name in report.TARGETS} == {
        "in_process_ingest": (30000, True),    # >= 25,000/s
        "buffered": (80.0, True),              # 20,000/s against naive 250/s: >= 40x
        "notify_many": (40.0, True),           # exactly 40x
        "critical_under_backlog": (60.0, False),
        "flush_latency": (1005.0, False),
        "email_pooled": (4.0, True),           # 1,200/s against 300/s: >= 3x
    }


def test_the_report_lists_targets_a_partial_run_did_not_measure(tmp_path: Path) -> None:
    found = {name: o for name, o in all_outcomes().items() if name != "naive"}
    doc = report.document(found, MACHINE, BenchConfig(), 0.1, SETTINGS)
    text = report.write_markdown(found, doc, path=tmp_path / "report.md").read_text()
    assert "| in_process_ingest | ingest code alone >= 25,000/s | 30,000/s | yes |" in text
    assert "| critical_under_backlog | critical p99 <= 50 ms | 60.0 ms | **no** |" in text
    for name in ("buffered", "notify_many"):  # no naive baseline: no ratio to read
        assert f"| {name} | >= 40x naive | - | not measured in this run |" in text
    assert "No baseline (baseline.json)" in text


def slower(found: dict[str, Outcome], name: str, factor: float) -> None:
    """The scenario's rate divided by ``factor`` (its seconds multiplied)."""
    found[name].seconds *= factor


def test_figures_go_the_right_way() -> None:
    found = baseline.figures(results(all_outcomes()))
    expected = {
        "naive.rate": baseline.HIGHER, "notify_many.x_naive": baseline.HIGHER,
        "critical_under_backlog.critical_p99": baseline.LOWER,
        "critical_under_backlog.backlog_p50": baseline.LOWER,
        "flush_latency.p99": baseline.LOWER, "aggregation_efficiency.saved": baseline.HIGHER,
        "email_pooled.cpu_ms_per_item": baseline.LOWER,
        "delivery_ratio.email_pooled / email_naive": baseline.HIGHER,
    }
    assert {key: found[key]["better"] for key in expected} == expected
    assert found["critical_under_backlog.critical_p99"]["value"] == 60.0
    assert found["delivery_ratio.email_pooled / email_naive"]["value"] == 4.0


def test_a_figure_more_than_15_percent_worse_is_marked(tmp_path: Path) -> None:
    before = baseline.baseline_document(results(all_outcomes()))
    now = all_outcomes()
    slower(now, "notify_many", 1 / 0.80)      # rate 20 % lower: marked
    slower(now, "buffered", 1 / 0.90)         # 10 % lower: within the noise
    slower(now, "in_process_ingest", 0.5)     # twice as fast: better
    critical = now["critical_under_backlog"].extra
    critical["critical_latency_ms"] = {**critical["critical_latency_ms"], "p99": 72.0}  # +20 %
    critical["backlog_latency_ms"] = {**critical["backlog_latency_ms"], "p99": 450.0}  # -50 %
    now["email_pooled"].extra["cpu_ms_per_item"] = 1.1   # 10 % more CPU: within
    now["email_naive"].extra["cpu_ms_per_item"] = 2.4    # 20 % more CPU: marked
    compared = {c.key: c for c in baseline.compare(results(now), before)}
    marked = sorted(key for key, c in compared.items() if c.regressed)
    assert marked == [
        "critical_under_backlog.critical_p99",
        "email_naive.cpu_ms_per_item",
        "notify_many.rate",
        "notify_many.x_naive",
    ]
    assert compared["notify_many.rate"].worse_by == pytest.approx(0.20)
    assert compared["critical_under_backlog.critical_p99"].worse_by == pytest.approx(0.20)
    assert compared["critical_under_backlog.backlog_p99"].worse_by == pytest.approx(-0.5)
    assert baseline.verdict(compared["in_process_ingest.rate"]) == "better"
    assert baseline.verdict(compared["buffered.rate"]) == ""

    text = "\n".join(baseline.markdown(list(compared.values()), before))
    assert "4 of" in text and "notify_many.rate" in text
    assert ("| critical latency p99 under backlog | 60.0 ms | 72.0 ms | +20.0% |"
            " **worse by 20%** |") in text
    assert "| notify_many(): rate | 10,000/s | 8,000/s | -20.0% | **worse by 20%** |" in text


def test_a_slower_raw_copy_says_the_machine_was_busier() -> None:
    found = all_outcomes()
    found["raw_copy"] = Outcome("raw_copy", "raw COPY", 10000, 0.2, 0.2, 10000)
    before = baseline.baseline_document(results(found))
    slower(found, "raw_copy", 2.0)
    text = "\n".join(baseline.markdown(baseline.compare(results(found), before), before))
    assert "Raw COPY, which runs no notifier code, is itself 50% worse" in text
    assert "load average (1 min) 1.0 then" in text
    slower(found, "raw_copy", 0.5)
    text = "\n".join(baseline.markdown(baseline.compare(results(found), before), before))
    assert "Raw COPY" not in text


def test_a_figure_the_baseline_lacks_is_new_not_marked() -> None:
    before = baseline.baseline_document(results(outcomes()))
    compared = {c.key: c for c in baseline.compare(results(all_outcomes()), before)}
    assert compared["buffered.rate"].before is None
    assert not compared["buffered.rate"].regressed
    assert baseline.verdict(compared["buffered.rate"]) == "new"


def test_the_baseline_is_written_from_a_results_file_and_read_back(tmp_path: Path) -> None:
    doc = results(all_outcomes())
    doc["scenarios"]["in_process_ingest"]["extra"]["profile"] = profile.Profile(
        "ingest", samples=10, self_share=[("copy_to (psycopg/generators.py:329)", 0.5)],
        own_total_share=[("ingest_batch (notifier/pipeline/ingest.py:220)", 0.9)]).as_dict()
    latest = tmp_path / "latest.json"
    latest.write_text(json.dumps(doc))
    written = tmp_path / "baseline.json"
    assert baseline.main([str(latest), "--output", str(written)]) == 0
    saved = baseline.load(written)
    assert saved is not None
    assert saved["machine"]["git_commit"] == "abc1234"
    assert saved["figures"] == baseline.figures(doc)
    assert not [c for c in baseline.compare(doc, saved) if c.change != 0]
    assert baseline.load(tmp_path / "absent.json") is None

    # The report shows each profile's shares beside the baseline's.
    doc["scenarios"]["in_process_ingest"]["extra"]["profile"]["self_share"] = [
        ["copy_to (psycopg/generators.py:329)", 0.25]]
    text = "\n".join(report.markdown_profiles(doc, saved))
    assert "| `copy_to (psycopg/generators.py:329)` | 25.0% | 50.0% |" in text
    assert "| `ingest_batch (notifier/pipeline/ingest.py:220)` | 90.0% | 90.0% |" in text


def test_the_failover_figures_are_read_against_the_connect_timeout(tmp_path):
    """A blackholed primary may cost its connect timeout plus 50 ms; the others 50 ms."""
    def case(p50: float, p99: float) -> dict[str, Any]:
        return {"count": 100, "p50": p50, "p99": p99, "max": p99}

    failover = Outcome(
        "email_failover", "e-mail failover", 240, 30.0, 30.0, 240, extra={
            "attempts_ms": {"direct": case(10, 20), "refused": case(12, 25),
                            "blackholed": case(1012, 1040), "circuit_open": case(11, 22)},
            "extra_ms": {"refused": {"p50": 2, "p99": 5}, "blackholed": {"p50": 1002, "p99": 1020},
                         "circuit_open": {"p50": 1, "p99": 2}},
            "connect_timeout_s": 1.0, "aim_ms": 1050.0,
        })
    assert report.failover_aim(failover)["value"] == 20.0
    assert report.failover_aim(failover)["met"]
    failover.extra["extra_ms"]["refused"]["p99"] = 80
    assert not report.failover_aim(failover)["met"]
    assert [line.split()[0] for line in report.failover_lines(failover)] == [
        "direct", "refused", "blackholed", "circuit_open"]
    figures = baseline.figures({"scenarios": {"email_failover": report.scenario_document(
        failover)}})
    assert figures["email_failover.blackholed_extra_p99"]["value"] == 1020
    found = {"email_failover": failover}
    doc = report.document(found, MACHINE, BenchConfig(), 0.1, SETTINGS)
    path = report.write_markdown(found, doc, path=tmp_path / "report.md")
    assert "| blackholed | 100 | 1,012.0 | 1,040.0 | 1,002.0 | 1,020.0 |" in path.read_text()


def test_a_scenarios_reset_empties_the_suppression_list(bench_on_test_database: Bench) -> None:
    """A run's hard bounces must not keep the next run's e-mails from being sent: the
    reset between scenarios empties the suppression list with the rest."""
    conn = bench_on_test_database.conn
    conn.execute("INSERT INTO suppressions (channel, address, reason, source)"
                 " VALUES ('email', 'user-1@example.com', 'hard bounce', 'bounce')")
    bench_database.reset(conn, 3)
    assert conn.execute("SELECT count(*) FROM suppressions").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM recipients").fetchone() == (3,)
