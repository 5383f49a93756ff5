"""Memory, time and disk per caller are bounded: the control-map cache by bytes, a map by its
pixel count, uploads by size and in total, sessions forgotten when they close, and Gradio's
cache expired (end to end, against an app started with short test budgets)."""

from __future__ import annotations

import hashlib
import io
import os
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT, _free_port, served_app
from PIL import Image

from pipelines.errors import InvalidRequestError, LoraRejectedError
from pipelines.fields import MAX_DETECTION_RESOLUTION
from pipelines.lora_catalogue import LoraCatalogue
from pipelines.map_cache import MapCache, image_bytes
from pipelines.preprocessors.base import (
    MAX_MAP_PIXELS,
    check_map_budget,
    largest_resolution_within_budget,
    map_size,
)
from pipelines.settings import BUDGETS

SHIPPED = ROOT / "loras"
INK = (SHIPPED / "tiny-ink.safetensors").read_bytes()
NEON = (SHIPPED / "tiny-neon.safetensors").read_bytes()
MiB = 2**20

# ---- the map cache -----------------------------------------------------------------------


def test_the_map_cache_keeps_to_its_byte_budget_with_large_maps():
    cache = MapCache(max_bytes=20 * MiB, max_entries=64)
    big = Image.new("RGB", (2048, 1024))  # 8 MiB in PIL's memory
    for index in range(20):
        cache.put(("map", index), big.copy())
        assert cache.total_bytes <= 20 * MiB
    assert len(cache) == 2
    assert cache.get(("map", 19)) is not None and cache.get(("map", 0)) is None


def test_the_least_recently_used_map_goes_first_and_a_map_over_the_budget_is_not_kept():
    cache = MapCache(max_bytes=3 * MiB)
    maps = {name: Image.new("RGB", (512, 512)) for name in "abc"}  # 1 MiB each
    for name, control_map in maps.items():
        cache.put(name, control_map)
    assert cache.get("a") is maps["a"]  # a is now the most recently used
    cache.put("d", Image.new("RGB", (512, 512)))
    assert cache.get("b") is None and cache.get("a") is maps["a"]
    cache.put("huge", Image.new("RGB", (1024, 1024)))  # 4 MiB: more than the whole budget
    assert cache.get("huge") is None and cache.total_bytes == 3 * MiB
    assert image_bytes(maps["a"]) == MiB


def test_the_engine_map_cache_is_bounded_by_bytes(engine, monkeypatch):
    from pipelines.requests import ControlUnit

    assert engine._map_cache.max_bytes == BUDGETS.map_cache_bytes
    monkeypatch.setattr(engine, "_map_cache", MapCache(max_bytes=4 * MiB))
    for index in range(8):
        photo = Image.new("RGB", (96, 64), (index * 30, 0, 0))
        control_map = engine.control_map(ControlUnit("canny", photo, resolution=512))
        assert control_map.size == (768, 512)  # 1.5 MiB held in memory
        assert engine._map_cache.total_bytes <= 4 * MiB
    assert len(engine._map_cache) == 2


# ---- the map-size bound --------------------------------------------------------------------


def test_a_square_image_fits_at_every_detection_resolution_the_page_offers():
    assert MAX_DETECTION_RESOLUTION == 1024 and MAX_MAP_PIXELS == 1024 * 1024
    check_map_budget(3000, 3000, MAX_DETECTION_RESOLUTION)
    check_map_budget(4000, 1000, 512)  # 4:1 at the default resolution is exactly the budget


