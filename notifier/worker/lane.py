"""The critical lane: pool processes beyond what ``-c`` asks for
(``NOTIFIER_CRITICAL_LANES``, two by default), kept free for critical ingest batches,
so a critical notification never waits for a bulk batch.

Celery's prefork pool writes a job to any idle process (``-O fair``, the default) and
queues it first-in-first-out when none is idle: with ``-c 2`` and two bulk batches of
500 notifications in progress, a critical batch waited for one of them to finish
(100-300 ms under load). This bootstep starts the pool with ``-c`` + the lanes'
processes and leaves everything else at ``-c``:

* Celery's own tasks (deliveries, flushes, sweeps) take a slot of the worker's
  semaphore as always, and that semaphore keeps its ``-c`` slots;
* bulk ingest batches take a slot of the same semaphore
  (:class:`notifier.worker.batching.CommittedBatches`), so deliveries and bulk batches
  together never occupy more than ``-c`` processes;
* one critical batch per lane process runs without a slot (:class:`SlotLedger` keeps
  the semaphore's count right, since the pool releases a slot whenever any job ends);
  criticals arriving while every lane is busy gather for the next free one, and while
  they flow bulk batches hold one process fewer (``CommittedBatches``
  ``_urgent_overflows`` and ``_bulk_slots`` say why). Two lanes, not one: a lane
  batch under load takes 10-15 ms, criticals arriving meanwhile waited for all of it.

Only for the prefork pool on an event loop (what ``celery -A notifier worker`` runs);
with ``--pool solo``/``threads`` or ``--autoscale`` there is no lane and critical
batches simply go first among the batches waiting for a process, as before.
"""

from __future__ import annotations

from typing import Any

from celery import bootsteps

from notifier.settings import get_settings


class CriticalLane(bootsteps.Step):
    """Grow the pool by ``NOTIFIER_CRITICAL_LANES`` processes before it starts, leaving
    the worker's semaphore (the slots of Celery's own tasks) as ``-c`` made it."""

    label = "critical lane"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        parent.critical_lane = 0
        super().__init__(parent, **kwargs)

    def create(self, parent: Any) -> None:
        lanes = get_settings().critical_lanes
        if lanes and lane_possible(parent):
            parent.pool.limit += lanes  # read when the pool starts its processes
            parent.critical_lane = lanes


def lane_possible(worker: Any) -> bool:
    """A prefork pool guarded by the worker's semaphore, on an event loop, fixed size."""
    pool = getattr(worker, "pool", None)
    return bool(
        worker.use_eventloop and not worker.autoscale and pool is not None
        and getattr(worker, "semaphore", None) is not None
        and worker.process_task == worker._process_task_sem
        and getattr(pool, "uses_semaphore", False)
    )


class SlotLedger:
    """The worker's semaphore, shared by Celery's tasks and bulk ingest batches, with
    the critical lanes' jobs accounted for.

    The pool releases a slot whenever *any* job ends, the lanes' included (billiard
    releases before it calls the job's callback), though a lane job took none. So each
    running lane job keeps a waiter ("keep") first in the semaphore's line: the next
    release goes to a keep and is kept, never to a waiting task. Slots never exceed
    ``-c``, not even for a moment (a ``-c 1`` worker never sends two deliveries at
    once).

    A keep cannot tell whose release it took. When another job ended first, its slot
    was kept instead: :meth:`settle` (called as each lane job ends and whenever the
    batches are dispatched) sees fewer keeps waiting than lane jobs running, puts a
    keep back and hands the slot on. Without it, with two lanes taking turns, keeps
    were always waiting and took every bulk batch's release for as long as criticals
    flowed: bulk ingest nearly stopped.
    """

    def __init__(self, semaphore: Any) -> None:
        self.semaphore = semaphore
        self.held = 0  # slots taken for batches not yet sent to the pool
        self.waiting = False
        self.lanes_running = 0

    def take(self, on_granted: Any) -> bool:
        """A slot now (True), or ``on_granted()`` once one is free, after the tasks
        already waiting (False). At most one wait at a time."""
        if self.held:
            return True
        if self.waiting and self.semaphore.value > 0:
            self.waiting = False  # a semaphore cleared on reconnect dropped our wait
        if self.waiting:
            return False
        self.waiting = True
        self.semaphore.acquire(self._granted, on_granted)
        return self.held > 0

    def _granted(self, on_granted: Any) -> None:
        if not self.waiting:  # a stale wait: give the slot back
            self._hand_on()
            return
        self.waiting = False
        self.held += 1
        on_granted()

    def spend(self) -> None:
        """A held slot goes with a batch to the pool (which releases it at the end)."""
        self.held -= 1

    def give_back(self) -> None:
        """Return a held slot nothing needs any more."""
        while self.held:
            self.held -= 1
            self._hand_on()

    def lane_started(self) -> None:
        self.lanes_running += 1
        self._add_keep()

    def lane_ended(self) -> None:
        """The pool has just released for this job (a keep took it, or will take it
        when a lost process is replaced); hand on any slot a keep took from another."""
        self.lanes_running -= 1
        self.settle()

    def settle(self) -> None:
        """One keep waiting per running lane job: a keep missing took the release of
        another job, whose slot goes to the first waiter that is not a keep (or back
        to the semaphore). Never more: a lane job whose release is still to come (its
        process was lost) has a keep too many until it comes."""
        while self._keeps_waiting() < self.lanes_running:
            self._add_keep()
            self._hand_on()

    # kombu's semaphore has no public way to wait ahead of the line; its waiters are
    # (callback, args, kwargs) in a deque served from the left, and it is cleared (keeps
    # included) when the consumer reconnects: so keeps are counted, not remembered.

    def _add_keep(self) -> None:
        self.semaphore._waiting.appendleft((_keep, (), {}))

    def _keeps_waiting(self) -> int:
        return sum(1 for waiter in self.semaphore._waiting if waiter[0] is _keep)

    def _hand_on(self) -> None:
        """Release one slot past the keeps: to the first other waiter, else back."""
        waiting = self.semaphore._waiting
        for index, (callback, args, kwargs) in enumerate(waiting):
            if callback is not _keep:
                del waiting[index]
                callback(*args, **kwargs)
                return
        self.semaphore.value = min(self.semaphore.value + 1, self.semaphore.initial_value)


def _keep() -> None:
    """A release taken by a keep: no task gets it (see :class:`SlotLedger`)."""
