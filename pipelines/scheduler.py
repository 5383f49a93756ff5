"""The one way onto the model: a fair queue, adapter-aware ordering and fixed-shape batches.

Every generation is a `Job` handed to `FairScheduler.run`, which blocks its caller until the
job's images are made (or it is stopped). One worker thread owns the model and runs what
the scheduler picks next; Gradio's queue only holds connections. The rules:

* **Fairness.** Sessions take turns (round robin): after a session's job runs, that session
  goes to the back of the line. A session may have `per_session` jobs waiting and the whole
  queue `total` (past either, `QueueFullError` says which). A newcomer's job therefore waits
  at most one round: one job of each session ahead of it.
* **Adapter-aware order.** Among the sessions' next jobs, in turn order, the first one that
  needs the LoRA set and ControlNets already on the model goes first; each job it passes is
  counted, and a job passed `max_overtakes` times can no longer be passed. Switches saved
  are counted (`stats`).
* **Batches of a fixed shape.** Jobs whose forward pass is the same in everything but
  prompts, seeds and control images (equal `batch_key`) ride along with the job picked, up
  to `batch_size` images. The engine always runs `batch_size` images per forward pass,
  padding the empty places, so that a sample's bytes cannot depend on its companions: a job
  alone, or with any others, gives the same image (tests/test_scheduler.py).
* **Stop** takes a waiting job out at once. A running job's owner gets the Stop at once too;
  the batch goes on for its companions and stops early only when every member has stopped.

Engine-side: knows no Gradio (the page's progress is whatever `Job.progress` reports).
"""

from __future__ import annotations

import contextvars
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .errors import GenerationCancelled, StencilError

# How often a waiting caller looks at its Stop and tells its place in line.
POLL_S = 0.2
STOPPED_WAITING = "stopped before it started (it was waiting for the model)"


class QueueFullError(StencilError, RuntimeError):
    """A session (or the whole server) has as many jobs waiting as the rules allow."""


@dataclass(frozen=True)
class QueueRules:
    per_session: int = 4  # jobs one session may have waiting (its running one not counted)
    total: int = 64  # jobs waiting, all sessions together
    batch_size: int = 1  # images per forward pass; 1 = no batching
    max_overtakes: int = 2  # how often adapter-aware ordering may pass one job


class Job:
    """One request's work, as the scheduler sees it."""

    _numbers = itertools.count()

    def __init__(
        self,
        *,
        session: str | None,
        samples: int,
        adapter_key: Hashable = None,
        batch_key: Hashable = None,
        payload: Any = None,
        cancel: Any = None,
        progress: Callable[[int, int, str], None] | None = None,
        preview: Callable[[list, int, int], None] | None = None,
    ):
        self.number = next(self._numbers)
        self.session = session or f"anonymous-{self.number}"
        self.samples = samples
        self.adapter_key = adapter_key
        self.batch_key = batch_key  # None: never batched with others
        self.payload = payload  # what the engine needs to run it
        self.cancel = cancel
        self.progress = progress
        self.preview = preview
        self.overtaken = 0
        # The submitter's context (a web request's, say): its batch runs in it, so what
        # the host reads there (a GPU slot's quota holder) is the leader's.
        self.context = contextvars.copy_context()
        self._done = threading.Event()
        self._result: Any = None
        self._error: BaseException | None = None

    @property
    def stopped(self) -> bool:
        return bool(self.cancel is not None and self.cancel.cancelled)

    def report(self, done: int, total: int, stage: str) -> None:
        if self.progress is not None and not self.stopped:
            self.progress(done, total, stage)

    def show_preview(self, images: list, step: int, steps: int) -> None:
        if self.preview is not None and not self.stopped:
            self.preview(images, step, steps)

    def _finish(self, result: Any = None, error: BaseException | None = None) -> None:
        self._result, self._error = result, error
        self._done.set()


