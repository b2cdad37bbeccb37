"""The HTTP API's scenarios: sends over keep-alive, and live inbox streams fanned out.

Each starts a real ``notifier api`` (``NOTIFIER_API_WORKERS`` processes: ``--api-workers``)
beside a real worker, on the benchmark's database and broker, and drives it from a
process of its own, so that its CPU is measured apart (``bench.cpu``: parties ``api``
and ``loadgen``):

* ``api_single``, ``api_lists``: ``POST /v1/notifications`` with one notification, or a
  list of ``api_list_size``, from the lean keep-alive generator of ``bench.http_load``
  (``api_connections`` connections, closed loop). Each request's latency (written ->
  answer read) and the requests per second while sending, then, as in every ingest
  scenario, the rate end to end: first request -> last row committed by the worker;
* ``sse_fanout``: ``sse_streams`` live inbox streams held open on one API process by
  ``bench.sse_client``, then new in-app messages through the whole pipeline
  (``notify_many`` -> ingest -> in-app delivery -> ``pg_notify`` -> the API's feed ->
  each stream): for each event, the row's ``created_at`` (stamped in the delivery's
  transaction, just before its commit) -> the event read by the client. Twice: one
  stream per recipient, one message each; and every stream on ONE recipient, each
  message fanned out to all of them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from bench import cpu, database, profile
from bench.config import REPO_ROOT, RESULTS_DIR, BenchConfig
from bench.scenarios import RECIPIENTS, Bench, Outcome, make_notifications
from bench.series import Samples, relative, summary
from bench.workers import Worker

#: The secret the benchmark's API signs recipient tokens with (its own database only).
TOKEN_SECRET = "bench-only-recipient-token-secret-0123456789abcdef"
#: Requests per minute of the benchmark's key: the check runs (a Redis call per
#: request, as in production) but never refuses.
KEY_RATE_LIMIT = 1_000_000_000
READY_TIMEOUT = 90.0
WARM_UP_REQUESTS = 50
#: Requests of the extra, untimed pass py-spy samples the API on.
PROFILE_REQUESTS = 5000
#: An SSE event read later than this after its row was stamped is late (issue 14).
FANOUT_AIM_MS = 1000.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ApiProcess:
    """``notifier api`` in a process group of its own, its log in ``bench/results``."""

    def __init__(self, config: BenchConfig, workers: int):
        self.workers = workers
        self.port = free_port()
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path: Path = RESULTS_DIR / "bench-api.log"
        # sse_fanout holds every stream on one process, all of them on ONE recipient in
        # its second case: the caps on streams are raised to let it.
        streams = str(max(2000, config.sse_streams + 10))
        env = {**config.worker_environment(), "NOTIFIER_API_TOKEN_SECRET": TOKEN_SECRET,
               "NOTIFIER_API_WORKERS": str(workers), "NOTIFIER_API_MAX_STREAMS": streams,
               "NOTIFIER_API_MAX_STREAMS_PER_RECIPIENT": streams}
        command = [sys.executable, "-c", "import sys; from notifier.ops.cli import main;"
                   " sys.argv[0] = 'notifier'; main()",
                   "api", "--address", "127.0.0.1", "--port", str(self.port)]
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> None:
        """Until ``/v1/health`` answers 200 (uvicorn's workers import slowly when loaded)."""
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"notifier api exited; see {self.log_path}")
            with suppress(OSError), urllib.request.urlopen(f"{self.url}/v1/health",
                                                           timeout=1) as answer:
                if answer.status == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"notifier api never answered; see {self.log_path}")

    def rss_mib(self) -> float:
        """Resident memory of the API's processes (the server and its workers), MiB."""
        total = 0
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            stat = cpu.proc_stat(int(entry.name))
            if stat and (int(entry.name) == self.pid or stat[0] == self.pid):
                with suppress(OSError):
                    for line in Path(f"/proc/{entry.name}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1])
        return round(total / 1024, 1)

    def stop(self) -> None:
        if self.process.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                self.process.wait(20)
        with suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.process.wait()


@contextmanager
def running_api(config: BenchConfig, workers: int | None = None) -> Iterator[ApiProcess]:
    api = ApiProcess(config, workers or config.api_workers)
    try:
        api.wait_ready()
        yield api
    finally:
        api.stop()


def make_key(name: str) -> str:
    """A send key, made as ``notifier api-keys create`` makes it."""
    from notifier.storage.api_keys import Scope, create_key
    from notifier.storage.db import session_scope

    with session_scope() as session:
        _, key = create_key(session, name, [Scope.SEND], KEY_RATE_LIMIT)
    return key


# -- a helper process: the load generator or the SSE client ---------------------------------


class Helper:
    """``python -m <module>`` fed one JSON line; it answers line by line and exits when
    its stdin closes (so its CPU can still be read once it has answered)."""

    def __init__(self, module: str, spec: dict[str, Any], config: BenchConfig):
        self.module = module
        self.process = subprocess.Popen(
            [sys.executable, "-m", module], cwd=REPO_ROOT, env=config.worker_environment(),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self._stdin: IO[str] = self.process.stdin  # type: ignore[assignment]
        self._stdout: IO[str] = self.process.stdout  # type: ignore[assignment]
        self.send(json.dumps(spec))

    @property
    def pid(self) -> int:
        return self.process.pid

    def send(self, line: str) -> None:
        self._stdin.write(line + "\n")
        self._stdin.flush()

    def answer(self) -> dict[str, Any]:
        line = self._stdout.readline()
        if not line:
            raise RuntimeError(f"{self.module} exited ({self.process.wait()})"
                               " without an answer")
        found: dict[str, Any] = json.loads(line)
        return found

    def close(self) -> None:
        with suppress(BrokenPipeError):
            self._stdin.close()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# -- api_single, api_lists -------------------------------------------------------------------


def bodies(list_size: int, requests: int) -> list[str]:
    """Each request's body: one notification (``list_size`` 0) or a list of them, the
    same notifications as every ingest scenario sends (``make_notifications``)."""
    per_request = max(1, list_size)
    payloads = make_notifications(requests * per_request)
    if not list_size:
        return [json.dumps(p) for p in payloads]
    return [json.dumps(payloads[i:i + list_size]) for i in range(0, len(payloads), list_size)]


@dataclass
class LoadRun:
    """One timed load: the generator's answer, CPU and the rows it led to."""

    result: dict[str, Any]
    send_seconds: float
    seconds: float
    committed: int
    cores: dict[str, float]
    send_cores: dict[str, float]
    series: list[tuple[float, int]]


def load_spec(api: ApiProcess, key: str, list_size: int, requests: int,
              connections: int) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": api.port, "path": "/v1/notifications",
            "authorization": f"Bearer {key}", "bodies": bodies(list_size, requests),
            "connections": connections}


def timed_load(bench: Bench, worker: Worker, api: ApiProcess, spec: dict[str, Any],
               expected_rows: int) -> LoadRun:
    """Run the generator once from a clean table; time it until every row is committed."""
    generator = Helper("bench.http_load", spec, bench.config)
    try:
        generator.answer()  # imported and ready: its start-up is not timed
        roots = {api.pid: "api", generator.pid: "loadgen"}
        samples: Samples = []
        with bench.counting_rows() as read:
            before = cpu.snapshot(worker.pid, roots=roots)
            start = time.perf_counter()
            samples.append((start, 0))
            with bench.sampling(read, samples):
                generator.send("go")
                result = generator.answer()
            sent = time.perf_counter()
            at_sent = cpu.snapshot(worker.pid, roots=roots)
        done_at, done = bench.wait_rows(expected_rows, samples=samples)
        after = cpu.snapshot(worker.pid, roots=roots)
    finally:
        generator.close()
    return LoadRun(result, sent - start, done_at - start, done,
                   cpu.cores_used(before, after, done_at - start),
                   cpu.cores_used(before, at_sent, sent - start), relative(samples, start))


def api_sends(bench: Bench, worker: Worker, name: str, list_size: int, notifications: int,
              ) -> Outcome:
    """``notifications`` sent over HTTP, one per request or in lists of ``list_size``."""
    config = bench.config
    per_request = max(1, list_size)
    requests = max(1, notifications // per_request)
    notifications = requests * per_request
    with running_api(config) as api:
        key = make_key(f"bench-{name}")
        database.reset(bench.conn, RECIPIENTS)
        warm = min(WARM_UP_REQUESTS, requests)
        timed_load(bench, worker, api, load_spec(api, key, list_size, warm,
                                                 config.api_connections), warm * per_request)
        database.reset(bench.conn, RECIPIENTS)
        spec = load_spec(api, key, list_size, requests, config.api_connections)
        run = timed_load(bench, worker, api, spec, notifications)
        extra = _load_figures(run, api, requests, per_request, config)
        if config.profile:
            extra["profile"] = _profiled_api(bench, worker, api, key, list_size, name)
    what = "1 notification" if not list_size else f"a list of {list_size}"
    label = (f"API: POST {what} per request, {config.api_connections} keep-alive conns,"
             f" {api.workers} API process{'es' if api.workers > 1 else ''}")
    return Outcome(name, label, notifications, run.seconds, run.send_seconds, run.committed,
                   run.cores, extra, series=run.series,
                   samples={"request": run.result["latencies_ms"]})


def _load_figures(run: LoadRun, api: ApiProcess, requests: int, per_request: int,
                  config: BenchConfig) -> dict[str, Any]:
    result = run.result
    answered = result["requests"]
    http_seconds = result["seconds"] or run.send_seconds
    return {
        "requests": requests, "answered": answered, "statuses": result["statuses"],
        "errors": result["errors"][:5], "sample_error": result["sample_error"],
        "per_request": per_request, "connections": config.api_connections,
        "api_workers": api.workers,
        "requests_per_s": round(answered / http_seconds, 1) if http_seconds else 0.0,
        "notifications_per_s_http": (round(answered * per_request / http_seconds, 1)
                                     if http_seconds else 0.0),
        "request_latency_ms": summary(result["latencies_ms"]),
        "send_cores": run.send_cores,
    }


def _profiled_api(bench: Bench, worker: Worker, api: ApiProcess, key: str, list_size: int,
                  name: str) -> dict[str, Any]:
    """An extra, untimed load with py-spy sampling the API's processes."""
    per_request = max(1, list_size)
    requests = max(1, PROFILE_REQUESTS // per_request)
    spec = load_spec(api, key, list_size, requests, bench.config.api_connections)
    what = f"notifier api ({api.workers} process(es)) under {name}'s load"
    keep = RESULTS_DIR / f"profile-{name}.txt"
    database.reset(bench.conn, RECIPIENTS)
    generator = Helper("bench.http_load", spec, bench.config)
    try:
        generator.answer()
        with profile.profiling(what, api.pid, keep, subprocesses=api.workers > 1) as found:
            generator.send("go")
            generator.answer()
    finally:
        generator.close()
    return found.as_dict()


def api_single(bench: Bench, worker: Worker) -> Outcome:
    return api_sends(bench, worker, "api_single", 0, bench.config.api_requests)


def api_lists(bench: Bench, worker: Worker) -> Outcome:
    config = bench.config
    return api_sends(bench, worker, "api_lists", config.api_list_size, config.count)


# -- sse_fanout ------------------------------------------------------------------------------


def tokens(recipients: list[str]) -> list[str]:
    """A recipient token for each (``notifier.pipeline.recipient_tokens.mint``), signed
    with the benchmark API's secret."""
    from pydantic import SecretStr

    from notifier.pipeline.recipient_tokens import mint
    from notifier.settings import get_settings

    settings = get_settings().model_copy(update={"api_token_secret": SecretStr(TOKEN_SECRET)})
    minted: dict[str, str] = {}
    for recipient in recipients:
        if recipient not in minted:
            minted[recipient] = mint(recipient, 3600, settings=settings)
    return [minted[recipient] for recipient in recipients]


def inapp_messages(recipients: list[str], first: int = 0) -> list[dict[str, Any]]:
    """New in-app messages, critical: delivered at once, never held for a digest."""
    return [{"recipient": recipient, "type": "bench.live", "title": f"Live {first + i}",
             "body": "A new message for the inbox.", "data": {"n": first + i},
             "channels": ["inapp"], "priority": "critical"}
            for i, recipient in enumerate(recipients)]


def inbox_rows(bench: Bench) -> int:
    row = bench.conn.execute("SELECT count(*) FROM inbox_messages").fetchone()
    return int(row[0]) if row else 0


def fanout_case(bench: Bench, worker: Worker, api: ApiProcess, case: str,
                stream_recipients: list[str], messages: list[dict[str, Any]],
                clock_offset_ms: float,
                sending: AbstractContextManager[Any] | None = None) -> dict[str, Any]:
    """Open a stream per entry of ``stream_recipients``, send ``messages``, and read
    every stream's events (``sending`` is entered for that part alone): the figures,
    with every latency in ms."""
    from notifier.client import notify_many

    per_recipient: dict[str, int] = {}
    for message in messages:
        per_recipient[message["recipient"]] = per_recipient.get(message["recipient"], 0) + 1
    expected = sum(per_recipient.get(r, 0) for r in stream_recipients)
    spec = {"host": "127.0.0.1", "port": api.port, "expected": expected,
            "streams": list(zip(stream_recipients, tokens(stream_recipients), strict=True)),
            "timeout": 30.0 + expected / 200}
    client = Helper("bench.sse_client", spec, bench.config)
    try:
        opened = client.answer()
        rss = api.rss_mib()
        roots = {api.pid: "api", client.pid: "loadgen"}
        before = cpu.snapshot(worker.pid, roots=roots)
        with sending or nullcontext():
            start, wall_start = time.perf_counter(), time.time()
            notify_many(messages)
            read = client.answer()
            seconds = time.perf_counter() - start
        cores = cpu.cores_used(before, cpu.snapshot(worker.pid, roots=roots), seconds)
    finally:
        client.close()
    # created_at is Postgres' clock; clock_offset_ms is Postgres minus ours.
    latencies = sorted(round((at - created) * 1000 + clock_offset_ms, 3)
                       for _, at, created, _ in read["events"])
    from_send = sorted(round((at - wall_start) * 1000, 3) for _, at, _, _ in read["events"])
    pairs = {(index, item) for index, _, _, item in read["events"]}
    return {
        "case": case, "streams": len(stream_recipients), "open": opened["open"],
        "caught_up": opened["caught_up"], "open_statuses": opened["statuses"],
        "open_errors": opened["errors"], "messages": len(messages), "expected": expected,
        "received": len(read["events"]), "distinct": len(pairs),
        "within_1s": sum(1 for ms in latencies if ms <= FANOUT_AIM_MS),
        "latency_ms": summary(latencies), "send_to_event_ms": summary(from_send),
        "broken": read["broken"][:5], "ended": read["ended"][:5],
        "heartbeats": read["comments"], "other_events": read["others"],
        "api_rss_mib": rss, "seconds": round(seconds, 3), "cores": cores,
        "latencies": latencies,
    }


def sse_fanout(bench: Bench, worker: Worker) -> Outcome:
    """``sse_streams`` streams on one API process, new in-app messages fanned out."""
    config = bench.config
    streams = config.sse_streams
    database.reset(bench.conn, max(RECIPIENTS, streams))
    offset = database.clock_offset_ms(bench.conn)
    recipients = [f"user-{i}" for i in range(streams)]
    with running_api(config, workers=1) as api:
        # Warm up the in-app path (the worker's delivery, the API's feed connection).
        fanout_case(bench, worker, api, "warm-up", recipients[:1],
                    inapp_messages(recipients[:1], first=-1), offset)
        many = fanout_case(bench, worker, api, "one stream per recipient", recipients,
                           inapp_messages(recipients), offset)
        one = fanout_case(bench, worker, api, "every stream on one recipient",
                          [recipients[0]] * streams,
                          inapp_messages([recipients[0]] * config.sse_one_recipient_messages,
                                         first=streams), offset)
        found = (_profiled_fanout(bench, worker, api, recipients, offset)
                 if config.profile else None)
    cases = {"many_recipients": many, "one_recipient": one}
    samples = {f"sse_{name}": case.pop("latencies") for name, case in cases.items()}
    expected = sum(case["expected"] for case in cases.values())
    received = sum(case["received"] for case in cases.values())
    seconds = sum(case["seconds"] for case in cases.values())
    label = f"SSE: {streams:,} live inbox streams on 1 API process"
    extra: dict[str, Any] = {"streams": streams, **cases, "inbox_rows": inbox_rows(bench)}
    if found is not None:
        extra["profile"] = found
    return Outcome("sse_fanout", label, expected, seconds, seconds, received,
                   cores=many["cores"], extra=extra, samples=samples)


def _profiled_fanout(bench: Bench, worker: Worker, api: ApiProcess, recipients: list[str],
                     offset: float) -> dict[str, Any]:
    """The one-recipient case once more, untimed, with py-spy sampling the API from the
    moment the messages are sent to the last event read."""
    config = bench.config
    streams = [recipients[0]] * config.sse_streams
    messages = inapp_messages([recipients[0]] * config.sse_one_recipient_messages,
                              first=2 * config.sse_streams)
    what = f"notifier api fanning out to {config.sse_streams:,} streams of one recipient"
    keep = RESULTS_DIR / "profile-sse_fanout.txt"
    taken: list[profile.Profile] = []

    @contextmanager
    def sampling() -> Iterator[None]:
        with profile.profiling(what, api.pid, keep) as found:
            taken.append(found)  # filled in when the block ends
            yield

    fanout_case(bench, worker, api, "profiled", streams, messages, offset, sampling())
    return taken[0].as_dict()