def test_an_elongated_image_at_a_high_resolution_is_refused_with_what_fits():
    from pipelines.preprocessors import get_preprocessor

    pose = get_preprocessor("pose")  # finding its weights is not what is timed
    started = time.perf_counter()
    with pytest.raises(InvalidRequestError, match="control_resolution=1024") as refused:
        pose(Image.new("RGB", (4096, 1024)), resolution=1024)
    assert time.perf_counter() - started < 1, "refused before any detection"
    message = str(refused.value)
    assert "4096x1024 map (4.2 megapixels)" in message and "use at most 512" in message
    assert refused.value.field == "control_resolution"
    assert math_prod(map_size(4096, 1024, 512)) <= MAX_MAP_PIXELS
    assert math_prod(map_size(4096, 1024, 576)) > MAX_MAP_PIXELS
    assert largest_resolution_within_budget(3000, 1000) == 576  # 1728x576: 1.0 megapixels


def test_the_bound_names_the_second_units_field(tmp_path):
    from pipelines.service import StencilService

    photo = tmp_path / "wide.png"
    Image.new("RGB", (400, 100)).save(photo)
    service = StencilService(stub_engine(), tmp_path / "out")
    fields = {"prompt": "x", "control_type_2": "canny", "control_image_2": str(photo)}
    with pytest.raises(InvalidRequestError) as refused:
        service.build_request({**fields, "control_resolution_2": 1024})
    assert refused.value.field == "control_resolution_2"
    assert "use at most 512" in str(refused.value)
    assert service.build_request({**fields, "control_resolution_2": 512}).controls


def math_prod(size: tuple[int, int]) -> int:
    return size[0] * size[1]


def stub_engine():
    """What StencilService reads of an engine to build its fields and parse requests."""
    return SimpleNamespace(model_facts={"text_encoder_layers": 2}, loras=None)


# ---- sessions and uploads ------------------------------------------------------------------


def unique_lora(tag: str) -> bytes:
    """tiny-ink's tensors under a header of their own: a file no other test uploads."""
    from safetensors.torch import load, save

    return save(load(INK), metadata={"format": "pt", "test": tag})


def test_closing_a_session_forgets_its_uploads_and_deletes_files_no_one_holds(engine, tmp_path):
    from pipelines.service import StencilService
    from ui import create_demo

    service = StencilService(engine, tmp_path / "out")
    demo = create_demo(service)
    unloads = [d for d in demo.fns.values() if any(t[1] == "unload" for t in d.targets)]
    assert len(unloads) == 1
    forget = unloads[0].fn

    data = unique_lora(f"{os.getpid()}-{time.time()}")
    upload = tmp_path / "mine.safetensors"
    upload.write_bytes(data)
    first = service.add_lora_upload(upload, "session-a")
    second = service.add_lora_upload(upload, "session-b")
    stored = engine.loras.catalogue.upload_path(hashlib.sha256(data).hexdigest())
    assert stored.is_file()

    forget(SimpleNamespace(session_hash="session-a"))
    assert first["name"] not in engine.loras.names("session-a")
    assert stored.is_file(), "session-b still holds the same bytes"
    forget(SimpleNamespace(session_hash="session-b"))
    assert second["name"] not in engine.loras.names("session-b")
    assert not stored.exists()


def test_gradio_expires_its_cache_on_the_configured_schedule(engine, tmp_path):
    from pipelines.service import StencilService
    from ui import create_demo

    demo = create_demo(StencilService(engine, tmp_path / "out"))
    assert demo.delete_cache == BUDGETS.gradio_delete_cache == (300, 3600)


def test_an_upload_is_kept_once_gradios_copy_goes(tmp_path, monkeypatch):
    from ui import discard_gradio_copy

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    copy = tmp_path / "gradio" / "f00d" / "style.safetensors"
    copy.parent.mkdir(parents=True)
    copy.write_bytes(INK)
    outside = tmp_path / "mine.safetensors"
    outside.write_bytes(INK)
    discard_gradio_copy(copy)
    discard_gradio_copy(outside)
    assert not copy.parent.exists() and (tmp_path / "gradio").is_dir()
    assert outside.exists(), "only files inside Gradio's cache are ever deleted"