@dataclass
class SchedulerStats:
    runs: int = 0  # forward-pass groups the worker ran (one batch = one run)
    jobs: int = 0
    adapter_switches: int = 0
    switches_saved: int = 0  # times a job was picked out of turn because its set was on
    seconds_per_run: float | None = None  # a moving average, for the waiting estimate


@dataclass
class _Waiting:
    by_session: dict[str, deque] = field(default_factory=dict)
    turns: deque = field(default_factory=deque)  # sessions with waiting jobs, in turn order

    def count(self, session: str | None = None) -> int:
        if session is not None:
            return len(self.by_session.get(session, ()))
        return sum(len(jobs) for jobs in self.by_session.values())

    def add(self, job: Job) -> None:
        if job.session not in self.by_session:
            self.by_session[job.session] = deque()
            self.turns.append(job.session)
        self.by_session[job.session].append(job)

    def remove(self, job: Job) -> None:
        jobs = self.by_session[job.session]
        jobs.remove(job)
        if not jobs:
            del self.by_session[job.session]
            self.turns.remove(job.session)

    def heads(self) -> list[Job]:
        return [self.by_session[session][0] for session in self.turns]

    def in_turn_order(self) -> list[Job]:
        """Every waiting job in the order the rounds would run them (ignoring reordering)."""
        queues = [list(self.by_session[session]) for session in self.turns]
        depth = max((len(q) for q in queues), default=0)
        return [q[level] for level in range(depth) for q in queues if level < len(q)]

    def served(self, session: str) -> None:
        """The session had its turn: to the back of the line, if it still waits."""
        if session in self.by_session:
            self.turns.remove(session)
            self.turns.append(session)


