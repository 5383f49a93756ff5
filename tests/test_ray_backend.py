"""Stencil on a local Ray Serve cluster: two replicas of the tiny engine (a CPU share each).

One deployment serves the whole module, and the order matters: Ray sends a set no replica
holds to the replica holding the fewest sets, picking at random between equals. So first an
upload follows its session to the other replica (on fresh replicas the second new set must
go there), then routing by adapter set, whose three sets each land once and stay (the
upload test's older sets are the ones evicted); then twelve mixed requests against the
single-process server, a replica killed mid-request, and last the deployment scaled down
and up under load.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.errors import LoraRejectedError, StencilError, UnknownNameError
from pipelines.service import StencilService

ray = pytest.importorskip("ray", reason="the Ray backend's tests need requirements-ray.txt")
serve = pytest.importorskip("ray.serve")

from pipelines.ray_backend import (  # noqa: E402  (after the skip: it names Ray's types)
    AdapterSet,
    RayBackend,
    RemoteCall,
    adapter_set_id,
    deploy,
    engine_app,
)

ROOT = Path(__file__).resolve().parent.parent
SETS_PER_REPLICA = 2  # one-LoRA sets, in a store that holds two files


@pytest.fixture(scope="module")
def ray_backend(cache_root, tmp_path_factory):
    import torch

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    # Ray gives a replica with a CPU share one torch thread; float sums split over another
    # number of threads round differently, so the replicas use this process's count.
    threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    try:
        handle = _deploy(cache_root, replicas=2)
        uploads = tmp_path_factory.mktemp("ray-front-uploads")
        yield RayBackend(handle, lora_folder=ROOT / "loras", uploads_dir=uploads)
    finally:
        serve.shutdown()
        ray.shutdown()
        if threads is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = threads


def _deploy(cache_root, replicas: int):
    """The module's deployment (again, at another size: Serve updates it in place)."""
    return deploy(
        {
            "model": "tiny",
            "cache_root": str(cache_root),
            "lora_folder": str(ROOT / "loras"),
            "lora_max_loaded": SETS_PER_REPLICA,
        },
        replicas=replicas,
        num_cpus=0.5,
        loras_per_set=1,
    )


@pytest.fixture(scope="module")
def ray_service(ray_backend, tmp_path_factory):
    return StencilService(ray_backend, tmp_path_factory.mktemp("ray-outputs"))


@pytest.fixture(scope="module")
def local_service(engine, tmp_path_factory):
    """The single-process server the Ray one must equal."""
    return StencilService(engine, tmp_path_factory.mktemp("local-outputs"))


def _edges_picture(path: Path) -> Path:
    image = Image.new("RGB", (64, 64), "white")
    image.paste((200, 30, 30), (16, 12, 48, 52))
    image.save(path)
    return path


def _png_bytes(paths) -> list[bytes]:
    return [Path(p).read_bytes() for p in paths]


def _fields(prompt: str, seed: int, loras: str = "", **extra) -> dict:
    return {"prompt": prompt, "seed": seed, "steps": 4, "loras": loras, **extra}


