"""Control-map preprocessors: exact canny, stand-in pose and depth through the real loaders."""

from __future__ import annotations

import hashlib
import math
import shutil
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from pipelines.errors import InvalidRequestError, UnknownNameError
from pipelines.hub import hub_snapshot
from pipelines.preprocessors import (
    PREPROCESSORS,
    ParamSpec,
    WeightsSource,
    clear_preprocessor_cache,
    get_preprocessor,
    resolve_weights,
    tiny_weights,
    validate_params,
    weights,
)
from pipelines.preprocessors import canny as canny_module
from pipelines.preprocessors import pose as pose_module
from pipelines.preprocessors.canny import CannyPreprocessor
from pipelines.preprocessors.depth import DepthPreprocessor
from pipelines.preprocessors.pose import PosePreprocessor


@pytest.fixture(scope="session")
def standin_dir(tmp_path_factory) -> Path:
    """Stand-in pose and depth weights, built once for the whole session."""
    cache = tmp_path_factory.mktemp("standins")
    tiny_weights.build_tiny_openpose(tiny_weights.openpose_folder(cache))
    tiny_weights.build_tiny_depth(tiny_weights.depth_folder(cache))
    return cache


@pytest.fixture(scope="session")
def pose_standin(standin_dir) -> PosePreprocessor:
    folder = tiny_weights.openpose_folder(standin_dir)
    return PosePreprocessor(WeightsSource(str(folder), "stand-in"))


@pytest.fixture(scope="session")
def depth_standin(standin_dir) -> DepthPreprocessor:
    folder = tiny_weights.depth_folder(standin_dir)
    return DepthPreprocessor(WeightsSource(str(folder), "stand-in"))


@pytest.fixture
def empty_hub_cache(tmp_path) -> Path:
    return tmp_path / "hub"


@pytest.fixture(autouse=True)
def fresh_registry():
    clear_preprocessor_cache()
    yield
    clear_preprocessor_cache()


def _shapes(height: int = 128, width: int = 192) -> np.ndarray:
    image = np.zeros((height, width, 3), np.uint8)
    cv2.rectangle(image, (30, 40), (100, 110), (255, 255, 255), thickness=-1)
    cv2.circle(image, (150, 60), 25, (255, 255, 255), thickness=-1)
    return image


# --------------------------------------------------------------------------- canny


def test_canny_map_equals_opencv_on_the_same_pixels():
    drawn = _shapes()  # short side 128 = the resolution: no resampling anywhere
    result = get_preprocessor("canny")(Image.fromarray(drawn), resolution=128)
    expected = cv2.Canny(cv2.cvtColor(drawn, cv2.COLOR_RGB2GRAY), 100, 200)
    got = np.asarray(result)
    assert result.mode == "RGB" and result.size == (192, 128)
    assert np.array_equal(got[..., 0], expected)
    assert np.array_equal(got[..., 0], got[..., 1]) and np.array_equal(got[..., 0], got[..., 2])


def test_canny_edges_lie_on_the_rectangle_border():
    drawn = np.zeros((128, 128, 3), np.uint8)
    cv2.rectangle(drawn, (30, 40), (100, 110), (255, 255, 255), thickness=-1)
    edges = np.asarray(get_preprocessor("canny")(Image.fromarray(drawn), resolution=128))[..., 0]
    ys, xs = np.nonzero(edges)
    distance_to_border = np.minimum.reduce(
        [np.abs(xs - 30), np.abs(xs - 100), np.abs(ys - 40), np.abs(ys - 110)]
    )
    assert distance_to_border.max() <= 1
    for column in (30, 100):  # each vertical side is traced along its length
        assert np.count_nonzero(edges[40:111, column - 1 : column + 2].any(axis=1)) >= 65
    assert edges[:30].sum() == 0 and edges[:, :25].sum() == 0


