"""The ``hosts`` chaos scenario, small: two worker hosts (network namespaces) and two
beats, a few hundred notifications, host 1 cut off and back (``make chaos-hosts`` runs
it bigger). Needs root and ``ip netns``; skips with one line otherwise.

The cut lasts longer than this run's visibility timeout and delivery sweeper timeouts
(tests/conftest.py: 4 s and 3-6 s), so host 2 takes over what host 1 held while it is
away, and host 1 comes back to claims and batches that were taken from it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from chaos.network import PREFIX, unavailable
from chaos.scenarios import run_scenario
from tests.test_chaos import assert_nothing_lost_or_doubled, small

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(bool(unavailable()), reason=f"hosts: {unavailable()}")]


def test_two_hosts_and_two_beats_lose_and_double_nothing_when_one_host_is_cut_off(
        tmp_path: Path) -> None:
    config = small(tmp_path, scale=300, rate=30.0, hosts=2, beats=2, host_cut=8.0,
                   drain_timeout=60.0)
    result = run_scenario(config, "hosts")

    assert_nothing_lost_or_doubled(result)
    assert result.delivered + result.suppressed + result.dead_lettered == result.accepted
    assert result.details["ledger"]["unexpected"] == {}
    assert result.details["ledger"]["sent_not_received"] == 0
    # Every window flushed once, every delivery recorded sent once, by whichever host.
    assert result.details["repeated_events"] == {}
    hosts = result.details["hosts"]
    assert set(hosts) == {"host1", "host2"}
    for figures in hosts.values():  # both stored and sent
        assert figures["stored"].get("before", 0) > 0, figures
        assert figures["sent"]["total"] > 0, figures
    # Host 1 was away: host 2 stored, flushed and sent alone meanwhile.
    for kind in ("stored", "window", "sent"):
        assert hosts["host1"].get(kind, {}).get("during", 0) == 0, hosts["host1"]
        assert hosts["host2"][kind]["during"] > 0, hosts["host2"]
    # Both beats ticked; each of their ticks is a message some worker ran.
    beats = result.details["beats_sent"]
    assert len(beats) == 2 and all(sent.get("notifier.flush_windows") for sent in beats.values())
    assert result.details["teardown"] == []
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [line for line in left.splitlines()
                if line.startswith(f"{PREFIX}{os.getpid()}")]