def test_an_upload_follows_its_session_to_the_other_replica(
    ray_backend, ray_service, local_service, tmp_path
):
    upload = tmp_path / "my style.safetensors"
    shutil.copyfile(ROOT / "loras" / "tiny-inverted.safetensors", upload)
    entry = ray_service.add_lora_upload(upload, "session-a")
    local_service.add_lora_upload(upload, "session-a")
    name = entry["name"]

    first, first_run = ray_backend.generate_traced(
        ray_service.build_request(_fields("a red circle", 5, f"{name}:1"), session_id="session-a")
    )
    # A new set goes to the replica holding the fewest sets: here, the other one.
    time.sleep(0.5)  # the replicas report their sets to the router every 0.1 s
    for other in ("tiny-outlined", "tiny-faded", "tiny-watercolor"):
        fields = _fields("a red circle", 5, f"{name}:1, {other}:0.5")
        request = ray_service.build_request(fields, session_id="session-a")
        second, second_run = ray_backend.generate_traced(request)
        if second_run.replica != first_run.replica:
            break
    assert second_run.replica != first_run.replica, "both requests ran on one replica"

    # Each replica drew what the single-process server draws with that upload.
    alone = local_service.generate(
        _fields("a red circle", 5, f"{name}:1, {other}:0.5"), session_id="session-a"
    )
    assert np.array_equal(
        np.asarray(second.images[0]), np.asarray(Image.open(alone.image_paths[0]))
    )
    base = local_service.generate(_fields("a red circle", 5))
    assert not np.array_equal(
        np.asarray(first.images[0]), np.asarray(Image.open(base.image_paths[0]))
    )

    # Back on the first replica, which has it registered already: the same image again.
    again, again_run = ray_backend.generate_traced(
        ray_service.build_request(_fields("a red circle", 5, f"{name}:1"), session_id="session-a")
    )
    assert again_run.replica == first_run.replica and again_run.set_loads == 0
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(first.images[0]))

    # Another session cannot name it, on the front or on any replica.
    with pytest.raises(UnknownNameError, match=name):
        ray_service.generate(_fields("a red circle", 5, f"{name}:1"), session_id="session-b")
    sneaked = replace(
        ray_service.build_request(_fields("a red circle", 5, f"{name}:1"), session_id="session-a"),
        session_id="session-b",
    )
    with pytest.raises(UnknownNameError, match=name):  # past the front, to a replica
        ray_backend.generate_traced(RemoteCall(sneaked, AdapterSet("")))

    # The front checks an upload against the replicas' model, as a local server does.
    other_base = tmp_path / "for sdxl.safetensors"
    shutil.copyfile(ROOT / "loras" / "tiny-xl-sketch-kohya.safetensors", other_base)
    with pytest.raises(LoraRejectedError, match="for sdxl"):
        ray_service.add_lora_upload(other_base, "session-a")


def _round_robin_set_loads(sequence, replicas: int, held: int) -> int:
    """Adapter-set loads of plain round-robin routing, each replica keeping `held` sets
    by LRU (what the multiplexed deployment keeps too)."""
    caches: list[list[str]] = [[] for _ in range(replicas)]
    loads = 0
    for index, name in enumerate(sequence):
        cache = caches[index % replicas]
        if name in cache:
            cache.remove(name)
        else:
            loads += 1
            if len(cache) == held:
                cache.pop(0)
        cache.append(name)
    return loads


def test_routing_by_adapter_set_loads_each_set_where_it_is_held(ray_backend, ray_service):
    assert ray_backend.facts.sets_per_replica == SETS_PER_REPLICA
    sets = ["tiny-neon", "tiny-sketch-kohya", "tiny-ink"]  # not used by the tests before
    sequence = [sets[i % 3] for i in range(12)]
    set_loads = adapter_loads = 0
    placed: dict[str, set[str]] = {}
    for seed, lora in enumerate(sequence):
        request = ray_service.build_request(_fields("a red circle", seed, f"{lora}:1"))
        _, run = ray_backend.generate_traced(request)
        set_loads += run.set_loads
        adapter_loads += run.adapter_loads
        placed.setdefault(lora, set()).add(run.replica)
        time.sleep(0.2)  # let the router hear of the replica's new set

    round_robin = _round_robin_set_loads(sequence, replicas=2, held=SETS_PER_REPLICA)
    assert round_robin == 12  # every request reloads: each replica sees all three sets
    # Three sets fit in two replicas of two: each is loaded once, where it stays.
    assert set_loads == 3, placed
    assert adapter_loads == 3
    assert all(len(replicas) == 1 for replicas in placed.values()), placed