def test_canny_thresholds_change_the_map():
    gradient = np.tile(np.linspace(0, 255, 128).astype(np.uint8), (128, 1))
    noisy = np.clip(gradient + np.random.default_rng(0).normal(0, 30, gradient.shape), 0, 255)
    image = Image.fromarray(noisy.astype(np.uint8)).convert("RGB")
    canny = get_preprocessor("canny")
    loose = np.asarray(canny(image, resolution=128, low_threshold=10, high_threshold=20))
    strict = np.asarray(canny(image, resolution=128, low_threshold=200, high_threshold=250))
    assert loose.sum() > strict.sum()


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (
            {"low_threshold": 150, "high_threshold": 100},
            r"high_threshold=100 .*at least low_threshold \(150\)",
        ),
        ({"low_threshold": 0}, r"low_threshold=0 is not allowed: an integer from 1 to 255"),
        ({"high_threshold": 300}, r"high_threshold=300 is not allowed: an integer from 1 to 255"),
        ({"low_threshold": 100.5}, r"low_threshold=100.5 .*an integer"),
        ({"low_threshold": True}, r"low_threshold=True .*an integer"),
        ({"low_threshold": "100"}, r"low_threshold='100' .*an integer"),
        ({"sigma": 2}, r"sigma=2 .*not a parameter of the canny preprocessor.*low_threshold"),
    ],
)
def test_canny_parameters_are_validated(params, message):
    image = Image.fromarray(_shapes())
    with pytest.raises(InvalidRequestError, match=message) as caught:
        get_preprocessor("canny")(image, resolution=128, **params)
    assert caught.value.field in params


def test_whole_float_from_a_slider_is_accepted():
    image = Image.fromarray(_shapes())
    canny = get_preprocessor("canny")
    as_float = canny(image, resolution=128, low_threshold=100.0, high_threshold=200.0)
    assert np.array_equal(np.asarray(as_float), np.asarray(canny(image, resolution=128)))


@pytest.mark.parametrize("resolution", [32, 5000, 100.5, "512"])
def test_resolution_is_validated(resolution):
    with pytest.raises(InvalidRequestError, match="resolution=.*64 to 1024"):
        get_preprocessor("canny")(Image.new("RGB", (64, 64)), resolution=resolution)


# --------------------------------------------------------------------------- parameters


def test_param_spec_kinds():
    strength = ParamSpec("strength", "Strength", "float", 0.5, minimum=0.0, maximum=1.0)
    assert strength.validate(1) == 1.0 and isinstance(strength.validate(1), float)
    with pytest.raises(InvalidRequestError, match=r"strength=1.5 .*a number from 0 to 1"):
        strength.validate(1.5)
    with pytest.raises(InvalidRequestError, match="strength=nan"):
        strength.validate(float("nan"))
    mode = ParamSpec("mode", "Mode", "choice", "a", choices=("a", "b"))
    with pytest.raises(InvalidRequestError, match="mode='c' .*one of 'a', 'b'"):
        mode.validate("c")
    flag = ParamSpec("flag", "Flag", "bool", False)
    assert flag.validate(np.True_) is True
    with pytest.raises(InvalidRequestError, match="flag=1 .*true or false"):
        flag.validate(1)
    with pytest.raises(InvalidRequestError, match="bad=0"):
        ParamSpec("bad", "Bad", "int", 0, minimum=1)  # a spec's own default must be valid


def test_validate_params_returns_a_new_dict_and_leaves_defaults_alone():
    specs = canny_module.PARAMS
    given = {"low_threshold": 50}
    values = validate_params(specs, given, owner="canny")
    assert values == {"low_threshold": 50, "high_threshold": 200}
    values["high_threshold"] = 1
    assert given == {"low_threshold": 50}
    assert validate_params(specs, {}, owner="canny")["high_threshold"] == 200


def _ends(spec) -> tuple:
    """The lowest and the highest value a declared parameter takes."""
    if spec.kind == "bool":
        return False, True
    if spec.kind == "choice":
        return spec.choices[0], spec.choices[-1]
    return spec.minimum, spec.maximum


