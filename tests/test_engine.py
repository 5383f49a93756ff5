"""The engine on the tiny family: reproducibility, schedulers, isolation, errors, cancel."""

from __future__ import annotations

import inspect
import json
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import ROOT, pixels
from PIL import Image

from pipelines.engine import CancelToken, Engine
from pipelines.errors import (
    GenerationCancelled,
    InvalidRequestError,
    LoraRejectedError,
    ModelLoadError,
    UnknownNameError,
)
from pipelines.families import FAMILIES, resolve_family
from pipelines.requests import ControlUnit, GenerationRequest, LoraChoice
from pipelines.schedulers import SCHEDULERS


def small(**fields) -> GenerationRequest:
    fields.setdefault("prompt", "a red fox in the snow")
    fields.setdefault("seed", 7)
    fields.setdefault("steps", 2)
    fields.setdefault("width", 64)
    fields.setdefault("height", 64)
    return GenerationRequest(**fields)


def test_same_request_and_seed_give_identical_images(engine):
    first = engine.generate(small())
    second = engine.generate(small())
    assert first.images[0].tobytes() == second.images[0].tobytes()


def test_another_seed_or_prompt_gives_another_image(engine):
    base = pixels(engine.generate(small()).images[0])
    other_seed = pixels(engine.generate(small(seed=8)).images[0])
    other_prompt = pixels(engine.generate(small(prompt="a blue house")).images[0])
    assert np.abs(base - other_seed).max() > 10
    assert np.abs(base - other_prompt).max() > 0


def test_random_seed_is_reported_and_reproduces_the_image(engine):
    result = engine.generate(small(seed=None))
    again = engine.generate(small(seed=result.seed))
    assert result.recipe.settings["seed"] == result.seed
    assert result.images[0].tobytes() == again.images[0].tobytes()


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_each_scheduler_runs_and_is_reproducible(engine, scheduler):
    first = engine.generate(small(scheduler=scheduler, steps=3))
    second = engine.generate(small(scheduler=scheduler, steps=3))
    assert first.images[0].size == (64, 64)
    assert first.images[0].tobytes() == second.images[0].tobytes()
    assert first.recipe.settings["scheduler"] == scheduler


def test_schedulers_differ_from_each_other(engine):
    euler_a = pixels(engine.generate(small(scheduler="Euler a", steps=3)).images[0])
    ddim = pixels(engine.generate(small(scheduler="DDIM", steps=3)).images[0])
    assert np.abs(euler_a - ddim).max() > 0


def test_size_and_image_count_follow_the_request(engine):
    result = engine.generate(small(width=96, height=64, num_images=2))
    assert [image.size for image in result.images] == [(96, 64), (96, 64)]
    assert result.seeds == (7, 8)


