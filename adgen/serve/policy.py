"""Which waiting jobs run next. The policy only decides; the executors run what it hands out.

The rules, in one place:
- Live jobs before batch jobs; first come, first served within a class.
- Continuous batching: every live job goes to the engine as soon as it arrives (the engine's own queue keeps
  their order when its slots are full). A batch job goes only into room nobody live needs: while no request
  waits in the engine, and while the batch's rows leave `live_reserve` of the engine's slots free, so a person
  arriving while a catalog runs gets a slot at once instead of waiting for a catalog row to end; and at most
  `batch_jobs_per_step` batch jobs per decision, so that person's prefill queues behind a few batch prefills,
  not behind a wave of them; while live requests run or wait, `batch_jobs_beside_live` (1): every decode step
  then carries at most one batch prefill, so the step a person waits out before their own prefill stays short
  (a batch row decodes for tens of steps, so one new row per step still keeps the batch's share of slots full).
- One job at a time (backends without the engine): the next job is the oldest live one, else the oldest batch
  one; waiting non-streaming jobs with the same decoding and adapter join it up to `max_batch` prompts.
- The queue limit (`max_queue`) counts live work; batch work is fed in by its own runner, a few rows at a time.

Not thread-safe on its own: the scheduler calls it under its one lock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from adgen.serve.jobs import PRIORITIES, Job, Priority, QueueFull


@dataclass(frozen=True)
class EngineRoom:
    """The engine's occupancy when the policy decides: slots, requests decoding, requests queued in it,
    and how many of those (decoding or queued) are rows of batch jobs."""

    slots: int
    running: int
    waiting: int
    batch_rows: int

    @property
    def free(self) -> int:
        return max(0, self.slots - self.running - self.waiting)


class SchedulingPolicy:
    def __init__(self, *, max_queue: int, max_batch: int, live_reserve: int = 0, batch_jobs_per_step: int = 2,
                 batch_jobs_beside_live: int = 1) -> None:
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.live_reserve = live_reserve
        # batch jobs handed to the engine per decision: a wave of finished rows is refilled over a few steps, so a
        # person arriving then waits behind at most this many batch prefills, not a whole wave of them
        self.batch_jobs_per_step = batch_jobs_per_step
        self.batch_jobs_beside_live = min(batch_jobs_beside_live, batch_jobs_per_step)
        self._waiting: dict[Priority, deque[Job]] = {p: deque() for p in PRIORITIES}

    # ---- the queue ------------------------------------------------------------------------------
    def add(self, job: Job, *, engine_waiting: int = 0) -> None:
        """Queue a job, or QueueFull when `max_queue` live requests already wait (here or in the engine)."""
        if job.priority == "live":
            queued = len(self._waiting["live"]) + engine_waiting
            if queued >= self.max_queue:
                raise QueueFull(f"{queued} requests are already waiting")
        self._waiting[job.priority].append(job)

    def remove(self, job: Job) -> bool:
        """Take a job out of the queue; False when it was no longer there (already handed out)."""
        try:
            self._waiting[job.priority].remove(job)
        except ValueError:
            return False
        return True

    def waiting(self, priority: Priority | None = None) -> int:
        if priority is not None:
            return len(self._waiting[priority])
        return sum(len(q) for q in self._waiting.values())

    def __bool__(self) -> bool:
        return any(self._waiting.values())

    def drain(self) -> list[Job]:
        """Every waiting job, taken out (shutting down)."""
        jobs = [job for p in PRIORITIES for job in self._waiting[p]]
        for q in self._waiting.values():
            q.clear()
        return jobs

    # ---- continuous batching ------------------------------------------------------------------
    def admit(self, room: EngineRoom) -> list[Job]:
        """The jobs to start on the engine now (their choices become engine requests)."""
        jobs = list(self._waiting["live"])
        self._waiting["live"].clear()
        batch = self._waiting["batch"]
        if not batch:
            return jobs
        queued_rows = room.waiting + sum(len(j.distinct_choices()) for j in jobs if not j.cancel.is_set())
        free = room.slots - room.running - queued_rows
        budget = room.slots - self.live_reserve - room.batch_rows
        live_rows = room.running + queued_rows - room.batch_rows
        per_step = self.batch_jobs_beside_live if live_rows > 0 else self.batch_jobs_per_step
        taken = 0
        while batch and taken < per_step:
            job = batch[0]
            need = 0 if job.cancel.is_set() else len(job.distinct_choices())
            idle = room.running == 0 and queued_rows == 0 and room.batch_rows == 0
            if need and not idle and (need > free or need > budget):
                break  # (an idle engine takes one batch job of any size: it must not wait forever)
            jobs.append(batch.popleft())
            taken += 1
            free -= need
            budget -= need
            queued_rows += need
        return jobs

    # ---- one job at a time --------------------------------------------------------------------
    def next_group(self) -> list[Job] | None:
        """The next job, with the waiting non-streaming jobs that can share its `generator.generate` call."""
        queue = next((self._waiting[p] for p in PRIORITIES if self._waiting[p]), None)
        if queue is None:
            return None
        job = queue.popleft()
        key = job.batch_key()
        if key is None or job.cancel.is_set():
            return [job]
        group, size = [job], len(job.prompts)
        for p in PRIORITIES:
            keep: deque[Job] = deque()
            for other in self._waiting[p]:
                if not other.cancel.is_set() and other.batch_key() == key and size + len(other.prompts) <= self.max_batch:
                    group.append(other)
                    size += len(other.prompts)
                else:
                    keep.append(other)
            self._waiting[p] = keep
        return group