def _just_outside(spec) -> list:
    """Values one step beyond what a declared parameter takes."""
    if spec.kind == "bool":
        return [1, "true"]
    if spec.kind == "choice":
        return [f"not-{spec.choices[-1]}"]
    if spec.kind == "int":
        return [spec.minimum - 1, spec.maximum + 1]
    return [math.nextafter(spec.minimum, -math.inf), math.nextafter(spec.maximum, math.inf)]


def test_every_preprocessor_declares_valid_params(monkeypatch, tmp_path):
    assert len({cls.label for cls in PREPROCESSORS.values()}) == len(PREPROCESSORS)
    image = Image.new("RGB", (64, 64))
    seen: list[dict] = []  # the parameters each detection was given

    def detect(self, image, params):
        seen.append(params)
        return image

    numeric = 0
    for name, cls in PREPROCESSORS.items():
        assert cls.name == name
        assert isinstance(cls.label, str) and cls.label.strip(), name
        names = [spec.name for spec in cls.params]
        labels = [spec.label for spec in cls.params]
        assert len(set(names)) == len(names), name
        assert all(isinstance(x, str) and x.strip() for x in labels), name
        assert len(set(labels)) == len(labels), f"{name}: two parameters share a label"

        for spec in cls.params:
            where = f"{name}.{spec.name}"
            assert spec.kind in ("int", "float", "bool", "choice"), where
            if spec.kind == "bool":
                assert isinstance(spec.default, bool), where
            elif spec.kind == "choice":
                assert spec.default in spec.choices, where
            else:  # the page makes a slider of it: both ends must be declared
                numeric += 1
                assert spec.minimum is not None and spec.maximum is not None, where
                assert spec.minimum <= spec.default <= spec.maximum, where
                if spec.step:  # the slider's grid reaches the default and the maximum
                    for value in (spec.default, spec.maximum):
                        steps = (value - spec.minimum) / spec.step
                        assert math.isclose(steps, round(steps), abs_tol=1e-9), where
            # An omitted parameter takes the default as declared: it must be canonical.
            assert type(spec.validate(spec.default)) is type(spec.default), where
            for value in (spec.default, *_ends(spec)):
                assert validate_params(cls.params, {spec.name: value}, owner=name) == {
                    **{other.name: other.default for other in cls.params},
                    spec.name: value,
                }, (where, value)

        # The preprocessor itself, with detection replaced: no weights are loaded.
        monkeypatch.setattr(cls, "_detect", detect)
        preprocessor = cls(WeightsSource(str(tmp_path), "stand-in")) if cls.needs_weights else cls()
        defaults = {spec.name: spec.default for spec in cls.params}
        low = {spec.name: _ends(spec)[0] for spec in cls.params}
        high = {spec.name: _ends(spec)[1] for spec in cls.params}
        for given in ({}, defaults, low, high):  # every parameter at the same end at once
            preprocessor(image, resolution=64, **given)
            assert seen[-1] == {**defaults, **given}, (name, given)
        calls = len(seen)
        for spec in cls.params:
            for value in _just_outside(spec):
                with pytest.raises(InvalidRequestError) as caught:
                    preprocessor(image, resolution=64, **{spec.name: value})
                assert caught.value.field == spec.name, (name, spec.name, value)
                message = str(caught.value)
                assert message.startswith(f"{spec.name}={value!r} is not allowed"), message
                assert spec.describe() in message
        assert len(seen) == calls  # refused before anything was detected
    assert numeric >= 2  # canny's thresholds at least: the bound checks above ran


# --------------------------------------------------------------------------- identity


def test_identity_returns_the_upload_at_the_resolution():
    rgba = Image.new("RGBA", (100, 200), (10, 20, 30, 255))
    result = get_preprocessor("identity")(rgba, resolution=64)
    assert result.mode == "RGB" and result.size == (64, 128)
    assert result.getpixel((10, 10)) == (10, 20, 30)
    rgb = Image.new("RGB", (64, 64))
    assert get_preprocessor("identity")(rgb, resolution=64) is not rgb


