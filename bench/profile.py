"""CPU profiles of the hot paths, sampled by py-spy from outside the profiled process.

py-spy, not an in-process profiler: one tool for both paths (this process for the
ingest code, a Celery worker and its pool processes for delivery), and the profiled code
runs unchanged, with no tracing hooks to slow it. The profiles are taken on an extra,
untimed pass of the scenario, so the sampler's own CPU (on a 2-core machine) never
touches the timed figures.

Only samples of a thread holding the GIL count (``--gil``): Python at work, not a wait
for Postgres or the SMTP server (those release the GIL). py-spy's default idle
detection is not enough here: on a loaded machine a process woken from a socket read
stays runnable, waiting for a core, and counted as busy, which made the pool's SMTP
reply waits the largest "CPU" share in a trial run. A share is thus a share of the
Python work of the hot path; C code that releases the GIL (libpq) is not in it.

If py-spy is missing or may not attach (ptrace permission: ``kernel.yama.ptrace_scope``,
or a container without ``CAP_SYS_PTRACE``), the profile is one line saying why, and the
run goes on.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Samples per second: enough for a few hundred samples in a pass of a few seconds.
RATE_HZ = 200
#: Functions listed per profile.
TOP = 12
#: How long py-spy may take to attach before the profiled pass starts anyway.
ATTACH_TIMEOUT = 10.0
#: Frames of the notifier's own code (listed apart: where our hot path spends).
OWN_CODE = "notifier/"


@dataclass
class Profile:
    """What one profiled pass showed: functions by share of the CPU samples."""

    what: str
    #: Where the raw stacks are kept (``bench/results/profile-<scenario>.txt``).
    raw: str = ""
    samples: int = 0
    #: (function, share of samples where it was the innermost frame), largest first.
    self_share: list[tuple[str, float]] = field(default_factory=list)
    #: (function, share of samples where it was anywhere on the stack) of notifier code.
    own_total_share: list[tuple[str, float]] = field(default_factory=list)
    #: Why there is no profile (py-spy missing, could not attach, ...); empty if there is.
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"what": self.what, "samples": self.samples, "rate_hz": RATE_HZ, "raw": self.raw,
                "self_share": [list(row) for row in self.self_share],
                "own_total_share": [list(row) for row in self.own_total_share],
                "note": self.note}


def py_spy() -> str | None:
    """The py-spy executable: next to this Python (the venv), else on the PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def parse_raw(text: str) -> tuple[Counter[tuple[str, ...]], int]:
    """py-spy's ``--format raw`` (``frame;frame;...;frame count`` per line, outermost
    first) as a counter of stacks; the ``process N:"cmd"`` frame that ``--subprocesses``
    puts first is dropped, so a function in any pool process counts as one."""
    stacks: Counter[tuple[str, ...]] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = tuple(f for f in stack.split(";") if not f.startswith("process "))
        if frames:
            stacks[frames] += int(count)
            total += int(count)
    return stacks, total


def summarise(what: str, stacks: Counter[tuple[str, ...]], total: int, top: int = TOP) -> Profile:
    """Top functions by self share (all code) and by inclusive share (notifier code)."""
    if not total:
        return Profile(what, note="py-spy took no sample while a thread was running")
    leaves: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, count in stacks.items():
        leaves[frames[-1]] += count
        for frame in set(frames):
            if OWN_CODE in frame:
                inclusive[frame] += count
    return Profile(
        what, samples=total,
        self_share=[(name, round(n / total, 4)) for name, n in leaves.most_common(top)],
        own_total_share=[(name, round(n / total, 4)) for name, n in inclusive.most_common(top)],
    )


@contextmanager
def profiling(
    what: str, pid: int, keep: Path, subprocesses: bool = False,
) -> Iterator[Profile]:
    """py-spy records ``pid`` (and its children) for the length of the block; the
    profile yielded is filled in when the block ends. The raw stacks are kept in
    ``keep`` (``flamegraph.pl`` or speedscope draw them)."""
    profile = Profile(what)
    executable = py_spy()
    if executable is None:
        profile.note = ("no profile: py-spy is not installed (`pip install -e \".[bench]\"`,"
                        " which `make bench` does)")
        yield profile
        return
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as directory:
        output = Path(directory) / "raw.txt"
        command = [executable, "record", "--pid", str(pid), "--format", "raw", "--function",
                   "--nonblocking", "--gil", "--rate", str(RATE_HZ), "--output", str(output)]
        if subprocesses:
            command.append("--subprocesses")
        sampler = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   text=True)
        log = _await_attach(sampler)
        try:
            yield profile
        finally:
            _stop(sampler)
        error = log()
        if output.exists() and output.stat().st_size:
            keep.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(output, keep)
            stacks, total = parse_raw(output.read_text())
            filled = summarise(what, stacks, total)
            profile.samples, profile.note, profile.raw = filled.samples, filled.note, keep.name
            profile.self_share, profile.own_total_share = (filled.self_share,
                                                           filled.own_total_share)
        else:
            profile.note = "no profile: py-spy could not record: " + _first_error(error)


def _await_attach(sampler: subprocess.Popen[str]) -> Any:
    """Wait until py-spy says it samples (or exits, or the timeout passes); return a
    function giving everything it wrote to stderr, read by a thread meanwhile."""
    lines: list[str] = []
    attached = threading.Event()

    def read() -> None:
        assert sampler.stderr is not None
        for line in sampler.stderr:
            lines.append(line.strip())
            if "Sampling process" in line:
                attached.set()
        attached.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    attached.wait(ATTACH_TIMEOUT)

    def log() -> list[str]:
        reader.join(5)
        return lines

    return log


def _stop(sampler: subprocess.Popen[str]) -> None:
    """Ctrl-C, as py-spy expects: it then writes its output and exits."""
    if sampler.poll() is None:
        sampler.send_signal(signal.SIGINT)
    try:
        sampler.wait(30)
    except subprocess.TimeoutExpired:
        sampler.kill()
        sampler.wait()


def _first_error(lines: list[str]) -> str:
    """py-spy's own explanation (e.g. permission denied), without its prefix."""
    useful = [line.removeprefix("py-spy>").strip() for line in lines if line.strip()]
    errors = [line for line in useful if "rror" in line or "ermission" in line]
    return (errors or useful or ["no output"])[0]


def markdown(profile: dict[str, Any], baseline: dict[str, Any] | None = None) -> list[str]:
    """One profile as report lines: the top functions by self share, then the notifier's
    own functions by inclusive share; beside each, its share in the baseline's profile."""
    if not profile.get("samples"):
        return ["", f"**{profile['what']}**: {profile.get('note') or 'no profile'}."]
    before = {name: share for name, share in (baseline or {}).get("self_share", [])}
    before_own = {name: share for name, share in (baseline or {}).get("own_total_share", [])}
    lines = ["", f"**{profile['what']}** (py-spy, {profile['rate_hz']} Hz,"
             f" {profile['samples']:,} samples holding the GIL):", "",
             "| function (self: innermost frame) | self | baseline |", "|---|---:|---:|"]
    lines += [f"| `{name}` | {share:.1%} | {_share(before.get(name))} |"
              for name, share in profile["self_share"]]
    if profile["own_total_share"]:
        lines += ["", "| notifier function (total: anywhere on the stack) | total | baseline |",
                  "|---|---:|---:|"]
        lines += [f"| `{name}` | {share:.1%} | {_share(before_own.get(name))} |"
                  for name, share in profile["own_total_share"]]
    return lines


def _share(value: float | None) -> str:
    return "" if value is None else f"{value:.1%}"
