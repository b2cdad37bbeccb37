"""No regression is silent: each figure of a run against the committed baseline.

``bench/baseline.json`` holds the figures (and the CPU profiles) of a chosen earlier
run, committed with the code it measured. Every run reads it and marks each figure that
got more than 15 % worse: a rate or ratio that fell below 85 % of the baseline's, a
latency or a CPU cost per item that rose above 115 % of it. The machine is shared and
noisy, so a mark is a reason to run again and to look at the profile, not a verdict.

Write a baseline from a quiet run with ``python -m bench --save-baseline`` or, from a
results file, ``python -m bench.baseline bench/results/latest.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BASELINE_PATH = Path(__file__).resolve().parent / "baseline.json"
#: A figure this much worse than the baseline's is marked.
THRESHOLD = 0.15
HIGHER, LOWER = "higher", "lower"
#: The figure no notifier change moves (Postgres and the machine only).
CONTROL = "raw_copy.rate"


@dataclass(frozen=True)
class Comparison:
    """One figure now and in the baseline."""

    key: str
    label: str
    unit: str
    better: str
    now: float
    before: float | None

    @property
    def change(self) -> float | None:
        """Relative change, now against the baseline (+0.1: 10 % larger)."""
        if self.before is None or self.before == 0:
            return None
        return self.now / self.before - 1

    @property
    def worse_by(self) -> float | None:
        """How much worse than the baseline (negative: better), in the figure's sense."""
        change = self.change
        if change is None:
            return None
        return -change if self.better == HIGHER else change

    @property
    def regressed(self) -> bool:
        worse = self.worse_by
        return worse is not None and worse > THRESHOLD