@pytest.mark.parametrize("name", ["canny", "identity"])
def test_tiny_inputs_are_enlarged_to_the_resolution(name):
    result = get_preprocessor(name)(Image.new("RGB", (7, 13), (255, 255, 255)), resolution=64)
    assert result.size == (64, 119)


# --------------------------------------------------------------------------- pose


def test_pose_standin_files(standin_dir):
    folder = tiny_weights.openpose_folder(standin_dir)
    from pipelines.atomic_folder import MANIFEST_NAME

    weights = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST_NAME)
    assert weights == sorted(pose_module.WEIGHT_FILES)
    assert (folder / MANIFEST_NAME).is_file()  # what lets a damaged copy be rebuilt
    assert all(p.stat().st_size < 5_000_000 for p in folder.iterdir())


def test_pose_standin_loads_through_the_real_loader_and_draws_a_map(pose_standin):
    from controlnet_aux.open_pose import OpenposeDetector

    assert pose_standin.weights == "stand-in" and not pose_standin.uses_real_weights
    with pytest.raises(InvalidRequestError, match="include_face='yes' .*true or false"):
        pose_standin(Image.new("RGB", (64, 64)), resolution=64, include_face="yes")
    assert pose_standin._model is None  # validation comes before loading
    # One detection only: OpenPose's networks are full size (~3 s a call on 2 CPU cores).
    result = pose_standin(Image.new("RGB", (7, 13)), resolution=64, include_hand=True)
    assert isinstance(pose_standin._model, OpenposeDetector)  # from_pretrained(folder)
    assert result.mode == "RGB" and result.size == (64, 119)
    assert np.asarray(result).max() == 0  # random weights find nobody: an empty map


