"""Many users on one model: fair turns, caps, adapter-aware order, and batches that never
change anyone's image.

The rules are tested first on the scheduler alone, with a stand-in for the model that
records what ran (no timing: the test holds the scheduler while it queues jobs, so what the
worker sees is exactly the queue the test built). Then on the tiny model, with batching on.
"""

from __future__ import annotations

import contextvars
import pickle
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import ROOT

from pipelines.engine import CancelToken, Engine
from pipelines.errors import GenerationCancelled
from pipelines.families import FAMILIES
from pipelines.requests import ControlUnit, GenerationRequest, LoraChoice
from pipelines.scheduler import FairScheduler, Job, QueueFullError, QueueRules


class Model:
    """Stands in for the engine's run: records each batch, by the jobs' labels."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def __call__(self, jobs):
        self.batches.append([job.payload for job in jobs])
        return [f"image of {job.payload}" for job in jobs]

    @property
    def order(self) -> list[str]:
        return [label for batch in self.batches for label in batch]


def job(label: str, session: str, adapters=None, batch=None, samples=1, **kwargs) -> Job:
    return Job(
        session=session,
        samples=samples,
        adapter_key=adapters,
        batch_key=batch,
        payload=label,
        **kwargs,
    )


def run_all(scheduler: FairScheduler, jobs: list[Job]) -> list:
    return [scheduler.wait(j) for j in jobs]


def test_a_flooding_session_is_capped_and_a_newcomer_runs_within_one_round():
    model = Model()
    scheduler = FairScheduler(model, QueueRules(per_session=4, total=64))
    accepted, refused = [], []
    with scheduler.holding():
        for index in range(20):
            flood = job(f"A{index}", "flooder")
            try:
                scheduler.submit(flood)
                accepted.append(flood)
            except QueueFullError as exc:
                refused.append(str(exc))
        newcomer = job("B0", "newcomer")
        scheduler.submit(newcomer)
    assert len(accepted) == 4 and len(refused) == 16
    assert "you already have 4 requests waiting" in refused[0]
    assert run_all(scheduler, [*accepted, newcomer])[-1] == "image of B0"
    assert model.order == ["A0", "B0", "A1", "A2", "A3"]  # the newcomer waited one turn


def test_the_whole_queue_has_a_bound_too():
    scheduler = FairScheduler(Model(), QueueRules(per_session=4, total=3))
    with scheduler.holding():
        jobs = [job(f"S{i}", f"session-{i}") for i in range(3)]
        for j in jobs:
            scheduler.submit(j)
        with pytest.raises(QueueFullError, match="the server's queue is full"):
            scheduler.submit(job("late", "late"))
    run_all(scheduler, jobs)


def test_sessions_take_turns_round_robin():
    model = Model()
    scheduler = FairScheduler(model)
    with scheduler.holding():
        jobs = [job(f"{s}{i}", s) for s in "ABC" for i in range(3)]
        for j in jobs:
            scheduler.submit(j)
    run_all(scheduler, jobs)
    assert model.order == ["A0", "B0", "C0", "A1", "B1", "C1", "A2", "B2", "C2"]


def test_a_job_whose_adapters_are_loaded_goes_first_but_passes_no_one_too_often():
    model = Model()
    scheduler = FairScheduler(model, QueueRules(max_overtakes=2))
    first = job("X-first", "s0", adapters="X")
    scheduler.run(first)  # X is now on the model
    with scheduler.holding():
        jobs = [
            job("Y", "s1", adapters="Y"),
            job("X1", "s2", adapters="X"),
            job("X2", "s3", adapters="X"),
            job("X3", "s4", adapters="X"),
        ]
        for j in jobs:
            scheduler.submit(j)
    run_all(scheduler, jobs)
    # Y is passed twice (the bound), then runs although X3 would have saved a switch.
    assert model.order == ["X-first", "X1", "X2", "Y", "X3"]
    assert scheduler.stats.switches_saved == 2
    assert scheduler.stats.adapter_switches == 3  # none -> X, X -> Y, Y -> X


def test_compatible_jobs_share_a_batch_up_to_its_size_and_others_do_not():
    model = Model()
    scheduler = FairScheduler(model, QueueRules(batch_size=4))
    with scheduler.holding():
        jobs = [
            job("a", "s1", batch="k"),
            job("b", "s2", batch="other"),
            job("c", "s3", batch="k", samples=2),
            job("d", "s4", batch="k", samples=2),  # no room left beside a and c
            job("e", "s5", batch="k"),
        ]
        for j in jobs:
            scheduler.submit(j)
    results = run_all(scheduler, jobs)
    assert results == [f"image of {label}" for label in "abcde"]
    assert model.batches == [["a", "c", "e"], ["b"], ["d"]]


def test_a_waiting_job_hears_its_place_and_a_stopped_one_leaves_at_once():
    model = Model()
    scheduler = FairScheduler(model)
    heard: list[str] = []
    token = CancelToken()
    with scheduler.holding():
        ahead = [job(f"A{i}", f"a{i}") for i in range(2)]
        for j in ahead:
            scheduler.submit(j)
        waiting = job("W", "w", progress=lambda done, total, stage: heard.append(stage))
        stopped = job("S", "s", cancel=token)
        scheduler.submit(waiting)
        scheduler.submit(stopped)
        assert scheduler.position(waiting) == 2
        scheduler._tell_place(waiting)
        token.cancel()
    with pytest.raises(GenerationCancelled, match="before it started"):
        scheduler.wait(stopped)
    run_all(scheduler, [*ahead, waiting])
    assert heard[0] == "waiting: 2 ahead in line"
    assert "S" not in model.order


# ---- on the tiny model, batching on ------------------------------------------------------


@pytest.fixture(scope="module")
def batching(cache_root):
    """An engine that runs every forward pass with 4 samples."""
    return Engine(
        FAMILIES["tiny"],
        cache_root=cache_root,
        lora_folder=ROOT / "loras",
        queue_rules=QueueRules(batch_size=4, per_session=8, total=64),
    )


def request(prompt="a red fox", seed=5, loras=(), control=None, **fields) -> GenerationRequest:
    fields = {"steps": 2, "width": 64, "height": 64, **fields}
    controls = () if control is None else (ControlUnit("canny", control),)
    return GenerationRequest(
        prompt=prompt,
        seed=seed,
        loras=tuple(LoraChoice(n, w) for n, w in loras),
        controls=controls,
        **fields,
    )


def together(engine: Engine, requests: list[GenerationRequest], cancels=None) -> list:
    """Submit every request while the scheduler is held, so that they meet in the queue."""
    cancels = cancels or [None] * len(requests)
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        with engine.scheduler.holding():
            futures = [pool.submit(engine.generate, r, cancel=c) for r, c in zip(requests, cancels)]
            wait_until_queued(engine, len(requests))
        return [future.exception() or future.result() for future in futures]


def wait_until_queued(engine: Engine, count: int) -> None:
    deadline = time.monotonic() + 120
    while engine.scheduler.waiting_count() < count:
        assert time.monotonic() < deadline, "the requests never reached the queue"
        time.sleep(0.01)


def photo(shift: int):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(image).rectangle((8 + shift, 12, 40 + shift, 50), fill="white")
    return image


def test_an_image_is_the_same_bytes_alone_and_with_any_companions(batching):
    mine = request(seed=11)
    alone = batching.generate(mine).images[0].tobytes()
    runs_before = batching.scheduler.stats.runs
    first = together(batching, [mine, request("a boat", seed=3), request("snow", seed=4)])
    second = together(batching, [request("rain", seed=8), mine])
    assert batching.scheduler.stats.runs == runs_before + 2  # each set shared one pass
    assert first[0].images[0].tobytes() == alone
    assert second[1].images[0].tobytes() == alone
    assert first[1].images[0].tobytes() != alone  # companions are their own images
    # Its recipe, re-run alone, gives it again.
    settings = first[0].recipe.settings
    rerun = request(settings["prompt"], seed=settings["seed"])
    assert batching.generate(rerun).images[0].tobytes() == alone


def test_each_image_of_a_batch_of_three_re_runs_from_its_own_seed(batching, engine):
    for server in (batching, engine):  # with batching on and off
        result = server.generate(request(seed=40, num_images=3))
        for seed, image in zip(result.seeds, result.images):
            again = server.generate(request(seed=seed)).images[0]
            assert again.tobytes() == image.tobytes(), seed


def test_stopping_one_member_of_a_running_batch_leaves_the_others_unchanged(batching):
    mates = [request("a fox", seed=1), request("a boat", seed=2), request("a tree", seed=3)]
    alone = [batching.generate(r).images[0].tobytes() for r in mates]
    token = CancelToken()
    stopping = request("stop me", seed=4, steps=2)
    started = threading.Event()

    def stop_at_first_step(done, total, stage):
        if stage == "denoising":
            started.set()
            token.cancel()

    with ThreadPoolExecutor(max_workers=4) as pool:
        with batching.scheduler.holding():
            futures = [pool.submit(batching.generate, r) for r in mates]
            futures.append(
                pool.submit(batching.generate, stopping, cancel=token, progress=stop_at_first_step)
            )
            wait_until_queued(batching, 4)
        with pytest.raises(GenerationCancelled):
            futures[-1].result()
        assert started.is_set()
        assert [f.result().images[0].tobytes() for f in futures[:3]] == alone


def test_sixteen_clients_with_mixed_loras_and_controls_each_get_their_solo_image(batching):
    sets = [(), (("tiny-ink", 1.0),), (("tiny-neon", 0.8),), (("tiny-ink", 0.4),)]
    requests = [
        request(
            f"client {i}",
            seed=100 + i,
            loras=sets[i % 4],
            control=photo(i % 3) if i % 2 else None,
        )
        for i in range(16)
    ]
    alone = [batching.generate(r).images[0].tobytes() for r in requests]
    runs_before = batching.scheduler.stats.runs
    results = together(batching, requests)
    assert batching.scheduler.stats.runs - runs_before < 16  # some did share a pass
    for index, result in enumerate(results):
        assert not isinstance(result, BaseException), result
        assert result.images[0].tobytes() == alone[index], index
    assert len({a for a in alone}) == 16


def test_in_a_shared_pass_each_image_draws_its_own_prompt(batching):
    """Not only the same bytes as alone: a batch whose members asked for different colours
    gives each member its own colours, as often as the model draws them alone (a pass that
    mixed up its members' prompts would score near chance, 1/6)."""
    from test_adherence import COLOUR_MIN

    from tiny_training import measure, scenes

    made = scenes.random_scenes(16, 505, figure=False)
    requests = [request(scene.caption, seed=i, steps=20) for i, scene in enumerate(made)]
    runs_before = batching.scheduler.stats.runs
    results = together(batching, requests)
    assert batching.scheduler.stats.runs - runs_before <= 4  # four passes of four
    accuracy = measure.prompt_accuracy(
        (result.images[0], scene) for result, scene in zip(results, made)
    )
    assert accuracy["colour"] >= COLOUR_MIN, accuracy


def test_batches_equal_the_default_engine_where_shapes_agree(batching, engine):
    """Padding is invisible: batching on or off, a lone request is the same image up to
    the batch kernels' rounding, never another picture."""
    mine = request(seed=12)
    padded = np.asarray(batching.generate(mine).images[0], dtype=np.int16)
    plain = np.asarray(engine.generate(mine).images[0], dtype=np.int16)
    assert np.abs(padded - plain).max() <= 2


def test_a_sessions_own_loras_never_share_a_pass_with_another_session(batching):
    """Uploaded and Hub LoRAs are their session's: the pass activates the set as its first
    job's session, so such jobs batch only within their own session."""
    from pipelines.engine import _Work

    def key(session: str, lora: str):
        loras = (LoraChoice(lora, 1.0),)
        made = request(loras=(), session_id=session)
        return _Work(made, made.prompt, loras, (1,), 64, 64, ()).batch_key(batching)

    for private in ("upload-0123abcd-style", "hub-0123abcd-style"):
        assert key("a", private) != key("b", private)
        assert key("a", private) == key("a", private)
    assert key("a", "tiny-ink") == key("b", "tiny-ink")  # a library LoRA is everyone's


# ---- a GPU lent per call (a ZeroGPU Space) ------------------------------------------------

SUBMITTER = contextvars.ContextVar("submitter", default=None)


class RecordingSlot:
    """Plays the host's part of `spaces.GPU(duration=seconds)(run)`: each call is one slot
    of `seconds(*args)`, taken in the caller's context (where ZeroGPU reads whose quota
    it is); arguments and result cross by pickle, as they do to ZeroGPU's GPU process."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, str | None]] = []

    def __call__(self, run, seconds):
        def in_slot(*args):
            self.calls.append((run.__name__, seconds(*args), SUBMITTER.get()))
            crossed = pickle.loads(pickle.dumps(args))
            return pickle.loads(pickle.dumps(run(*crossed)))

        return in_slot


@pytest.fixture(scope="module")
def slot():
    return RecordingSlot()


@pytest.fixture(scope="module")
def slotted(cache_root, slot):
    return Engine(
        FAMILIES["tiny"],
        cache_root=cache_root,
        lora_folder=ROOT / "loras",
        queue_rules=QueueRules(batch_size=4, per_session=8, total=64),
        gpu_slot=slot,
    )


def test_a_batch_takes_one_gpu_slot_in_its_leaders_name(slotted, slot, batching):
    mates = [request("a fox", seed=1), request("a boat", seed=2), request("snow", seed=3)]
    alone = [batching.generate(r).images[0].tobytes() for r in mates]

    def as_user(name: str, made: GenerationRequest):
        SUBMITTER.set(name)
        return slotted.generate(made)

    slot.calls.clear()
    with ThreadPoolExecutor(max_workers=3) as pool:
        with slotted.scheduler.holding():
            futures = [pool.submit(as_user, f"user {i}", r) for i, r in enumerate(mates)]
            wait_until_queued(slotted, 3)
        results = [future.result() for future in futures]
    assert [(name, who) for name, _, who in slot.calls] == [("_run_works", "user 0")]
    # The slot's process got plain values, and its images are the batch's, unchanged.
    assert [result.images[0].tobytes() for result in results] == alone


def test_a_detector_map_takes_a_gpu_slot_and_canny_does_not(slotted, slot):
    slot.calls.clear()
    slotted.control_map(ControlUnit("canny", photo(1)))
    assert slot.calls == []
    slotted.control_map(ControlUnit("depth", photo(2)))
    assert [name for name, _, _ in slot.calls] == ["_make_map"]


def test_a_slots_length_is_estimated_for_the_whole_batch(slotted):
    from pipelines.engine import _Work

    def works(count: int, maps=()):
        made = request(steps=20, width=512, height=512)
        return [_Work(made, made.prompt, (), (i,), 512, 512, maps) for i in range(count)]

    one, four, five = (slotted.gpu_seconds(works(n)) for n in (1, 4, 5))
    assert one == four  # a padded pass costs its whole batch size, however full
    assert five > four  # a second pass
    assert slotted.gpu_seconds(works(1, maps=(photo(0),))) > one  # a ControlNet's share
    assert one >= 20 and five <= 300