def test_twelve_mixed_requests_equal_the_single_process_server(
    ray_service, local_service, tmp_path
):
    picture = str(_edges_picture(tmp_path / "edges.png"))
    canny = {"control_type": "canny", "control_image": picture}
    depth = {"control_type": "depth", "control_image": picture}
    requests = [
        _fields("a red circle on a blue background", 1),
        _fields("a green square", 2, "tiny-inverted:1"),
        _fields("a blue triangle", 3, "tiny-outlined:0.8", **canny),
        _fields("a red circle on a blue background", 4, "tiny-inverted:0.5, tiny-outlined:1"),
        _fields("a yellow circle", 5, **depth),
        _fields("a green square <lora:tiny-inverted:0.7>", 6),
        _fields("a red square", 7, "tiny-faded:1", num_images=2),
        _fields("a blue circle", 8, "tiny-inverted:1", **canny),
        _fields("a white triangle", 9, "tiny-outlined:1", width=96, height=64),
        _fields("a red circle", 10, "tiny-inverted:0"),
        _fields("a green circle on a red background", 11, "tiny-watercolor:1", **depth),
        _fields("a blue square", 12),
    ]
    for fields in requests:
        remote = ray_service.generate(fields)
        alone = local_service.generate(fields)
        # Content-addressed files: the same bytes (recipe included) have the same names.
        assert _png_bytes(remote.image_paths) == _png_bytes(alone.image_paths), fields
        assert _png_bytes(remote.map_paths) == _png_bytes(alone.map_paths), fields
        assert remote.seeds == alone.seeds


def test_both_backends_offer_the_service_the_same_seam(engine, ray_backend, ray_service):
    from pipelines.backends import Backend

    assert isinstance(engine, Backend) and isinstance(ray_backend, Backend)
    assert ray_backend.model_facts == engine.model_facts
    assert "Ray Serve" in ray_service.status()["device"]
    # The front lists what a local server lists (names, pictures), from its own catalogue.
    local = StencilService(engine)
    assert ray_service.list_loras() == local.list_loras()


def test_the_adapter_set_id_names_files_and_controlnets_not_weights_or_order():
    one = adapter_set_id(["a", "b"], ["canny"])
    assert one == adapter_set_id(["b", "a"], ["canny"])
    assert one != adapter_set_id(["a"], ["canny"])
    assert one != adapter_set_id(["a", "b"], ["depth"])


def test_the_serve_config_builds_the_deployment(ray_backend):
    import yaml

    config = yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text())
    (application,) = config["applications"]
    assert application["import_path"] == "pipelines.ray_backend:engine_app"
    built = engine_app(application["args"])
    deployment = built._bound_deployment
    assert deployment.name == "StencilReplica"
    assert deployment.num_replicas == application["args"]["replicas"]
    assert deployment.ray_actor_options["num_gpus"] == 1
    autoscaled = engine_app({**application["args"], "max_replicas": 4})._bound_deployment
    scaling = autoscaled._deployment_config.autoscaling_config  # Serve has no public view
    assert (scaling.min_replicas, scaling.max_replicas) == (application["args"]["replicas"], 4)
    engine_options, loras_per_set = deployment.init_args
    # Stencil's own folders named relative to its root, which replicas do not run in.
    assert engine_options == {"model": "auto", "lora_folder": str(ROOT / "loras")}
    assert loras_per_set == application["args"]["loras_per_set"]


def test_a_closed_session_s_upload_leaves_the_object_store(ray_backend, ray_service, tmp_path):
    import hashlib

    kept = tmp_path / "kept.safetensors"
    shutil.copyfile(ROOT / "loras" / "tiny-outlined.safetensors", kept)
    gone = ray_service.add_lora_upload(kept, "session-closing")["name"]
    ray_service.generate(_fields("a red circle", 60, f"{gone}:1"), session_id="session-closing")
    sha = hashlib.sha256(kept.read_bytes()).hexdigest()
    assert sha in ray_backend.shelf.held()

    ray_service.forget_session("session-closing")  # its file is deleted on the front
    other = tmp_path / "other.safetensors"
    shutil.copyfile(ROOT / "loras" / "tiny-faded.safetensors", other)
    name = ray_service.add_lora_upload(other, "session-open")["name"]
    ray_service.generate(_fields("a red circle", 61, f"{name}:1"), session_id="session-open")
    assert sha not in ray_backend.shelf.held()
    assert hashlib.sha256(other.read_bytes()).hexdigest() in ray_backend.shelf.held()


