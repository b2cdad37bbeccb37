"""The table printed at the end, and ``chaos/results/latest.json``."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from chaos.config import ChaosConfig
from chaos.scenarios import Result

COLUMNS = (
    ("scenario", "name"), ("accepted", "accepted"), ("delivered", "delivered"),
    ("suppressed", "suppressed"), ("dead-lettered", "dead_lettered"), ("lost", "lost"),
    ("recorded twice", "recorded_twice"), ("sent twice to server", "sent_twice_to_server"),
    ("worker crashes", "worker_crashes"), ("kills", "kills"),
)


def _seconds(result: Result) -> str:
    parts = [f"{key} {value:g}" for key, value in result.seconds.items() if key != "total"]
    return f"{result.seconds.get('total', 0):g} s ({', '.join(parts)})" if parts else "-"


def rows(results: Sequence[Result]) -> list[list[str]]:
    table = []
    for result in results:
        if result.skipped:
            table.append([result.name, f"skipped: {result.skipped}"])
            continue
        cells = [f"{getattr(result, attr):,}" if attr != "name" else result.name
                 for _, attr in COLUMNS]
        verdict = "ok" if result.ok else ("ERROR" if result.error else "FAIL")
        table.append([*cells, _seconds(result), verdict])
    return table


def format_table(results: Sequence[Result]) -> str:
    header = [title for title, _ in COLUMNS] + ["time", "verdict"]
    body = rows(results)
    widths = [len(h) for h in header]
    for row in body:
        if len(row) == len(header):
            widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row in body:
        if len(row) != len(header):
            lines.append("  ".join(row))
            continue
        lines.append("  ".join(
            cell.ljust(w) if i == 0 or i >= len(COLUMNS) else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ))
    return "\n".join(lines)


def format_notes(results: Sequence[Result]) -> str:
    lines = []
    for result in results:
        for note in result.notes:
            lines.append(f"  {result.name}: {note}")
        if result.error:
            lines.append(f"  {result.name}: error:\n{result.error}")
    return "\n".join(lines)


def print_report(results: Sequence[Result], machine: dict[str, Any]) -> None:
    print()
    print(format_table(results))
    notes = format_notes(results)
    if notes:
        print("\nnotes:")
        print(notes)
    print(f"\nmachine: {machine.get('summary', '')}")


def machine_info(database: Any, broker_url: str) -> dict[str, Any]:
    import redis

    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "?"

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "?"
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{kb / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    row = database.execute("SHOW server_version").fetchone()
    client = redis.Redis.from_url(broker_url)
    try:
        redis_version = client.info("server")["redis_version"]
    finally:
        client.close()
    info = {
        "cpus": os.cpu_count(), "cpu": cpu, "memory": memory,
        "python": platform.python_version(), "postgres": row[0] if row else "?",
        "redis": redis_version, "celery": version("celery"), "kombu": version("kombu"),
        "hypothesis": version("hypothesis"), "platform": platform.platform(),
    }
    info["summary"] = (
        f"{info['cpus']} vCPUs {cpu}, {memory}, Python {info['python']}, PostgreSQL"
        f" {info['postgres']}, Redis {redis_version}, Celery {info['celery']},"
        f" kombu {info['kombu']}"
    )
    return info


def write_json(
    results: Sequence[Result], machine: dict[str, Any], config: ChaosConfig
) -> Path:
    from notifier.settings import get_settings

    config.results_dir.mkdir(parents=True, exist_ok=True)
    path = config.results_dir / "latest.json"
    settings = get_settings()
    document = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {**machine, "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "config": {
            "scale": config.scale, "fuzz_count": config.fuzz_count,
            "smtp_outage_s": config.smtp_outage, "redis_down_s": config.redis_down,
            "redis": config.redis,
            "postgres_down_s": config.postgres_down, "kills": config.kills,
            "rate_per_s": config.rate, "drain_timeout_s": config.drain_timeout,
            "seed": config.seed, "recovery_environment": config.recovery,
        },
        "notifier_settings": {
            name: getattr(settings, name) for name in (
                "visibility_timeout", "unacked_restore_interval", "ingest_batch_size",
                "ingest_commit_attempts", "retry_max_attempts", "retry_cap",
                "retry_countdown_max", "sweep_interval", "queued_timeout", "sending_timeout",
                "breaker_failure_threshold", "breaker_open_seconds",
            )
        },
        "scenarios": {result.name: result.as_dict() for result in results},
        "ok": all(result.ok for result in results),
    }
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return path