class FairScheduler:
    def __init__(
        self,
        run_batch: Callable[[Sequence[Job]], Sequence[Any]],
        rules: QueueRules | None = None,
    ):
        """`run_batch(jobs)` runs the jobs on the model as one batch (they share a
        `batch_key`) and returns one result per job, in order."""
        self.rules = rules or QueueRules()
        self.stats = SchedulerStats()
        self._run_batch = run_batch
        self._waiting = _Waiting()
        self._running: list[Job] = []
        self._active_adapters: Hashable = None
        self._changed = threading.Condition()
        self._worker: threading.Thread | None = None
        self._held = 0

    # ---- the callers' side --------------------------------------------------------------

    def run(self, job: Job) -> Any:
        """Queue the job and wait for its result; raises what running it raised, or
        GenerationCancelled the moment its owner stops it."""
        self.submit(job)
        return self.wait(job)

    def submit(self, job: Job) -> None:
        if job.stopped:
            raise GenerationCancelled(STOPPED_WAITING)
        with self._changed:
            self._check_room(job)
            self._waiting.add(job)
            self._start_worker()
            self._changed.notify_all()

    def wait(self, job: Job) -> Any:
        while not job._done.wait(POLL_S):
            self._raise_if_stopped(job)
            self._tell_place(job)
        # A Stop that came while the last step ran still wins: its owner asked for nothing.
        self._raise_if_stopped(job)
        if job._error is not None:
            raise job._error
        return job._result

    def _raise_if_stopped(self, job: Job) -> None:
        if not job.stopped:
            return
        with self._changed:
            running = job in self._running
            alone = running and all(member.stopped for member in self._running)
        if alone:
            # Nobody else needs the pass: it stops within one step, and says at which.
            job._done.wait()
        if job._done.is_set() and isinstance(job._error, GenerationCancelled):
            raise job._error
        if running or job._done.is_set():
            # Its companions' images go on; only this one's is dropped.
            raise GenerationCancelled("stopped while it was being made")
        self._withdraw(job)
        raise GenerationCancelled(STOPPED_WAITING)

    def position(self, job: Job) -> int | None:
        """How many jobs run before this one (the running batch counts as one); None once
        it is no longer waiting."""
        with self._changed:
            order = self._waiting.in_turn_order()
            if job not in order:
                return None
            return order.index(job) + (1 if self._running else 0)

    def waiting_count(self) -> int:
        with self._changed:
            return self._waiting.count()

    @contextmanager
    def holding(self):
        """Nothing new starts on the model while this is held (what is running finishes):
        jobs submitted meanwhile are picked together once it is let go, as under load."""
        with self._changed:
            self._held += 1
        try:
            yield
        finally:
            with self._changed:
                self._held -= 1
                self._changed.notify_all()

    def _check_room(self, job: Job) -> None:
        rules = self.rules
        if self._waiting.count(job.session) >= rules.per_session:
            raise QueueFullError(
                f"you already have {rules.per_session} requests waiting, the most one person"
                " may have at once; this one was not queued. Wait for one to finish."
            )
        if self._waiting.count() >= rules.total:
            raise QueueFullError(
                f"the server's queue is full ({rules.total} requests waiting); this request"
                " was not queued. Try again in a minute."
            )

    def _withdraw(self, job: Job) -> None:
        with self._changed:
            if job in self._waiting.by_session.get(job.session, ()):
                self._waiting.remove(job)
            self._changed.notify_all()

    def _tell_place(self, job: Job) -> None:
        if job.progress is None or job in self._running:
            return
        ahead, per_run = self.position(job), self.stats.seconds_per_run
        if ahead is None:
            return
        when = "" if per_run is None else f", starts in about {max(1, round(ahead * per_run))} s"
        job.report(0, 1, f"waiting: {ahead} ahead in line{when}")

    # ---- the worker's side --------------------------------------------------------------

    def _start_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._work, name="stencil-model", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        while True:
            with self._changed:
                while self._held or not self._drop_stopped():
                    if not self._changed.wait(timeout=60):
                        self._worker = None  # idle for a minute: let the thread end
                        return
                batch = self._pick()
                self._running = batch
            started = time.perf_counter()
            try:
                results = batch[0].context.run(self._run_batch, batch)
            except BaseException as exc:  # every member learns what stopped its batch
                for job in batch:
                    job._finish(error=exc)
            else:
                for job, result in zip(batch, results, strict=True):
                    job._finish(result=result)
            self._record(batch, time.perf_counter() - started)

    def _record(self, batch: Sequence[Job], seconds: float) -> None:
        with self._changed:
            self._running = []
            stats = self.stats
            stats.runs += 1
            stats.jobs += len(batch)
            average = stats.seconds_per_run
            stats.seconds_per_run = seconds if average is None else 0.7 * average + 0.3 * seconds
            self._changed.notify_all()

    def _drop_stopped(self) -> int:
        """Take out jobs stopped since they queued (their callers are told already);
        how many remain."""
        for job in self._waiting.in_turn_order():
            if job.stopped:
                self._waiting.remove(job)
        return self._waiting.count()

    def _pick(self) -> list[Job]:
        """The next job by the rules above, and the companions that share its pass."""
        leader = self._next_in_turn()
        self._waiting.remove(leader)
        self._waiting.served(leader.session)
        if leader.adapter_key != self._active_adapters:
            self.stats.adapter_switches += 1
            self._active_adapters = leader.adapter_key
        batch, room = [leader], self.rules.batch_size - leader.samples
        if leader.batch_key is None:
            return batch
        for job in self._waiting.in_turn_order():
            if room <= 0:
                break
            if job.batch_key == leader.batch_key and job.samples <= room and not job.stopped:
                self._waiting.remove(job)
                batch.append(job)
                room -= job.samples
        return batch

    def _next_in_turn(self) -> Job:
        heads = self._waiting.heads()
        for index, job in enumerate(heads):
            if job.adapter_key == self._active_adapters:
                passed = heads[:index]
                if all(other.overtaken < self.rules.max_overtakes for other in passed):
                    for other in passed:
                        other.overtaken += 1
                    if passed:
                        self.stats.switches_saved += 1
                    return job
                break
        return heads[0]