def test_a_replica_killed_mid_request_gives_a_result_or_a_clear_error(
    ray_backend, ray_service, local_service
):
    fields = _fields("a blue circle", 21, steps=60)
    alone = local_service.generate(fields)
    request = ray_service.build_request(fields)
    victims: list[int] = []

    def started(replica: str, pid: int) -> None:
        victims.append(pid)

    def progress(done: int, total: int, stage: str) -> None:
        if done == 5 and len(victims) == 1:
            os.kill(victims[0], signal.SIGKILL)

    began = time.monotonic()
    try:
        result, run = ray_backend.generate_traced(request, progress=progress, started=started)
    except StencilError as exc:
        assert "GPU worker" in str(exc)
    else:  # the retry, on a live replica, drew the same image
        expected = np.asarray(Image.open(alone.image_paths[0]))
        assert np.array_equal(np.asarray(result.images[0]), expected)
        assert run.replica
    assert time.monotonic() - began < 120
    assert len(victims) >= 1

    after = ray_service.generate(_fields("a green square", 22))
    assert after.image_paths


def test_stop_reaches_the_replica_and_the_next_request_runs(ray_backend, ray_service):
    from pipelines.engine import CancelToken
    from pipelines.errors import GenerationCancelled

    token = CancelToken()
    steps: list[int] = []

    def progress(done: int, total: int, stage: str) -> None:
        steps.append(done)
        token.cancel()

    request = ray_service.build_request(_fields("a red circle", 50, steps=100))
    began = time.monotonic()
    with pytest.raises(GenerationCancelled):
        ray_backend.generate(request, progress=progress, cancel=token)
    assert time.monotonic() - began < 30 and len(steps) < 100
    assert ray_service.generate(_fields("a red circle", 51)).image_paths


def _scale_under_load(cache_root, replicas: int, ray_backend, ray_service, requests: int = 6):
    """Redeploy at `replicas` while `requests` generations are in flight; the replicas
    that served them."""
    from concurrent.futures import ThreadPoolExecutor

    calls = [
        ray_service.build_request(_fields("a red square", 30 + i, steps=8)) for i in range(requests)
    ]
    with ThreadPoolExecutor(max_workers=requests) as pool:
        futures = [pool.submit(ray_backend.generate_traced, call) for call in calls]
        time.sleep(0.3)
        _deploy(cache_root, replicas)
        outcomes = [future.result(timeout=120) for future in futures]
    assert all(len(result.images) == 1 for result, _ in outcomes)  # every request answered
    return {run.replica for _, run in outcomes}


def test_scaling_replicas_down_and_up_under_load_loses_no_request(
    ray_backend, ray_service, cache_root
):
    # Down: Serve stops routing to the replica it removes and lets it finish its requests.
    before = _scale_under_load(cache_root, 1, ray_backend, ray_service)
    # Up: the new replica joins once it has loaded its engine.
    _scale_under_load(cache_root, 2, ray_backend, ray_service)
    # A set no replica holds goes to the one holding the fewest: the new one, empty.
    request = ray_service.build_request(_fields("a circle", 40, "tiny-neon:1, tiny-ink:1"))
    _, run = ray_backend.generate_traced(request)
    assert run.replica not in before and run.set_loads == 1


class _SilentStream:
    """A replica's stream that says one thing, then nothing: a hung or partitioned replica."""

    def __init__(self):
        self.cancelled = threading.Event()

    def __iter__(self):
        yield ("started", "replica-x", 1)
        self.cancelled.wait(60)

    def cancel(self):
        self.cancelled.set()


def test_a_silent_replica_ends_the_request_with_an_error_not_a_hang():
    backend = object.__new__(RayBackend)  # no deployment: only the front's wait is tested
    backend.idle_timeout_s = 0.5
    stream = _SilentStream()
    began = time.monotonic()
    with pytest.raises(StencilError, match="sent nothing for"):
        list(backend._events(stream, cancel=None))
    assert time.monotonic() - began < 5
    assert stream.cancelled.is_set()  # and the replica is told to stop
