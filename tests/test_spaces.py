"""Under the `spaces` package, as on a ZeroGPU Space: the real `spaces.GPU` wraps each batch,
its duration function gets the batch's own inputs, and generation works as without it.

There is no ZeroGPU here (no device API, no GPU), so the one piece of ZeroGPU's host that
needs one, `spaces.zero.client.schedule` (which asks the device API for a slot), is
replaced by a recorder: everything before it (`spaces.GPU`, its wrapper, the evaluation of
the duration with the call's arguments) is the package's own code.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import spaces
from spaces.config import Config

import app
from pipelines.engine import Engine
from pipelines.families import FAMILIES
from pipelines.requests import GenerationRequest


class ScheduleRecorded(Exception):
    """Raised where ZeroGPU would wait for its device API to lend a GPU."""


@pytest.fixture(scope="module")
def switchable(cache_root):
    """An engine whose slot is the identity while it starts (its start-up check runs no
    differently from a plain engine's), then whatever the test sets, and the durations
    ZeroGPU's wrapper asked it for, with the arguments it asked with."""
    state = {"slot": lambda run, seconds: run, "asked": []}

    def gpu_slot(run, seconds):
        def asked(*args):
            state["asked"].append((args, seconds(*args)))
            return seconds(*args)

        return lambda *args: state["slot"](run, asked)(*args)

    engine = Engine(FAMILIES["tiny"], cache_root=cache_root, gpu_slot=gpu_slot)
    return engine, state


def test_off_zero_gpu_the_package_changes_nothing(switchable, engine):
    switched, state = switchable
    assert not Config.zero_gpu and app.zero_gpu_slot() is None
    # Off ZeroGPU, `spaces.GPU(duration=...)` hands back the function itself.
    state["slot"] = lambda run, seconds: spaces.GPU(duration=seconds)(run)
    request = GenerationRequest("a red circle on a blue background", seed=4, steps=3)
    assert switched.generate(request).images[0].tobytes() == (
        engine.generate(request).images[0].tobytes()
    )


# spaces reads the NVIDIA driver's files when it first sizes a slot; there are none here.
@pytest.mark.filterwarnings("ignore:Error while reading infos from Nvidia driver FS")
def test_on_zero_gpu_the_duration_function_gets_the_batch_it_sizes(switchable, monkeypatch):
    switched, state = switchable
    monkeypatch.setattr(Config, "zero_gpu", True)
    scheduled = []

    def schedule(task_id, request=None, duration=None, gpu_size=None, **_):
        scheduled.append(duration)
        raise ScheduleRecorded

    from spaces.zero import client

    monkeypatch.setattr(client, "schedule", schedule)
    slot = app.zero_gpu_slot()
    assert slot is not None
    state["slot"] = slot
    for steps in (4, 100):
        request = GenerationRequest("a green square", seed=1, steps=steps, width=1024, height=1024)
        state["asked"].clear()
        with pytest.raises(ScheduleRecorded):
            switched.generate(request)
        # ZeroGPU evaluated our duration with the call's own arguments: this request's work.
        [((works,), seconds)] = state["asked"]
        assert [work.request.prompt for work in works] == ["a green square"]
        assert works[0].request.steps == steps and works[0].width == 1024
        assert scheduled[-1] == timedelta(seconds=seconds)
    short, long = scheduled
    assert long > short  # 100 steps at 1024 px ask for a longer slot than 4