def test_progress_reports_every_step(engine):
    seen = []
    engine.generate(small(steps=4), progress=lambda done, total, stage: seen.append((done, total)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_cancel_stops_within_one_step_and_engine_keeps_serving(engine):
    token = CancelToken()
    seen = []

    def progress(done, total, stage):
        seen.append(done)
        if done == 2:
            token.cancel()

    with pytest.raises(GenerationCancelled, match="after step 3 of 10"):
        engine.generate(small(steps=10), progress=progress, cancel=token)
    assert seen == [1, 2]
    assert engine.generate(small()).images


def test_a_request_cancelled_while_queued_never_runs(engine):
    token = CancelToken()
    token.cancel()
    with pytest.raises(GenerationCancelled, match="before it started"):
        engine.generate(small(), cancel=token)


def test_overlong_prompt_is_reported_not_silently_cut(engine):
    result = engine.generate(small(prompt="a red fox " * 40))
    assert result.images
    assert any("the model reads the first 75" in warning for warning in result.warnings)


def test_eight_concurrent_requests_each_equal_the_request_run_alone(engine):
    requests = [
        small(seed=11, scheduler="Euler a", steps=2),
        small(seed=12, scheduler="DPM++ 2M", steps=3),
        small(seed=13, scheduler="UniPC", steps=2, width=96),
        small(seed=14, scheduler="DDIM", steps=4, height=80),
        small(seed=15, scheduler="Euler", steps=2, prompt="a blue house"),
        small(seed=16, scheduler="DPM++ 2M Karras", steps=3, guidance_scale=3.0),
        small(seed=17, scheduler="Euler a", steps=5, negative_prompt="blurry"),
        small(seed=18, scheduler="UniPC", steps=2, num_images=2),
    ]
    alone = [[img.tobytes() for img in engine.generate(r).images] for r in requests]
    start = threading.Barrier(len(requests))  # all eight are submitted at the same moment

    def submit(request):
        start.wait(timeout=60)
        return engine.generate(request)

    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        together = list(pool.map(submit, requests))
    for request, expected, result in zip(requests, alone, together):
        assert [img.tobytes() for img in result.images] == expected, request


def test_a_second_request_waits_while_the_first_holds_the_model(engine, monkeypatch):
    """Requests reach the model only through the scheduler's one worker: a request that
    arrives while another runs waits in line, and both images are their solo bytes."""
    first = small(seed=21, loras=(LoraChoice("tiny-ink", 1.0),))
    second = small(seed=22)
    expected = {
        name: engine.generate(r).images[0].tobytes()
        for name, r in (("first", first), ("second", second))
    }

    events: list[tuple[str, str]] = []  # (what, which request), in the order they happened
    first_holds_the_model = threading.Event()
    second_queued = threading.Event()
    activate, run, submit = engine._activate_loras, engine._run, engine.scheduler.submit

    def entering(loras, session_id):  # the first thing a run does with the model
        who = "first" if loras else "second"
        events.append(("enter", who))
        if who == "first":
            first_holds_the_model.set()
            # Hold the model until the second request is in line: no sleeping, no timing.
            assert second_queued.wait(timeout=60), "the second request never queued"
        return activate(loras, session_id)

    def leaving(pipe, works, samples, watch):  # the last thing it does with the model
        try:
            return run(pipe, works, samples, watch)
        finally:
            events.append(("exit", "first" if works[0].loras else "second"))

    def queued(job):
        submit(job)
        if not job.payload.loras:
            events.append(("queued", "second"))
            second_queued.set()

    monkeypatch.setattr(engine, "_activate_loras", entering)
    monkeypatch.setattr(engine, "_run", leaving)
    monkeypatch.setattr(engine.scheduler, "submit", queued)

    results, errors = {}, {}

    def serve(name, request):
        try:
            results[name] = engine.generate(request)
        except BaseException as exc:  # re-raised below, in the test's own thread
            errors[name] = exc

    threads = {
        name: threading.Thread(target=serve, args=(name, request), name=name, daemon=True)
        for name, request in (("first", first), ("second", second))
    }
    threads["first"].start()
    assert first_holds_the_model.wait(timeout=60)
    threads["second"].start()
    for thread in threads.values():
        thread.join(timeout=120)
        assert not thread.is_alive(), f"the {thread.name} request never finished"
    for exc in errors.values():
        raise exc

    assert events == [
        ("enter", "first"),
        ("queued", "second"),  # the second request arrived while the first ran
        ("exit", "first"),
        ("enter", "second"),  # and got the model only once the first was done with it
        ("exit", "second"),
    ]
    assert {name: r.images[0].tobytes() for name, r in results.items()} == expected


BAD_FIELDS = [
    ("steps", 0, "steps=0"),
    ("steps", 10000, "steps=10000"),
    ("steps", 2.5, "steps=2.5 is not allowed: an integer from 1 to"),
    ("guidance_scale", math.nan, "guidance_scale=nan"),
    ("guidance_scale", -1.0, "a number from 0 to 30"),
    ("width", 100, "multiple of 8 (try 96 or 104)"),
    ("height", 7, "height=7"),
    ("width", 100000, "width=100000"),
    ("seed", -5, "seed=-5"),
    ("seed", 2**40, "seed="),
    ("num_images", 0, "num_images=0"),
    ("scheduler", "Heun++ 9M", "unknown scheduler 'Heun++ 9M'; choose one of: Euler a"),
    ("prompt", None, "prompt=None"),
    ("prompt", "x" * 50000, "50000 characters long"),
]


@pytest.mark.parametrize(("field", "value", "message"), BAD_FIELDS)
def test_bad_fields_raise_clear_errors_and_engine_keeps_serving(engine, field, value, message):
    fields = {"prompt": "a fox", "seed": 1, "steps": 2, "width": 64, "height": 64, field: value}
    with pytest.raises((InvalidRequestError, UnknownNameError)) as caught:
        engine.generate(GenerationRequest(**fields))
    assert message in str(caught.value)
    assert engine.generate(small()).images


def test_unknown_model_names_are_refused_with_the_known_ones():
    with pytest.raises(UnknownNameError, match="unknown model 'sd99'; choose one of: sd15"):
        resolve_family("sd99")
    with pytest.raises(UnknownNameError, match="unknown model ''"):
        resolve_family("")


def test_a_folder_without_a_model_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        resolve_family(str(tmp_path))


def test_auto_without_network_or_cache_starts_the_tiny_family_with_a_notice(cache_root):
    engine = Engine.start("auto", cache_root=cache_root)
    assert engine.family.name == "tiny"
    assert engine.status.offline
    assert "Offline" in engine.status.notice


def test_a_local_model_folder_loads_through_from_pretrained(cache_root, engine):
    from pipelines.tiny import tiny_family_dir

    folder = str(tiny_family_dir(cache_root))
    # A user folder counts as real-size: float32 is asked for to compare bit for bit.
    folder_engine = Engine.start(folder, cache_root=cache_root, dtype="float32")
    assert Engine.start(folder, cache_root=cache_root).dtype != folder_engine.dtype
    assert folder_engine.family.compat_tag == "sd15"
    ours = folder_engine.generate(small()).images[0].tobytes()
    assert ours == engine.generate(small()).images[0].tobytes()


def test_families_registry_has_room_for_sdxl(tmp_path, monkeypatch):
    import diffusers
    import torch

    from pipelines import controls
    from pipelines.engine import pick_device_and_dtype
    from pipelines.families import family_from_folder
    from pipelines.loras import LoraLibrary, load_catalogue

    sdxl = FAMILIES["sdxl"]
    text2img, with_controlnet = sdxl.pipeline_class("text2img"), sdxl.pipeline_class("controlnet")
    assert text2img is diffusers.StableDiffusionXLPipeline
    assert with_controlnet is diffusers.StableDiffusionXLControlNetPipeline
    # The engine builds each family's ControlNet pipeline from its loaded base (from_pipe):
    # it must take exactly the base pipeline's components, plus the ControlNet.
    for family in FAMILIES.values():
        base_takes = set(inspect.signature(family.pipeline_class("text2img")).parameters)
        controlnet_takes = set(inspect.signature(family.pipeline_class("controlnet")).parameters)
        assert controlnet_takes == base_takes | {"controlnet"}, family.name

    # A local folder saved from an SDXL pipeline runs as SDXL, with SDXL's LoRAs and size.
    folder = tmp_path / "my-sdxl"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": text2img.__name__}))
    local = family_from_folder(folder)
    assert (local.architecture, local.compat_tag, local.default_size) == (
        sdxl.architecture,
        sdxl.compat_tag,
        sdxl.default_size,
    )
    assert local.pipeline_class("controlnet") is with_controlnet

    # SDXL's size: 1024 square, or a control image's aspect with a long side of 1024.
    on_sdxl = SimpleNamespace(family=sdxl)  # _output_size reads nothing but the family
    assert Engine._output_size(on_sdxl, small(width=None, height=None)) == (1024, 1024)
    house = Image.open(ROOT / "examples" / "house.png")  # 384 x 256
    unit = ControlUnit(control_type="canny", image=house)
    sized = small(width=None, height=None, controls=(unit,))
    assert Engine._output_size(on_sdxl, sized) == (1024, 680)
    # SDXL's VAE overflows in float16: on CUDA it gets bfloat16, SD 1.5 float16.
    monkeypatch.delenv("STENCIL_DTYPE", raising=False)
    assert pick_device_and_dtype(sdxl, "cuda", None) == ("cuda", torch.bfloat16)
    assert pick_device_and_dtype(FAMILIES["sd15"], "cuda", None) == ("cuda", torch.float16)

    # Every control type has an SDXL ControlNet on the Hub, its own, not SD 1.5's.
    refs = {}
    for name, spec in controls.CONTROLS.items():
        if spec.controlnets is None:
            continue
        ref = controls.controlnet_ref(name, sdxl.compat_tag, {})
        assert "/" in ref and "sdxl" in ref.lower(), (name, ref)
        assert ref != controls.controlnet_ref(name, FAMILIES["sd15"].compat_tag, {})
        assert sdxl.locate_component(ref, tmp_path) == ref  # a Hub id, not a local build
        refs[name] = ref
    assert len(set(refs.values())) == len(refs) >= 3
    for map_type in controls.MAP_TYPE.choices:  # a drawn map reads with its type's net
        drawn = controls.controlnet_ref("image", sdxl.compat_tag, {"map_type": map_type})
        assert drawn == refs[map_type]

    # A catalogue entry made for SDXL is listed and resolved only when SDXL is loaded.
    library = tmp_path / "loras"
    library.mkdir()
    entry = {
        "name": "xl-style",
        "hub": {
            "repo_id": "someone/xl-style",
            "weight_name": "xl.safetensors",
            "revision": "0" * 40,
        },
        "base": "sdxl",
    }
    (library / "catalog.json").write_text(json.dumps({"version": 1, "loras": [entry]}))
    for family in ("tiny", "sd15"):
        loras = LoraLibrary(library, FAMILIES[family].compat_tag, allow_downloads=False)
        assert loras.names() == [], family
        with pytest.raises(LoraRejectedError, match="'xl-style' refused: it is made for SDXL;"):
            loras.resolve("xl-style")
        with pytest.raises(LoraRejectedError, match="made for SDXL"):
            loras.parse_lora_string("xl-style:0.8")
    loras = LoraLibrary(library, sdxl.compat_tag, allow_downloads=False)
    assert loras.names() == ["xl-style"] and loras.resolve("xl-style").base == "sdxl"
    # ... and the shipped catalogue names no family that the registry lacks.
    shipped = {e.base for e in load_catalogue(ROOT / "loras").values()}
    assert sdxl.compat_tag in shipped
    assert shipped <= {family.compat_tag for family in FAMILIES.values()}


def test_an_empty_map_is_said_and_a_map_with_content_is_not(engine):
    from PIL import Image, ImageDraw

    blank = Image.new("RGB", (64, 64), "white")
    drawn = blank.copy()
    ImageDraw.Draw(drawn).rectangle((16, 16, 48, 48), outline="black", width=3)
    second_blank = (ControlUnit("canny", drawn), ControlUnit("canny", blank))
    result = engine.generate(small(controls=second_blank))
    notes = [w for w in result.warnings if "will not steer" in w]
    assert notes == [
        "Control 2 (canny): no edges passed the thresholds (try lower ones) in its image,"
        " so the map is empty and this unit will not steer the image."
    ]
    assert not any(
        "will not steer" in w for w in engine.generate(small(controls=second_blank[:1])).warnings
    )


def test_captions_and_notes_name_a_unit_by_its_number_on_the_page(engine):
    """With Control 1 off, the only map is Control 2's: its caption and its empty-map note
    say "Control 2", as the page's tabs do, not its place among the units in use."""
    from PIL import Image

    from pipelines.service import StencilService

    service = StencilService(engine)
    blank = Image.new("RGB", (64, 64), "white")
    outcome = service.generate(
        {"prompt": "a red circle", "seed": 1, "steps": 1, "control_type": "none",
         "control_type_2": "canny", "control_image_2": blank}
    )  # fmt: skip
    [caption] = outcome.map_captions
    assert caption.startswith("Control 2: canny · ")
    assert [w for w in outcome.warnings if "will not steer" in w][0].startswith("Control 2 ")
    preview = service.preview_control({"control_type": "canny", "control_image": blank}, position=2)
    assert preview.note.startswith("Control 2 (canny)")


def test_the_tiny_families_run_on_one_cpu_thread_unless_the_operator_says(monkeypatch):
    """bench/cpu_threads.py measures why; real sizes keep torch's threads."""
    import torch

    from pipelines.engine import use_one_cpu_thread_for_tiny_models

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        for family, device, expected in (
            ("tiny", "cpu", 1),
            ("tiny-xl", "cpu", 1),
            ("sd15", "cpu", 2),
            ("tiny", "cuda", 2),
        ):
            torch.set_num_threads(2)
            use_one_cpu_thread_for_tiny_models(FAMILIES[family], device)
            assert torch.get_num_threads() == expected, (family, device)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(2)
        use_one_cpu_thread_for_tiny_models(FAMILIES["tiny"], "cpu")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