def test_weights_load_once_across_threads(standin_dir, monkeypatch):
    folder = tiny_weights.depth_folder(standin_dir)
    depth = DepthPreprocessor(WeightsSource(str(folder), "stand-in"))
    calls = []
    original = DepthPreprocessor._load

    def counting_load(self):
        calls.append(threading.get_ident())
        return original(self)

    monkeypatch.setattr(DepthPreprocessor, "_load", counting_load)
    threads = [threading.Thread(target=depth.load) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1


def test_openpose_standin_is_deterministic_and_seeded(tmp_path, standin_dir):
    def digests(folder: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}

    again = tiny_weights.build_tiny_openpose(tmp_path / "again")
    assert digests(again) == digests(tiny_weights.openpose_folder(standin_dir))
    other = tiny_weights.build_tiny_openpose(tmp_path / "other", seed=1)
    assert digests(other) != digests(again)
    stamp = (again / "facenet.pth").stat().st_mtime_ns
    tiny_weights.build_tiny_openpose(again)  # already built: left as it is
    assert (again / "facenet.pth").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders


# --------------------------------------------------------------------------- depth


def test_depth_standin_loads_through_the_real_pipeline(standin_dir):
    from transformers import pipeline

    folder = tiny_weights.depth_folder(standin_dir)
    assert all(p.stat().st_size < 5_000_000 for p in folder.iterdir())
    estimator = pipeline("depth-estimation", model=str(folder))
    assert estimator(Image.fromarray(_shapes()))["predicted_depth"].shape[-2:] == (128, 192)


def test_depth_standin_map(depth_standin):
    assert depth_standin.weights == "stand-in"
    image = Image.fromarray(_shapes())
    first = depth_standin(image, resolution=64)
    assert first.mode == "RGB" and first.size == (96, 64)
    pixels = np.asarray(first)
    assert pixels.min() == 0 and pixels.max() == 255  # stretched per image
    assert np.array_equal(pixels, np.asarray(depth_standin(image, resolution=64)))
    inverted = np.asarray(depth_standin(Image.fromarray(255 - _shapes()), resolution=64))
    assert not np.array_equal(pixels, inverted)  # the map depends on the picture
    assert depth_standin(Image.new("RGB", (7, 13), (90, 30, 200)), resolution=64).size == (64, 119)


# --------------------------------------------------------------------------- weights


def test_offline_without_cached_weights_uses_standins(tmp_path, empty_hub_cache, standin_dir):
    for kind in ("pose", "depth"):
        source = resolve_weights(
            kind, offline=True, cache_dir=standin_dir, hub_cache=empty_hub_cache
        )
        assert source.weights == "stand-in"
        assert "offline" in source.note
        assert Path(source.location).parent == standin_dir


def test_unreachable_hub_uses_standins_without_waiting(monkeypatch, empty_hub_cache, standin_dir):
    monkeypatch.setattr(weights, "hub_reachable", lambda repo_id, timeout=4.0: False)
    source = resolve_weights(
        "depth", offline=False, cache_dir=standin_dir, hub_cache=empty_hub_cache
    )
    assert source.weights == "stand-in" and "cannot be reached" in source.note


def _fake_hub_snapshot(hub_cache: Path, repo: str, files: dict[str, Path]) -> Path:
    """The Hugging Face cache layout, as hf_hub_download leaves it."""
    snapshot = hub_snapshot(hub_cache, repo, "0" * 40)
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        shutil.copy(source, snapshot / name)
    return snapshot


def test_weights_in_the_local_hub_cache_count_as_real(tmp_path, standin_dir):
    hub_cache = tmp_path / "hub"
    pose_files = tiny_weights.openpose_folder(standin_dir)
    snapshot = _fake_hub_snapshot(
        hub_cache, pose_module.REPO_ID, {p.name: p for p in pose_files.iterdir()}
    )
    source = resolve_weights("pose", offline=True, cache_dir=tmp_path, hub_cache=hub_cache)
    assert source == WeightsSource(str(snapshot), "real", source.note)
    assert "local Hugging Face cache" in source.note

    depth_files = tiny_weights.depth_folder(standin_dir)
    snapshot = _fake_hub_snapshot(
        hub_cache,
        "depth-anything/Depth-Anything-V2-Small-hf",
        {p.name: p for p in depth_files.iterdir()},
    )
    source = resolve_weights("depth", offline=True, cache_dir=tmp_path, hub_cache=hub_cache)
    assert source.weights == "real" and Path(source.location) == snapshot
    real = DepthPreprocessor(source)
    assert real.uses_real_weights
    assert real(Image.fromarray(_shapes()), resolution=64).size == (96, 64)


def test_weights_folder_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("STENCIL_POSE_WEIGHTS", str(tmp_path))
    source = resolve_weights("pose", offline=True, cache_dir=tmp_path)
    assert source.location == str(tmp_path) and source.weights == "real"


def test_unknown_kinds_are_refused(tmp_path):
    with pytest.raises(UnknownNameError, match="unknown weighted preprocessor 'canny'"):
        resolve_weights("canny", offline=True, cache_dir=tmp_path)
    with pytest.raises(UnknownNameError, match="unknown preprocessor 'hed'; choose one of: canny"):
        get_preprocessor("hed")


# --------------------------------------------------------------------------- registry


def test_registry_builds_each_preprocessor_once(standin_dir, monkeypatch, empty_hub_cache):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Real weights in this machine's own HF cache would (rightly) be preferred: hide them.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(empty_hub_cache))
    assert set(PREPROCESSORS) == {"canny", "pose", "depth", "identity"}
    assert get_preprocessor("canny") is get_preprocessor("canny")
    assert isinstance(get_preprocessor("canny"), CannyPreprocessor)
    assert get_preprocessor("canny").weights == "none"
    source = WeightsSource(str(tiny_weights.depth_folder(standin_dir)), "stand-in")
    depth = get_preprocessor("depth", weights_source=source)
    assert depth is get_preprocessor("depth", weights_source=source)
    assert depth.weights_source is source
    resolved = get_preprocessor("pose", cache_dir=standin_dir)  # offline: stand-in
    assert resolved.weights == "stand-in"
    assert resolved is get_preprocessor("pose", cache_dir=standin_dir)
    with pytest.raises(ValueError, match="needs a WeightsSource"):
        PosePreprocessor(None)