def figures(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The comparable figures of a results document (``latest.json``), by a stable key:
    ``{"label", "unit", "better", "value"}`` each."""
    found: dict[str, dict[str, Any]] = {}

    def add(key: str, label: str, unit: str, better: str, value: Any) -> None:
        if isinstance(value, int | float) and not isinstance(value, bool):
            found[key] = {"label": label, "unit": unit, "better": better,
                          "value": round(float(value), 3)}

    scenarios = document.get("scenarios", {})
    naive_rate = scenarios.get("naive", {}).get("rate_per_s")
    for name, scenario in scenarios.items():
        if scenario.get("complete", True):
            add(f"{name}.rate", f"{scenario['label']}: rate", "/s", HIGHER,
                scenario.get("rate_per_s"))
        if name in ("buffered", "notify_many") and naive_rate:
            add(f"{name}.x_naive", f"{scenario['label']}: x naive", "x", HIGHER,
                scenario["rate_per_s"] / naive_rate)
        _latency_figures(name, scenario, add)
        cost = scenario.get("extra", {}).get("cpu_ms_per_item")
        add(f"{name}.cpu_ms_per_item", f"{scenario['label']}: CPU per item", "ms", LOWER, cost)
    for name, ratio in document.get("delivery_ratios", {}).items():
        add(f"delivery_ratio.{name}", f"delivery ratio {name}", "x", HIGHER, ratio)
    return found


def _latency_figures(name: str, scenario: dict[str, Any], add: Any) -> None:
    extra = scenario.get("extra", {})
    if name == "critical_under_backlog":
        for kind in ("critical", "backlog"):
            figures = extra.get(f"{kind}_latency_ms", {})
            for quantile in ("p50", "p99"):
                add(f"{name}.{kind}_{quantile}", f"{kind} latency {quantile} under backlog",
                    "ms", LOWER, figures.get(quantile))
    if name == "flush_latency":
        add(f"{name}.p99", "flush latency p99", "ms", LOWER,
            extra.get("flush_latency_ms", {}).get("p99"))
    if name == "email_failover":
        for case, figures in extra.get("extra_ms", {}).items():
            add(f"{name}.{case}_extra_p99", f"failover ({case}): extra per attempt p99", "ms",
                LOWER, figures.get("p99"))
    if name in ("api_single", "api_lists"):
        add(f"{name}.requests_per_s", f"{scenario['label']}: requests/s", "/s", HIGHER,
            extra.get("requests_per_s"))
        add(f"{name}.p99", f"{scenario['label']}: request p99", "ms", LOWER,
            extra.get("request_latency_ms", {}).get("p99"))
    if name == "sse_fanout":
        for case in ("many_recipients", "one_recipient"):
            add(f"{name}.{case}_p99", f"SSE fan-out p99, {case.replace('_', ' ')}", "ms",
                LOWER, extra.get(case, {}).get("latency_ms", {}).get("p99"))
    if name == "aggregation_efficiency":
        add(f"{name}.saved", "aggregation: messages saved", "%", HIGHER,
            extra.get("messages_saved"))


def profiles(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The CPU profiles of a results document, by scenario."""
    return {name: scenario["extra"]["profile"]
            for name, scenario in document.get("scenarios", {}).items()
            if scenario.get("extra", {}).get("profile")}


def load(path: Path = BASELINE_PATH) -> dict[str, Any] | None:
    """The committed baseline, or None if there is none."""
    try:
        baseline: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    return baseline


def baseline_document(document: dict[str, Any]) -> dict[str, Any]:
    """What a baseline keeps of a run: where it came from, its figures, its profiles."""
    return {"machine": document.get("machine", {}), "command": document.get("command", ""),
            "figures": figures(document), "profiles": profiles(document)}


def save(document: dict[str, Any], path: Path = BASELINE_PATH) -> Path:
    path.write_text(json.dumps(baseline_document(document), indent=1, sort_keys=True) + "\n")
    return path


def compare(document: dict[str, Any], baseline: dict[str, Any]) -> list[Comparison]:
    """Each figure of this run beside the baseline's (None where the baseline lacks it)."""
    before = baseline.get("figures", {})
    return [
        Comparison(key, figure["label"], figure["unit"], figure["better"], figure["value"],
                   before.get(key, {}).get("value"))
        for key, figure in figures(document).items()
    ]


def _value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "%":
        return f"{value:.1%}"
    if unit == "x":
        return f"{value:,.2f}x"
    return f"{value:,.1f} {unit}" if unit == "ms" else f"{value:,.0f}{unit}"


def verdict(comparison: Comparison) -> str:
    worse = comparison.worse_by
    if worse is None:
        return "new" if comparison.before is None else ""
    if comparison.regressed:
        return f"**worse by {worse:.0%}**"
    return "better" if worse < -THRESHOLD else ""


def markdown(comparisons: list[Comparison], baseline: dict[str, Any] | None,
             path: Path = BASELINE_PATH) -> list[str]:
    """The comparison as report lines (or the one line saying there is no baseline)."""
    lines = ["", "## Against the baseline", ""]
    if baseline is None:
        return [*lines, f"No baseline ({path.name}): write one from a quiet run with"
                " `python -m bench --save-baseline`."]
    machine = baseline.get("machine", {})
    regressed = [c for c in comparisons if c.regressed]
    lines += [f"Baseline: run of {machine.get('date', '?')} (git"
              f" {machine.get('git_commit', '?')}). Marked: a figure more than"
              f" {THRESHOLD:.0%} worse (a rate or ratio lower, a latency or CPU cost"
              f" higher). {len(regressed)} of {len(comparisons)} figures marked"
              + (": " + ", ".join(c.key for c in regressed) if regressed else "") + ".",
              *_noise_note(comparisons, baseline),
              "", "| figure | baseline | now | change | |", "|---|---:|---:|---:|---|"]
    for c in comparisons:
        change = "" if c.change is None else f"{c.change:+.1%}"
        lines.append(f"| {c.label} | {_value(c.before, c.unit)} | {_value(c.now, c.unit)} |"
                     f" {change} | {verdict(c)} |")
    return lines


def _noise_note(comparisons: list[Comparison], baseline: dict[str, Any]) -> list[str]:
    """The raw COPY runs no notifier code: when it fell too, the machine was slower."""
    copy = next((c for c in comparisons if c.key == CONTROL), None)
    if copy is None or not copy.regressed or copy.worse_by is None:
        return []
    return ["", f"Raw COPY, which runs no notifier code, is itself {copy.worse_by:.0%} worse:"
            " the machine was busier than in the baseline's run (load average (1 min)"
            f" {_load(baseline)} then), so read the ratios to naive and run again before"
            " blaming the code."]


def _load(document: dict[str, Any]) -> str:
    load = document.get("machine", {}).get("load_average_at_start") or ["?"]
    return str(load[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="a results file (bench/results/latest.json)")
    parser.add_argument("--output", type=Path, default=BASELINE_PATH)
    args = parser.parse_args(argv)
    document = json.loads(args.results.read_text())
    path = save(document, args.output)
    print(f"baseline: {path} ({len(figures(document))} figures, from"
          f" {document.get('machine', {}).get('date', '?')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
