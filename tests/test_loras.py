"""The LoRA library on the tiny model: what a user notices.

Each test loads the tiny family afresh (adapter state lives on the model), generates 64x64
images in 2 steps with a fixed seed, and compares pixels: a LoRA changes the image, no LoRA
gives the base image bit for bit, a refused file changes nothing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import hub_snapshot, load_tiny_pipe, render_np
from safetensors.torch import load_file, save, save_file

from pipelines.errors import (
    InvalidRequestError,
    LoraRejectedError,
    ModelLoadError,
    UnknownNameError,
)
from pipelines.lora_files import ModelSignature
from pipelines.loras import CatalogueError, LoraLibrary, load_catalogue
from pipelines.requests import LoraChoice

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "loras"
TINY_NAMES = [
    "tiny-faded",
    "tiny-ink",
    "tiny-inverted",
    "tiny-neon",
    "tiny-outlined",
    "tiny-sketch-kohya",
    "tiny-watercolor",
]
# Trained with the tiny model by tiny_training/; the others are seeded by make_tiny_loras.py.
TRAINED_TINY_NAMES = ["tiny-inverted", "tiny-outlined"]
ATTN2_TO_K = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"


@pytest.fixture
def pipe(tiny_family):
    pipe = load_tiny_pipe(tiny_family)
    return pipe


@pytest.fixture(scope="module")
def base_image(tiny_family) -> np.ndarray:
    fresh = load_tiny_pipe(tiny_family)
    return render(fresh)


@pytest.fixture
def library(tmp_path) -> LoraLibrary:
    return LoraLibrary(SHIPPED, "tiny", uploads_dir=tmp_path / "uploads")


def render(pipe) -> np.ndarray:
    return render_np(pipe)


def with_loras(library, pipe, *pairs, session_id=None) -> np.ndarray:
    library.activate(pipe, [LoraChoice(n, w) for n, w in pairs], session_id=session_id)
    return render(pipe)


def differs(a: np.ndarray, b: np.ndarray) -> bool:
    return float(np.abs(a - b).mean()) > 1e-3


# --------------------------------------------------------------------------------------
# Activation: on, off, weights, sets


def test_each_shipped_lora_changes_the_image_and_off_restores_it(library, pipe, base_image):
    assert np.array_equal(render(pipe), base_image)
    for name in TINY_NAMES:
        assert differs(with_loras(library, pipe, (name, 1.0)), base_image), name
    assert np.array_equal(with_loras(library, pipe), base_image)


def test_weight_zero_is_the_base_image(library, pipe, base_image):
    with_loras(library, pipe, ("tiny-ink", 1.0))
    assert np.array_equal(with_loras(library, pipe, ("tiny-ink", 0.0)), base_image)
    applied = library.activate(pipe, [LoraChoice("tiny-neon", 0.0)])
    assert applied[0]["active"] is False and applied[0]["weight"] == 0.0


def test_weights_scale_the_effect(library, pipe, base_image):
    half = with_loras(library, pipe, ("tiny-ink", 0.5))
    full = with_loras(library, pipe, ("tiny-ink", 1.0))
    assert differs(half, full)
    assert np.abs(half - base_image).mean() < np.abs(full - base_image).mean()


def test_two_adapters_differ_from_each_alone_and_order_does_not_matter(library, pipe):
    ink = with_loras(library, pipe, ("tiny-ink", 0.8))
    neon = with_loras(library, pipe, ("tiny-neon", 0.6))
    both = with_loras(library, pipe, ("tiny-ink", 0.8), ("tiny-neon", 0.6))
    assert differs(both, ink) and differs(both, neon)
    swapped = with_loras(library, pipe, ("tiny-neon", 0.6), ("tiny-ink", 0.8))
    assert np.array_equal(both, swapped)


def test_a_pair_gives_the_same_image_whatever_was_loaded_before(library, pipe, tiny_family):
    # Two users' histories: one loaded ink first, the other neon first. The pair must not
    # depend on which adapter the shared model happened to load earlier.
    with_loras(library, pipe, ("tiny-ink", 1.0))
    with_loras(library, pipe, ("tiny-neon", 1.0))
    first = with_loras(library, pipe, ("tiny-ink", 0.8), ("tiny-neon", 0.6))
    other_pipe = load_tiny_pipe(tiny_family)
    other = LoraLibrary(SHIPPED, "tiny")
    with_loras(other, other_pipe, ("tiny-neon", 1.0))
    with_loras(other, other_pipe, ("tiny-ink", 1.0))
    second = with_loras(other, other_pipe, ("tiny-ink", 0.8), ("tiny-neon", 0.6))
    assert np.array_equal(first, second)


def test_switching_sets_gives_what_a_fresh_model_gives(library, pipe, tiny_family):
    # A UNet-only LoRA after a text-encoder one: the text encoder must not keep the old one.
    with_loras(library, pipe, ("tiny-neon", 1.0))
    after_switch = with_loras(library, pipe, ("tiny-ink", 1.0))
    fresh = load_tiny_pipe(tiny_family)
    other = LoraLibrary(SHIPPED, "tiny")
    assert np.array_equal(after_switch, with_loras(other, fresh, ("tiny-ink", 1.0)))


def test_kohya_layout_loads_and_changes_the_image(library, pipe, base_image):
    image = with_loras(library, pipe, ("tiny-sketch-kohya", 1.0))
    assert differs(image, base_image)
    report = library.resolve("tiny-sketch-kohya").report
    assert report.layout == "kohya" and report.targets == ("unet", "text_encoder")


def test_alpha_metadata_sets_the_scale(library, pipe, tmp_path):
    # tiny-faded has rank 8 and alpha 2 (scale 1/4), recorded in its metadata. The same
    # weights saved without metadata load at scale 1, so at weight 0.25 they must match.
    faded = with_loras(library, pipe, ("tiny-faded", 1.0))
    folder = tmp_path / "lib"
    folder.mkdir()
    save_file(load_file(SHIPPED / "tiny-faded.safetensors"), str(folder / "bare.safetensors"))
    write_catalogue(folder, [file_entry("bare", "bare.safetensors")])
    bare = LoraLibrary(folder, "tiny")
    assert bare.resolve("bare").base == "tiny"
    assert np.allclose(with_loras(bare, pipe, ("bare", 0.25)), faded, atol=1e-6)
    assert differs(with_loras(bare, pipe, ("bare", 1.0)), faded)


def test_activate_returns_the_recipe(library, pipe):
    applied = library.activate(pipe, [LoraChoice("tiny-ink", 0.7), LoraChoice("tiny-neon", 0.2)])
    assert [a["name"] for a in applied] == ["tiny-ink", "tiny-neon"]
    assert [a["weight"] for a in applied] == [0.7, 0.2]
    assert all(len(a["sha256"]) == 64 and a["source"] == "file" for a in applied)


def test_activating_the_loaded_set_again_only_sets_weights(library, pipe, monkeypatch):
    library.activate(pipe, [LoraChoice("tiny-ink", 0.7)])

    def no_loading(*args, **kwargs):
        raise AssertionError("an already loaded adapter was loaded again")

    monkeypatch.setattr(pipe, "load_lora_weights", no_loading)
    library.activate(pipe, [LoraChoice("tiny-ink", 0.7)])
    library.activate(pipe, [LoraChoice("tiny-ink", 0.3)])
    library.activate(pipe, [])


def test_same_file_under_two_names_in_one_set_is_refused(tmp_path, pipe):
    folder = tmp_path / "lib"
    folder.mkdir()
    shutil.copy(SHIPPED / "tiny-ink.safetensors", folder / "a.safetensors")
    write_catalogue(folder, [file_entry("a", "a.safetensors"), file_entry("b", "a.safetensors")])
    with pytest.raises(InvalidRequestError, match="same file"):
        LoraLibrary(folder, "tiny").activate(pipe, [LoraChoice("a", 1), LoraChoice("b", 1)])


# --------------------------------------------------------------------------------------
# Refused files change nothing


def write_catalogue(folder: Path, entries: list[dict]) -> None:
    (folder / "catalog.json").write_text(json.dumps({"version": 1, "loras": entries}))


def file_entry(name: str, file: str, base: str = "tiny") -> dict:
    return {"name": name, "file": file, "base": base, "licence": "test"}


def bad_files() -> dict[str, tuple[bytes, str]]:
    ink = (SHIPPED / "tiny-ink.safetensors").read_bytes()
    xl = {
        f"unet.{ATTN2_TO_K}.lora_A.weight": torch.ones(4, 2048),
        f"unet.{ATTN2_TO_K}.lora_B.weight": torch.ones(64, 4),
    }
    nowhere = {
        "unet.no_such_block.to_q.lora_A.weight": torch.ones(4, 32),
        "unet.no_such_block.to_q.lora_B.weight": torch.ones(32, 4),
    }
    return {
        "pickled": (_torch_save_bytes(), "zip archive"),
        "truncated": (ink[: len(ink) // 2], "truncated"),
        "sdxl-shaped": (save(xl), "different base model: it looks like an SDXL LoRA"),
        "nowhere": (save(nowhere), "matches no layer"),
        "huge-header": ((60 * 2**20).to_bytes(8, "little") + b"{}", "above the 50 MB limit"),
    }


def _torch_save_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save({"x.lora_A.weight": torch.ones(2, 2)}, buffer)
    return buffer.getvalue()


@pytest.fixture
def library_with_bad_files(tmp_path) -> LoraLibrary:
    folder = tmp_path / "lib"
    folder.mkdir()
    shutil.copy(SHIPPED / "tiny-ink.safetensors", folder)
    entries = [file_entry("tiny-ink", "tiny-ink.safetensors")]
    for name, (data, _) in bad_files().items():
        (folder / f"{name}.safetensors").write_bytes(data)
        entries.append(file_entry(name, f"{name}.safetensors"))
    write_catalogue(folder, entries)
    return LoraLibrary(folder, "tiny")


@pytest.mark.parametrize("bad", list(bad_files()))
def test_a_refused_file_leaves_the_loaded_set_and_image_unchanged(
    library_with_bad_files, pipe, bad
):
    library = library_with_bad_files
    before = with_loras(library, pipe, ("tiny-ink", 0.9))
    adapters_before = pipe.get_list_adapters()
    with pytest.raises(LoraRejectedError, match=bad_files()[bad][1]):
        library.activate(pipe, [LoraChoice("tiny-ink", 0.9), LoraChoice(bad, 1.0)])
    assert pipe.get_list_adapters() == adapters_before
    assert library.loaded() == ["tiny-ink"]
    assert np.array_equal(render(pipe), before)


def test_a_refused_file_after_no_lora_keeps_the_base_image(
    library_with_bad_files, pipe, base_image
):
    with pytest.raises(LoraRejectedError):
        library_with_bad_files.activate(pipe, [LoraChoice("sdxl-shaped", 1.0)])
    assert pipe.get_list_adapters() == {}
    assert np.array_equal(render(pipe), base_image)


# --------------------------------------------------------------------------------------
# Names, catalogue, bases


def test_unknown_names_list_the_known_ones(library):
    with pytest.raises(UnknownNameError) as caught:
        library.resolve("tiny-inc")
    assert "tiny-ink" in str(caught.value) and "tiny-neon" in str(caught.value)
    assert list(caught.value.known) == TINY_NAMES


@pytest.mark.parametrize(
    "name",
    ["../loras/tiny-ink", "/etc/passwd", "tiny-ink.safetensors", "loras/tiny-ink", "catalog.json"],
)
def test_path_like_names_are_just_unknown(library, name):
    with pytest.raises(UnknownNameError):
        library.resolve(name)


def test_entries_list_only_the_loaded_models_family(library):
    assert [e.name for e in library.entries()] == TINY_NAMES
    public = library.entries()[1].to_public_dict()
    assert public["name"] == "tiny-ink" and public["source"] == "file"
    assert "file" not in public and "session_id" not in public


def test_a_lora_for_another_base_is_refused_by_name(library):
    with pytest.raises(LoraRejectedError, match="made for SD 1.5; the loaded model is the tiny"):
        library.resolve("lcm-sd15")
    sd15 = LoraLibrary(SHIPPED, "sd15")
    assert "lcm-sd15" in sd15.names() and "tiny-ink" not in sd15.names()
    with pytest.raises(LoraRejectedError, match="made for SDXL"):
        sd15.resolve("pixel-art-xl")


def test_the_shipped_catalogue_pins_or_flags_every_hub_revision():
    catalogue = load_catalogue(SHIPPED)
    hub = [e for e in catalogue.values() if e.hub is not None]
    assert len(hub) >= 4
    assert any(e.hub.pinned for e in hub)
    for entry in catalogue.values():
        if entry.file is not None:
            assert (SHIPPED / entry.file).is_file(), entry.name


@pytest.mark.parametrize(
    "entry, reason",
    [
        (file_entry("x", "../outside.safetensors"), "outside the library folder"),
        (file_entry("x", "/etc/passwd"), "relative to the library folder"),
        (file_entry("Bad Name", "a.safetensors"), "must be lowercase"),
        (
            {
                "name": "x",
                "base": "sd15",
                "hub": {"repo_id": "a/b", "weight_name": "w", "revision": "main"},
            },
            "not a commit sha",
        ),
        (
            {
                "name": "x",
                "base": "sd15",
                "hub": {"repo_id": "a/b", "weight_name": "w", "revision": "0" * 40, "sha256": "ab"},
            },
            "sha256 must be 64 lowercase hex digits",
        ),
        ({"name": "x", "base": "tiny"}, "exactly one of 'file' or 'hub'"),
        ({**file_entry("x", "a.safetensors"), "colour": "red"}, "unknown fields"),
    ],
)
def test_catalogue_mistakes_are_caught_at_start_up(tmp_path, entry, reason):
    write_catalogue(tmp_path, [entry])
    with pytest.raises(CatalogueError, match=reason):
        load_catalogue(tmp_path)


def test_hub_entries_fail_clearly_when_they_cannot_be_fetched(tmp_path, pipe, base_image):
    folder = tmp_path / "lib"
    folder.mkdir()
    hub = {"repo_id": "stencil-tests/absent", "weight_name": "x.safetensors", "revision": "0" * 40}
    write_catalogue(folder, [{"name": "far", "base": "tiny", "hub": hub}])
    library = LoraLibrary(folder, "tiny", allow_downloads=False, hub_cache_dir=tmp_path / "hub")
    with pytest.raises(ModelLoadError, match="downloads are disabled"):
        library.activate(pipe, [LoraChoice("far", 1.0)])
    assert np.array_equal(render(pipe), base_image)


def put_in_hub_cache(cache: Path, repo_id: str, revision: str, name: str, data: bytes) -> None:
    snapshot = hub_snapshot(cache, repo_id, revision)
    snapshot.mkdir(parents=True)
    (snapshot / name).write_bytes(data)


def test_hub_entries_are_checked_against_their_published_digest(
    tmp_path, pipe, base_image, tiny_family
):
    # The real hf_hub_download path, served from a filled cache (no network here): the file
    # whose sha256 the catalogue names loads; different bytes under that name are refused.
    ink = (SHIPPED / "tiny-ink.safetensors").read_bytes()
    neon = (SHIPPED / "tiny-neon.safetensors").read_bytes()
    cache, revision = tmp_path / "hub", "1" * 40
    put_in_hub_cache(cache, "stencil-tests/ink", revision, "ink.safetensors", ink)
    put_in_hub_cache(cache, "stencil-tests/swapped", revision, "ink.safetensors", neon)
    digest = hashlib.sha256(ink).hexdigest()
    folder = tmp_path / "lib"
    folder.mkdir()
    write_catalogue(
        folder,
        [
            {
                "name": f"from-{repo}",
                "base": "tiny",
                "hub": {
                    "repo_id": f"stencil-tests/{repo}",
                    "weight_name": "ink.safetensors",
                    "revision": revision,
                    "sha256": digest,
                },
            }
            for repo in ("ink", "swapped")
        ],
    )
    library = LoraLibrary(folder, "tiny", allow_downloads=False, hub_cache_dir=cache)
    expected = with_loras(
        LoraLibrary(SHIPPED, "tiny"), load_tiny_pipe(tiny_family), ("tiny-ink", 1.0)
    )
    assert np.array_equal(with_loras(library, pipe, ("from-ink", 1.0)), expected)
    with pytest.raises(LoraRejectedError, match=r"sha256 .* is not the catalogue's"):
        library.activate(pipe, [LoraChoice("from-swapped", 1.0)])
    assert np.array_equal(render(pipe), expected)  # the refused file changed nothing
    assert np.array_equal(with_loras(library, pipe), base_image)


# --------------------------------------------------------------------------------------
# Memory: least recently used adapters go first, never the set being activated


def test_lru_eviction_keeps_the_set_being_activated(tmp_path, pipe):
    library = LoraLibrary(SHIPPED, "tiny", max_loaded=2)
    ink = with_loras(library, pipe, ("tiny-ink", 1.0))
    with_loras(library, pipe, ("tiny-neon", 1.0))
    with_loras(library, pipe, ("tiny-watercolor", 1.0), ("tiny-neon", 1.0))
    assert library.loaded() == ["tiny-watercolor", "tiny-neon"]
    assert len(pipe.get_list_adapters()["unet"]) == 2
    assert np.array_equal(with_loras(library, pipe, ("tiny-ink", 1.0)), ink)  # reloaded
    with pytest.raises(InvalidRequestError, match="at most 2 LoRAs"):
        library.activate(pipe, [LoraChoice(n, 1.0) for n in TINY_NAMES[:3]])


def test_memory_budget_evicts_and_bounds_a_set(pipe):
    library = LoraLibrary(SHIPPED, "tiny", memory_budget_mb=0.2)
    with_loras(library, pipe, ("tiny-ink", 1.0))  # 0.09 MB of weights
    with_loras(library, pipe, ("tiny-neon", 1.0))  # 0.15 MB: ink must go
    assert library.loaded() == ["tiny-neon"]
    with pytest.raises(InvalidRequestError, match="budget is 0.2 MB"):
        library.activate(pipe, [LoraChoice("tiny-ink", 1.0), LoraChoice("tiny-sketch-kohya", 1.0)])


# --------------------------------------------------------------------------------------
# Uploads: checked, stored by content, visible to their session only


def test_an_upload_is_usable_by_its_session_only(library, pipe, tmp_path):
    data = (SHIPPED / "tiny-ink.safetensors").read_bytes()
    library.bind(pipe)
    entry = library.add_upload(data, "../../My Ink Style!.safetensors", "session-a")
    assert entry.name.startswith("upload-") and entry.name.endswith("-my-ink-style")
    assert entry.report is not None and entry.report.ranks == (4,)
    assert [p.name for p in (tmp_path / "uploads").iterdir()] == [
        f"{entry.report.sha256}.safetensors"
    ]

    assert entry.name in library.names("session-a")
    assert entry.name not in library.names("session-b") + library.names()
    with pytest.raises(UnknownNameError):
        library.resolve(entry.name, session_id="session-b")
    with pytest.raises(UnknownNameError):
        library.activate(pipe, [LoraChoice(entry.name, 1.0)])

    uploaded = with_loras(library, pipe, (entry.name, 1.0), session_id="session-a")
    assert np.array_equal(uploaded, with_loras(library, pipe, ("tiny-ink", 1.0)))
    library.forget_session("session-a")
    assert entry.name not in library.names("session-a")


def test_uploads_are_checked_like_any_file(library, pipe):
    with pytest.raises(LoraRejectedError, match="zip archive"):
        library.add_upload(_torch_save_bytes(), "model.safetensors", "s")
    small = LoraLibrary(SHIPPED, "tiny", max_upload_mb=0.01)
    with pytest.raises(LoraRejectedError, match="above the 0 MB limit"):
        small.add_upload((SHIPPED / "tiny-ink.safetensors").read_bytes(), "ink.safetensors", "s")

    xl = bad_files()["sdxl-shaped"][0]
    entry = library.add_upload(xl, "xl.safetensors", "s")  # not bound yet: keys unchecked
    with pytest.raises(LoraRejectedError, match="different base model"):
        library.activate(pipe, [LoraChoice(entry.name, 1.0)], session_id="s")
    with pytest.raises(LoraRejectedError, match="different base model"):
        library.add_upload(xl, "xl-again.safetensors", "s")  # bound now: refused at once


# --------------------------------------------------------------------------------------
# Text forms


def test_parse_lora_string(library):
    assert library.parse_lora_string("") == () and library.parse_lora_string("   ") == ()
    parsed = library.parse_lora_string("tiny-ink:0.5, tiny-neon")
    assert parsed == (LoraChoice("tiny-ink", 0.5), LoraChoice("tiny-neon", 0.8))
    for text in ["tiny-ink:abc", "tiny-ink:0.5:1", ":0.5", "tiny-ink,,tiny-neon", "tiny-ink:nan"]:
        with pytest.raises(InvalidRequestError, match="loras"):
            library.parse_lora_string(text)
    with pytest.raises(UnknownNameError, match="tiny-ink"):
        library.parse_lora_string("nope:1")
    with pytest.raises(InvalidRequestError, match="once"):
        library.parse_lora_string("tiny-ink:1, tiny-ink:0.5")


def test_prompt_tags_are_removed_and_parsed(library):
    prompt, choices = library.extract_prompt_lora_tags(
        "a cat <lora:tiny-ink:0.5>, sunny <LoRA:tiny-neon>"
    )
    assert prompt == "a cat, sunny"
    assert choices == (LoraChoice("tiny-ink", 0.5), LoraChoice("tiny-neon", 0.8))
    assert library.extract_prompt_lora_tags("plain prompt") == ("plain prompt", ())
    with pytest.raises(InvalidRequestError):
        library.extract_prompt_lora_tags("x <lora:tiny-ink:1:0.5>")


# --------------------------------------------------------------------------------------
# Hotswap mode (for a compiled UNet) gives the images normal loading gives


def test_hotswap_matches_normal_loading(tiny_family, base_image):
    def fresh():
        pipe = load_tiny_pipe(tiny_family)
        return pipe

    normal_pipe, swap_pipe = fresh(), fresh()
    normal = LoraLibrary(SHIPPED, "tiny")
    swapping = LoraLibrary(SHIPPED, "tiny", hotswap_rank=8, hotswap_slots=2)
    swapping.bind(swap_pipe)
    assert np.array_equal(render(swap_pipe), base_image)  # empty slots change nothing

    sets = [
        [("tiny-ink", 1.0)],
        [("tiny-faded", 0.7)],  # alpha != rank: the slot's scale must follow the new adapter
        [("tiny-watercolor", 1.0), ("tiny-ink", 0.5)],
        [("tiny-faded", 1.0), ("tiny-watercolor", 0.3)],
    ]
    for pairs in sets:
        expected = with_loras(normal, normal_pipe, *pairs)
        got = with_loras(swapping, swap_pipe, *pairs)
        # Slots are padded to the hotswap rank, which reorders float sums (~1e-7), and
        # this random tiny model amplifies that: a 1e-6 change of a weight can move a
        # pixel by 0.01. So: equal to well below what a wrong scale would do (next check).
        assert np.abs(got - expected).mean() < 2e-3 and np.abs(got - expected).max() < 0.05
    # peft's own set_scale after a hotswap would apply the slot's first alpha/rank (here
    # 8/8 instead of 2/8): 4x too strong. That would be far outside the tolerance above.
    wrong = with_loras(normal, normal_pipe, ("tiny-faded", 2.8))
    right = with_loras(swapping, swap_pipe, ("tiny-faded", 0.7))
    assert np.abs(wrong - right).mean() > 1e-2
    assert len(swap_pipe.get_list_adapters()["unet"]) == 2  # still just the two slots
    assert np.array_equal(with_loras(swapping, swap_pipe), base_image)


def test_hotswap_refuses_text_encoder_and_oversized_loras(tiny_family, base_image):
    pipe = load_tiny_pipe(tiny_family)
    library = LoraLibrary(SHIPPED, "tiny", hotswap_rank=4, hotswap_slots=1)
    with pytest.raises(LoraRejectedError, match="text-encoder weights.*only swap UNet"):
        library.activate(pipe, [LoraChoice("tiny-neon", 1.0)])
    with pytest.raises(LoraRejectedError, match="rank 8 is above the hotswap rank 4"):
        library.activate(pipe, [LoraChoice("tiny-faded", 1.0)])
    with pytest.raises(InvalidRequestError, match="at most 1"):
        library.activate(pipe, [LoraChoice("tiny-ink", 1.0), LoraChoice("tiny-watercolor", 1)])
    assert np.array_equal(render(pipe), base_image)


# --------------------------------------------------------------------------------------
# The shipped files are exactly what the documented script makes


def test_make_tiny_loras_reproduces_the_shipped_files(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location(
        "make_tiny_loras", REPO / "scripts/make_tiny_loras.py"
    )
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look themselves up
    spec.loader.exec_module(module)
    written = module.write_tiny_loras(tmp_path)
    assert sorted(p.stem for p in written) == [
        name for name in TINY_NAMES if name not in TRAINED_TINY_NAMES
    ]
    for path in written:
        # Compared by content: safetensors may order the metadata keys differently per run.
        made, shipped = load_file(path), load_file(SHIPPED / path.name)
        assert made.keys() == shipped.keys(), path.name
        assert all(torch.equal(made[k], shipped[k]) for k in made), path.name
        assert header_metadata(path) == header_metadata(SHIPPED / path.name), path.name


def header_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


def test_signature_sees_through_loaded_adapters(library, pipe):
    before = ModelSignature.from_pipeline(pipe)
    library.activate(pipe, [LoraChoice("tiny-neon", 1.0)])
    assert ModelSignature.from_pipeline(pipe).layers == before.layers


def test_hotswap_keeps_one_compiled_graph(tiny_family, base_image):
    # The point of hotswap mode: compiled code is traced once, then adapters, weights and
    # the empty set only change tensor contents. One attention block is compiled (with the
    # "eager" backend, which traces without generating code) to keep this quick; the
    # guards are the ones a whole compiled UNet has.
    from torch._dynamo.utils import counters

    pipe = load_tiny_pipe(tiny_family)
    library = LoraLibrary(SHIPPED, "tiny", hotswap_rank=8, hotswap_slots=2)
    library.bind(pipe)

    unet = pipe.unet
    pipe.unet = torch.compile(unet, backend="eager")  # as the engine wraps it
    library.activate(pipe, [LoraChoice("tiny-ink", 1.0)])  # same model: no re-binding
    assert library.loaded() == ["tiny-ink"]
    pipe.unet = unet

    torch._dynamo.reset()
    counters.clear()
    pipe.unet.down_blocks[1].attentions[0].compile(backend="eager")
    ink = render(pipe)
    with_loras(library, pipe, ("tiny-faded", 0.7), ("tiny-watercolor", 0.5))
    assert np.array_equal(with_loras(library, pipe), base_image)
    assert np.array_equal(with_loras(library, pipe, ("tiny-ink", 1.0)), ink)
    assert counters["stats"]["unique_graphs"] == 1
