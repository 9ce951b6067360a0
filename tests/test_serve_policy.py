"""The scheduler's policy (who runs next: live before batch, batch only in room live work leaves) and its
executors (one job at a time: a group whose clients all left stops through the generator's cancel event)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from adgen.generation import DecodingConfig, Generation
from adgen.serve.jobs import Job, QueueFull
from adgen.serve.policy import EngineRoom, SchedulingPolicy
from adgen.serve.scheduler import Scheduler

from fake_generator import FakeGeneratorBase

GREEDY = DecodingConfig(max_new_tokens=4)


def job(name: str, priority: str = "live", choices: int = 1, config=GREEDY, stream: bool = False) -> Job:
    return Job([name] * choices, config, True, stream, loop=None, priority=priority)


# ---- the policy alone ----------------------------------------------------------------------------
def test_live_jobs_go_to_the_engine_at_once_batch_jobs_only_into_spare_room():
    policy = SchedulingPolicy(max_queue=8, max_batch=8, live_reserve=2, batch_jobs_per_step=8)
    batch = [job(f"b{i}", "batch") for i in range(10)]
    for j in batch:
        policy.add(j)
    # an idle engine of 8 slots: batch rows may fill 8 - 2 reserved for people
    first = policy.admit(EngineRoom(slots=8, running=0, waiting=0, batch_rows=0))
    assert first == batch[:6]
    # people arrive while the batch runs: all of them go in, even past the free slots (the engine queues them)
    people = [job(f"p{i}") for i in range(3)]
    for j in people:
        policy.add(j)
    assert policy.admit(EngineRoom(slots=8, running=6, waiting=0, batch_rows=6)) == people
    # a request waiting in the engine: no batch row may start (it would take the slot that person needs)
    assert policy.admit(EngineRoom(slots=8, running=8, waiting=1, batch_rows=6)) == []
    # two batch rows ended and no one waits: two more rows, never past the batch's share
    assert policy.admit(EngineRoom(slots=8, running=4, waiting=0, batch_rows=4)) == batch[6:8]
    assert policy.waiting("batch") == 2


def test_batch_jobs_are_handed_out_a_few_per_step():
    """A wave of finished rows is refilled over several steps: a person arriving meanwhile waits behind at most
    `batch_jobs_per_step` batch prefills in the engine's queue."""
    policy = SchedulingPolicy(max_queue=8, max_batch=32, live_reserve=8, batch_jobs_per_step=2)
    batch = [job(f"b{i}", "batch") for i in range(10)]
    for j in batch:
        policy.add(j)
    room = EngineRoom(slots=40, running=0, waiting=0, batch_rows=0)
    assert policy.admit(room) == batch[:2]
    person = job("p")
    policy.add(person)
    # while that person's request is running (or waiting), one batch prefill per step: each step they wait out
    # before their first token, and each step of their decoding, carries at most one batch prefill
    assert policy.admit(EngineRoom(slots=40, running=2, waiting=0, batch_rows=2)) == [person, batch[2]]
    assert policy.admit(EngineRoom(slots=40, running=4, waiting=0, batch_rows=3)) == [batch[3]]
    # the person's request ended: back to `batch_jobs_per_step`
    assert policy.admit(EngineRoom(slots=40, running=4, waiting=0, batch_rows=4)) == batch[4:6]


def test_an_idle_engine_takes_a_batch_job_larger_than_the_batch_share():
    policy = SchedulingPolicy(max_queue=8, max_batch=4, live_reserve=3)
    big = job("b", "batch", choices=3, config=DecodingConfig(do_sample=True, max_new_tokens=4))
    policy.add(big)
    assert policy.admit(EngineRoom(slots=4, running=1, waiting=0, batch_rows=0)) == []  # busy: it waits
    assert policy.admit(EngineRoom(slots=4, running=0, waiting=0, batch_rows=0)) == [big]  # idle: it never starves


def test_the_queue_limit_counts_live_work_only():
    policy = SchedulingPolicy(max_queue=2, max_batch=4)
    policy.add(job("a"))
    with pytest.raises(QueueFull, match="2 requests"):
        policy.add(job("b"), engine_waiting=1)
    for i in range(50):  # a catalog's rows are fed by their own runner: not limited here
        policy.add(job(f"r{i}", "batch"))
    assert policy.waiting() == 51


def test_one_job_at_a_time_serves_live_first_and_merges_equal_greedy_jobs():
    policy = SchedulingPolicy(max_queue=8, max_batch=3)
    b1, b2 = job("b1", "batch"), job("b2", "batch")
    p1, p2, p3, p4 = job("p1"), job("p2"), job("p3"), job("p4")
    for j in (b1, p1, b2, p2, p3, p4):
        policy.add(j)
    assert policy.next_group() == [p1, p2, p3]  # live first; up to max_batch prompts in one call
    assert policy.next_group() == [p4, b1, b2]  # then the rest, batch rows joining the same call
    assert policy.next_group() is None