def test_stored_uploads_keep_to_their_total_budget(tmp_path):
    catalogue = LoraCatalogue(
        SHIPPED,
        "tiny",
        max_upload_bytes=MiB,
        max_stored_bytes=len(INK) + len(NEON) // 2,
        uploads_dir=tmp_path,
    )

    def add(data: bytes, session: str):
        return catalogue.add_upload(catalogue.check_upload(data, "style.safetensors", session))

    add(INK, "one")
    add(INK, "two")  # the same bytes: stored once, costs nothing more
    assert catalogue.stored_bytes() == len(INK) and len(list(tmp_path.iterdir())) == 1
    with pytest.raises(LoraRejectedError, match="uploaded LoRAs, its limit"):
        add(NEON, "three")
    catalogue.forget_session("one")
    assert len(list(tmp_path.iterdir())) == 1
    catalogue.forget_session("two")
    assert list(tmp_path.iterdir()) == [] and catalogue.stored_bytes() == 0
    add(NEON, "three")


def test_a_new_catalogue_sweeps_uploads_left_by_a_run_that_never_closed(tmp_path):
    left = tmp_path / ("0" * 64 + ".safetensors")
    left.write_bytes(INK)
    os.utime(left, (time.time() - 2 * 86400,) * 2)
    recent = tmp_path / ("1" * 64 + ".safetensors")
    recent.write_bytes(INK)
    LoraCatalogue(SHIPPED, "tiny", max_upload_bytes=MiB, uploads_dir=tmp_path)
    assert not left.exists() and recent.exists()


# ---- the upload guard ------------------------------------------------------------------------


def guarded(tmp_path, *, max_file_bytes=MiB, max_cache_bytes=4 * MiB):
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from upload_guard import UploadGuard

    async def accept(request):
        await request.body()
        return PlainTextResponse("stored")

    routes = [Route(path, accept, methods=["POST"]) for path in ("/gradio_api/upload", "/other")]
    app = UploadGuard(
        Starlette(routes=routes),
        cache_dir=tmp_path,
        max_file_bytes=max_file_bytes,
        max_cache_bytes=max_cache_bytes,
        recount_s=0,
    )
    return TestClient(app)


def test_the_guard_refuses_an_upload_over_the_cap_before_it_is_stored(tmp_path):
    client = guarded(tmp_path)
    small = client.post("/gradio_api/upload", files={"files": ("a.png", b"x" * 1000)})
    assert small.status_code == 200 and small.text == "stored"
    big = client.post("/gradio_api/upload", files={"files": ("a.png", b"x" * (2 * MiB))})
    assert big.status_code == 413 and "at most 1 MB" in big.text
    sneaky = client.post("/other", files={"files": ("a.png", b"x" * (2 * MiB))})
    assert sneaky.status_code == 413, "any multipart body is capped, not only the upload route"
    assert client.post("/other", json={"data": [1]}).status_code == 200


def test_the_guard_refuses_an_upload_of_unstated_size(tmp_path):
    client = guarded(tmp_path)

    def chunks():
        yield b"--x\r\n"

    response = client.post(
        "/gradio_api/upload",
        content=chunks(),
        headers={"content-type": "multipart/form-data; boundary=x"},
    )
    assert response.status_code == 411


def test_the_guard_refuses_uploads_while_the_cache_is_over_its_budget(tmp_path):
    client = guarded(tmp_path, max_cache_bytes=2 * MiB)
    (tmp_path / "held").write_bytes(b"x" * (2 * MiB))
    full = client.post("/gradio_api/upload", files={"files": ("a.png", b"x" * 1000)})
    assert full.status_code == 507 and "upload space is full" in full.text
    (tmp_path / "held").unlink()  # what delete_cache does as files expire
    assert client.post("/gradio_api/upload", files={"files": ("a.png", b"x")}).status_code == 200


# ---- end to end: an app started with short budgets -------------------------------------------


