"""The HTTP API's benchmark scenarios (``bench.api``), run for real with tiny counts.

A real ``notifier api``, a real worker, the real load generator and SSE client, on the
test run's database and broker: the figures must be there and hang together (every
request answered 202, every row committed, quantiles in order, each party's CPU read),
and the report must show them beside the aims. No figure is compared with a speed.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from bench import api, baseline, profile, report, sse_client, workers
from bench import database as bench_database
from bench.__main__ import plan
from bench.config import BenchConfig
from bench.scenarios import Bench, Outcome
from notifier.pipeline.inbox import InboxItem
from tests.test_bench_report import MACHINE, SETTINGS

TINY = {"api_requests": 40, "count": 600, "api_connections": 3, "sse_streams": 12,
        "sse_one_recipient_messages": 2, "profile": False, "plots": False}


@pytest.fixture
def bench(database: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Bench]:
    """The benchmark's context on the test run's database and broker; its logs in tmp."""
    from tests.conftest import BROKER_URL, STATE_REDIS_URL

    for module in (api, workers):
        monkeypatch.setattr(module, "RESULTS_DIR", tmp_path)
    config = BenchConfig(database_url=database, broker_url=BROKER_URL,
                         redis_url=STATE_REDIS_URL, **TINY)  # type: ignore[arg-type]
    with bench_database.connect(config.libpq_url) as conn:
        yield Bench(config, conn)


def run(bench: Bench, *names: str) -> dict[str, Outcome]:
    steps = plan(BenchConfig(**{**bench.config.__dict__, "only": names}))
    return {name: step(bench) for name, step in steps.items()}


def sane(figures: dict[str, Any], count: int) -> None:
    assert figures["count"] == count
    assert 0 < figures["p50"] <= figures["p99"] <= figures["max"]


def test_api_sends_give_rates_latencies_and_cpu_beside_the_producer(
    bench: Bench, tmp_path: Path,
) -> None:
    found = run(bench, "notify", "notify_many", "api_single", "api_lists")
    for name, requests, per_request in (("api_single", 40, 1), ("api_lists", 6, 100)):
        outcome, extra = found[name], found[name].extra
        assert extra["statuses"] == {"202": requests}, extra["sample_error"]
        assert extra["answered"] == requests and not extra["errors"]
        assert outcome.notifications == outcome.committed == requests * per_request
        sane(extra["request_latency_ms"], requests)
        assert extra["requests_per_s"] > 0
        assert extra["notifications_per_s_http"] == pytest.approx(
            extra["requests_per_s"] * per_request, rel=0.01)
        assert outcome.send_seconds <= outcome.seconds
        # The API and the generator are parties of their own, and the API did work.
        assert extra["send_cores"]["api"] > 0 and "loadgen" in extra["send_cores"]
        assert report.api_cpu_ms_per_request(outcome) is not None

    doc = json.loads(json.dumps(report.document(found, MACHINE, bench.config, 0.0, SETTINGS),
                                default=str))
    aims = doc["aims"]
    single = aims["api_single"]
    assert single["value"] == found["api_single"].extra["requests_per_s"]
    assert single["p99_ms"] == found["api_single"].extra["request_latency_ms"]["p99"]
    assert single["met"] is (single["value"] >= 2000 and single["p99_ms"] <= 20)
    assert aims["api_lists"]["value"] == pytest.approx(
        found["api_lists"].rate / found["notify_many"].rate, abs=0.01)
    figures = baseline.figures(doc)
    assert figures["api_single.p99"]["better"] == baseline.LOWER
    assert figures["api_lists.requests_per_s"]["better"] == baseline.HIGHER
    plots: dict[str, Path] = {}
    if importlib.util.find_spec("matplotlib"):  # the ``bench`` extra
        from bench.plots import write_plots

        plots = write_plots(doc, tmp_path)  # the API's throughput and latencies drawn
        assert {"throughput", "latency"} <= set(plots)
    text = report.write_markdown(found, doc, plots, path=tmp_path / "report.md").read_text()
    assert "## HTTP API: sends over keep-alive" in text
    assert "api_single: " in text and "against notify(), unbuffered" in text
    assert "| api_lists | lists end to end >= notify_many()'s rate |" in text
    assert "| api_single | >= 2,000 single sends/s, p99 <= 20 ms |" in text
    assert "| sse_fanout | every stream gets each message within 1 s | - |" in text


# -- the SSE client against the stream contract -----------------------------------------


def contract_item(recipient: str, n: int) -> dict[str, Any]:
    return InboxItem(uuid.uuid4(), recipient, uuid.uuid4(), None, "bench.live", "critical",
                     f"Live {n}", "body", {"n": n}, datetime.now(UTC), None, None,
                     None).as_json()


def sse_frames(recipient: str) -> bytes:
    """What the stream endpoint sends (its contract): ``retry:``, a heartbeat comment, a
    ready event, two messages (``id:`` the cursor, ``data:`` the item's JSON), then one
    whose id is not its cursor."""
    first, second, wrong = (contract_item(recipient, n) for n in range(3))
    events = ["retry: 2500\n\n", ": heartbeat\n\n", "event: ready\ndata: {}\n\n"]
    events += [f"id: {item['cursor']}\nevent: message\ndata: {json.dumps(item)}\n\n"
               for item in (first, second)]
    events.append(f"id: not-the-cursor\nevent: message\ndata: {json.dumps(wrong)}\n\n")
    return "".join(events).encode()


async def serve_and_read(streams: int) -> tuple[sse_client.StreamsRead, list[str]]:
    """A real HTTP server answering with chunked SSE, read by the real client."""
    paths: list[str] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = (await reader.readuntil(b"\r\n\r\n")).decode()
        paths.append(request.split(" ")[1])
        recipient = request.split("/")[3]
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")
        body = sse_frames(recipient)
        for start in range(0, len(body), 37):  # chunks that split lines and events
            piece = body[start:start + 37]
            writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            await writer.drain()
        writer.write(b"0\r\n\r\n")  # the end of the stream
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    spec = sse_client.StreamSpec("127.0.0.1", port, [(f"user-{i}", f"t{i}")
                                                     for i in range(streams)],
                                 expected=3 * streams, timeout=60, settle=5)
    lines: list[str] = []

    class Out:
        def write(self, text: str) -> None:
            lines.append(text)

        def flush(self) -> None:
            pass

    async with server:
        read = await sse_client.run(spec, Out())
    return read, ["".join(lines), *paths]


def test_the_sse_client_reads_the_stream_contract_and_flags_breaches() -> None:
    read, (opened, *paths) = asyncio.run(serve_and_read(5))
    assert json.loads(opened) == {"open": 5, "caught_up": 5, "statuses": {"200": 5},
                                  "errors": []}
    assert sorted(paths) == sorted(f"/v1/recipients/user-{i}/inbox/stream?token=t{i}"
                                   for i in range(5))
    assert len(read.events) == 10 and read.comments == 5 and read.others == {"ready": 5}
    assert {index for index, *_ in read.events} == set(range(5))
    assert all(at >= created for _, at, created, _ in read.events)
    # The third message of each stream broke the contract: named, not counted.
    assert len(read.broken) == 5 and "not the item's cursor" in read.broken[0]
    assert sorted(read.ended) == sorted(f"stream {i}: ended by the server" for i in range(5))


# -- sse_fanout against the real endpoint -----------------------------------------------


def stream_route_exists() -> bool:
    from notifier.api.app import create_app

    return "/v1/recipients/{recipient_id}/inbox/stream" in create_app().openapi()["paths"]


def test_sse_fanout_reaches_every_stream(bench: Bench, tmp_path: Path) -> None:
    if not stream_route_exists():
        pytest.skip("GET /v1/recipients/{id}/inbox/stream is not in this tree yet")
    profiled = profile.py_spy() is not None
    bench.config = BenchConfig(**{**bench.config.__dict__, "profile": profiled})
    found = run(bench, "sse_fanout")
    fanout = found["sse_fanout"]
    if profiled:  # an extra, untimed case sampled by py-spy (a tiny one may get none)
        taken = fanout.extra["profile"]
        assert taken["samples"] > 0 or taken["note"], taken
    streams = TINY["sse_streams"]
    many, one = fanout.extra["many_recipients"], fanout.extra["one_recipient"]
    assert many["open"] == one["open"] == streams
    assert (many["expected"], one["expected"]) == (streams, 2 * streams)
    for case in (many, one):
        assert case["received"] == case["distinct"] == case["expected"], case
        assert not case["broken"] and not case["ended"]
        sane(case["latency_ms"], case["expected"])
        assert case["api_rss_mib"] > 0 and "api" in case["cores"]  # 10 ms CPU ticks
    assert fanout.complete
    doc = json.loads(json.dumps(report.document(found, MACHINE, bench.config, 0.0, SETTINGS),
                                default=str))
    assert 0 <= doc["aims"]["sse_fanout"]["value"] <= 1
    text = report.write_markdown(found, doc, path=tmp_path / "report.md").read_text()
    assert f"## Live inbox: {streams:,} SSE streams on one API process" in text