# ---- the scheduler with one job at a time --------------------------------------------------------
class CancellableGenerator(FakeGeneratorBase):
    """`generate` runs 'steps' until its cancel event is set (as HFGenerator.generate does) or 2000 steps."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.steps = 0
        self.started = threading.Event()

    def generate(self, prompts, config, cancel=None):
        self.calls.append(list(prompts))
        self.started.set()
        for _ in range(2000):
            if cancel is not None and cancel.is_set():
                break
            self.steps += 1
            time.sleep(0.001)
        return [Generation(f"out({p})", 1, 2, "stop") for p in prompts]


def test_a_group_whose_clients_all_left_stops_early_and_the_worker_goes_on():
    gen = CancellableGenerator()
    sched = Scheduler(gen, continuous=False)

    async def run():
        tasks = [asyncio.create_task(sched.complete([f"p{i}"], GREEDY)) for i in range(2)]
        while not gen.started.is_set():
            await asyncio.sleep(0.01)
        for t in tasks:
            t.cancel()  # both clients give up (complete() abandons its job on the way out)
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(run())
    deadline = time.monotonic() + 5
    while sched.stats()["cancelled"] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    st = sched.stats()
    assert st["cancelled"] == 2 and st["active_generations"] == 0 and st["completed"] == 0
    assert gen.steps < 1000  # stopped soon after the last client left, not after 2000 steps
    gen.started.clear()
    out = asyncio.run(sched.complete(["after"], GREEDY))
    assert out[0].text == "out(after)"
    sched.close()


# ---- the scheduler on the engine (tiny random Llama-3) -------------------------------------------
def test_a_person_gets_a_slot_at_once_while_batch_rows_fill_the_rest(tiny_llama3_dir):
    """--batch-size 4 and 1 slot kept for people (on a CPU on top of the 4): a catalog of 8 rows runs 4 at a time;
    a live request that arrives while they decode starts at once (its first token before the 5th row starts),
    and every row gets its own text."""
    from adgen.generation import load_generator

    gen = load_generator(str(tiny_llama3_dir))
    sched = Scheduler(gen, max_batch=4, live_reserve=1)
    long = DecodingConfig(max_new_tokens=60, loop_detection=False, end_after_chars=0, banned_strings=())
    firsts: dict[str, float] = {}
    most_batch_rows = 0
    first_token = sched.first_token

    def record(j):
        nonlocal most_batch_rows
        firsts[j.prompts[0][0]["content"]] = time.monotonic()
        most_batch_rows = max(most_batch_rows, sched.executor.room().batch_rows)
        first_token(j)

    sched.first_token = record
    sched.executor.outcomes = sched

    async def run():
        rows = [asyncio.create_task(sched.complete([[{"role": "user", "content": f"类型#裙*颜色#{i}"}]], long,
                                                   priority="batch")) for i in range(8)]
        while len(firsts) < 4:
            await asyncio.sleep(0.005)
        person = await sched.complete([[{"role": "user", "content": "类型#上衣"}]], DecodingConfig(max_new_tokens=5))
        return person, await asyncio.gather(*rows)

    person, rows = asyncio.run(run())
    sched.close()
    assert person[0].completion_tokens >= 1 and len(rows) == 8
    assert sched.engine.slots == 5 and most_batch_rows <= 4  # the reserved slot stayed free of batch rows
    fifth_row = sorted(t for k, t in firsts.items() if k != "类型#上衣")[4]
    assert firsts["类型#上衣"] < fifth_row


def test_one_job_at_a_time_on_model_generate_stops_when_its_clients_leave(tiny_llama3_dir):
    """`continuous=False` (model.generate batches): a running group whose clients all left stops within a few
    forward passes through HFGenerator.generate's cancel event, and the next request is answered."""
    from adgen.generation import load_generator

    gen = load_generator(str(tiny_llama3_dir), continuous=False)
    sched = Scheduler(gen, continuous=False)
    long = DecodingConfig(max_new_tokens=1500, loop_detection=False, end_after_chars=0, banned_strings=())
    prompt = [[{"role": "user", "content": "类型#裙"}]]

    async def run():
        task = asyncio.create_task(sched.complete(prompt, long))
        while sched.stats()["model_forward_calls"] < 5:
            await asyncio.sleep(0.005)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(run())
    deadline = time.monotonic() + 10
    while sched.stats()["cancelled"] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    calls = sched.stats()["model_forward_calls"]
    assert sched.stats()["cancelled"] == 1 and calls < 200, calls  # not the 1500 steps it asked for
    out = asyncio.run(sched.complete(prompt, DecodingConfig(max_new_tokens=3)))
    assert out[0].completion_tokens >= 1
    sched.close()