@pytest.fixture(scope="module")
def app_with_short_budgets(tmp_path_factory):
    """`python app.py` with budgets a test can watch expire, in a cache folder of its own (so
    Stencil owns Gradio's folder, as it does by default); yields (url, its cache folder)."""
    cache = tmp_path_factory.mktemp("stencil-cache")
    port = _free_port()
    env = {key: value for key, value in os.environ.items() if key != "GRADIO_TEMP_DIR"}
    env.update(
        GRADIO_SERVER_PORT=str(port),
        STENCIL_CACHE_DIR=str(cache),  # the tiny model is built there first (seconds)
        STENCIL_MODEL="tiny",
        STENCIL_OUTPUT_MAX_AGE_S="10",
        STENCIL_GRADIO_CACHE_MAX_AGE_S="10",
        STENCIL_GRADIO_CACHE_SWEEP_S="1",
        STENCIL_GRADIO_CACHE_MAX_MB="16",
        STENCIL_MAX_LORA_UPLOAD_MB="1",
        STENCIL_MAX_UPLOAD_BYTES=str(MiB),
    )
    with served_app(env, "app-short-budgets.log") as url:
        yield url, cache


def post_upload(url: str, data: bytes):
    import httpx

    return httpx.post(url + "gradio_api/upload", files={"files": ("photo.png", data)}, timeout=30)


def cached_files(folder: Path) -> set[Path]:
    return {path for path in folder.rglob("*") if path.is_file()}


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_uploads_to_the_app_are_capped_and_expire(app_with_short_budgets):
    import json

    url, cache = app_with_short_budgets
    gradio_cache = cache / "gradio"
    config = json.loads(urllib.request.urlopen(url + "config", timeout=10).read())
    assert config["max_file_size"] == MiB, "the browser refuses bigger files before sending"

    accepted = post_upload(url, png_bytes())
    assert accepted.status_code == 200
    stored = Path(accepted.json()[0])
    assert stored.is_file() and stored.is_relative_to(gradio_cache)
    before = cached_files(gradio_cache)  # the page's examples are in there too
    refused = post_upload(url, b"x" * (2 * MiB))
    assert refused.status_code == 413
    assert cached_files(gradio_cache) == before, "nothing of a refused upload is kept"

    deadline = time.time() + 40  # age 10 s, swept every second
    while stored.exists() and time.time() < deadline:
        time.sleep(0.5)
    assert not stored.exists(), "Gradio's delete_cache expired the upload"

    (gradio_cache / "filler.bin").write_bytes(b"x" * (17 * MiB))  # over the 16 MB budget
    time.sleep(5.5)  # the guard recounts the folder every 5 s
    full = post_upload(url, png_bytes())
    assert full.status_code == 507


def test_results_expire_from_both_folders(app_with_short_budgets):
    from gradio_client import Client

    url, cache = app_with_short_budgets
    client = Client(url, verbose=False, download_files=False)
    first = client.predict(prompt="a fox", seed=1, steps=1, api_name="/generate")[0][0]
    gradio_copy = Path(first["image"]["path"])
    stencil_copy = cache / "outputs" / gradio_copy.name
    assert gradio_copy.is_relative_to(cache / "gradio") and gradio_copy.is_file()
    assert stencil_copy.is_file()
    examples = {p for p in cached_files(cache / "gradio") if p.parent.parent == cache / "gradio"}
    from ui import EXAMPLES, TINY_EXAMPLES

    example_names = {row[1] for row in EXAMPLES + TINY_EXAMPLES}
    examples = {p for p in examples if p.name in example_names}

    deadline = time.time() + 40  # age 10 s, swept every second
    while gradio_copy.exists() and time.time() < deadline:
        time.sleep(0.5)
    assert not gradio_copy.exists(), "Gradio's copy of a result expires"
    assert examples and all(p.exists() for p in examples), "the page's examples stay"
    client.predict(prompt="a fox", seed=2, steps=1, api_name="/generate")
    assert not stencil_copy.exists(), "Stencil's output expired at the next write"
