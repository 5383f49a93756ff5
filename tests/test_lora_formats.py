"""Every LoRA format applied exactly, judged against LyCORIS's own merge of the same file.

The corpus is written here by the LyCORIS library (test-only dependency) on the tiny model:
plain LoRA with per-module alphas, LoCon, LoCon with Tucker, LoHa, LoKr, full differences
and DoRA, in float16 and bfloat16, UNet-only and text-encoder-only. Each goes through the
real check and the real adapter store onto one shared pipeline, and its image must be
within 1/255 of LyCORIS's merge at weights 1.0 and 0.5.
"""

from __future__ import annotations

import copy
import logging
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lycoris")

from conftest import load_tiny_pipe  # noqa: E402
from lycoris_corpus import lycoris_merge, write_lycoris_file  # noqa: E402

from pipelines.adapters import HotswapSlots, NamedAdapters  # noqa: E402
from pipelines.errors import LoraRejectedError  # noqa: E402
from pipelines.lora_catalogue import LoraEntry  # noqa: E402
from pipelines.lora_files import (  # noqa: E402
    LoraFileReport,
    ModelSignature,
    validate_lora,
    verify_loaded_scales,
)
from pipelines.lora_sources import PreparedLora  # noqa: E402
from pipelines.lycoris_formats import group_by_module, module_names  # noqa: E402

ONE_LEVEL = 1.0  # 1/255, in 0..255 pixel units
SHIPPED = Path(__file__).resolve().parents[1] / "loras"

# (id, LyCORIS algo, its options, components, dtype). LoHa and LoKr use alpha == rank:
# LyCORIS 4.1.3's merge applies their alpha / rank twice (get_weight and get_diff_weight
# both scale), where kohya, A1111 and ComfyUI apply it once; at alpha == rank both agree.
CORPUS = [
    ("lora-alphas-fp16", "lora", {"vary_alphas": True}, ("unet", "text_encoder"), "float16"),
    ("lora-alphas-te-bf16", "lora", {"vary_alphas": True}, ("text_encoder",), "bfloat16"),
    ("locon-bf16", "locon", {"conv_dim": 4, "conv_alpha": 2}, ("unet",), "bfloat16"),
    ("locon-tucker-fp16", "locon", {"use_tucker": True, "conv_dim": 4}, ("unet",), "float16"),
    ("loha-fp16", "loha", {"std": 0.4, "linear_alpha": 4}, ("unet", "text_encoder"), "float16"),
    ("loha-te-bf16", "loha", {"std": 0.4, "linear_alpha": 4}, ("text_encoder",), "bfloat16"),
    ("lokr-bf16", "lokr", {"linear_alpha": 4}, ("unet",), "bfloat16"),
    ("full-fp16", "full", {"std": 0.02}, ("unet", "text_encoder"), "float16"),
    ("dora-fp16", "lora", {"dora_wd": True}, ("unet",), "float16"),
]
# LyCORIS merges DoRA at weight w as W + dW then w * (its decomposition - that): at weight 0
# it keeps the whole low-rank change. Stencil scales the whole change, so that weight 0 is
# the base model, bit for bit; the two agree at weight 1 only.
WEIGHTS = {"dora-fp16": (1.0,)}


@pytest.fixture(scope="module")
def pipe(tiny_family):
    logging.getLogger("lycoris").setLevel(logging.ERROR)
    return load_tiny_pipe(tiny_family)


@pytest.fixture(scope="module")
def signature(pipe):
    return ModelSignature.from_pipeline(pipe)


@pytest.fixture(scope="module")
def corpus(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lycoris")
    files = {}
    for index, (case, algo, options, components, dtype) in enumerate(CORPUS):
        options = {"linear_dim": 4, "linear_alpha": 2, **options}
        files[case] = write_lycoris_file(
            pipe,
            folder / f"{case}.safetensors",
            algo=algo,
            components=components,
            dtype=getattr(torch, dtype),
            seed=index,
            **options,
        )
    return files


def render(pipe, seed: int = 9) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = pipe(
            "a red fox",
            num_inference_steps=3,
            height=64,
            width=64,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        )
    return result.images[0].astype(np.float64) * 255


def prepared(path, signature, name=None) -> PreparedLora:
    name = name or path.stem
    report = validate_lora(path, signature, name=name)
    return PreparedLora(LoraEntry(name=name, display_name=name, base="tiny"), path, report)


@pytest.fixture(scope="module")
def shared(pipe, signature):
    """One copy of the model with one adapter store, shared by every test like the app
    shares it; the untouched `pipe` stays the base for LyCORIS's merges."""
    model = copy.deepcopy(pipe)
    store = NamedAdapters(max_loaded=4)
    store.bind(model, signature)
    return model, store


@pytest.mark.parametrize("case", [c[0] for c in CORPUS])
def test_each_format_matches_lycoris_merge(case, corpus, pipe, signature, shared):
    model, store = shared
    item = prepared(corpus[case], signature)
    assert item.report.describe()["exact"] is True
    base = render(pipe)
    for weight in WEIGHTS.get(case, (1.0, 0.5)):
        truth = render(lycoris_merge(pipe, corpus[case], weight))
        store.activate(model, [(item, weight)])
        ours = render(model)
        assert np.abs(truth - base).max() > 2  # the file does change the image
        assert np.abs(ours - truth).max() <= ONE_LEVEL, (case, weight)
    store.activate(model, [(item, 0.0)])
    assert np.array_equal(render(model), base)  # weight 0: the base, bit for bit
    store.activate(model, [])
    assert np.array_equal(render(model), base)


def test_loha_with_alpha_below_rank_applies_it_once(pipe, signature, shared, tmp_path):
    """kohya, A1111 and ComfyUI scale a LoHa by alpha / rank once; LyCORIS 4.1.3's merge
    scales it twice. The truth for alpha 2 at rank 4 (scale 1/2) is then LyCORIS's merge of
    the same factors with alpha sqrt(2 * 4), whose twice-applied scale is (sqrt 8 / 4)^2."""
    from safetensors.torch import load_file, save_file

    path = write_lycoris_file(
        pipe, tmp_path / "loha-a2.safetensors", algo="loha", std=0.4, linear_dim=4, linear_alpha=2
    )
    tensors = load_file(str(path))
    assert {float(v) for k, v in tensors.items() if k.endswith(".alpha")} == {2.0}
    squared = {
        k: torch.full_like(v, 8**0.5) if k.endswith(".alpha") else v for k, v in tensors.items()
    }
    truth_file = tmp_path / "loha-truth.safetensors"
    save_file(squared, str(truth_file))
    model, store = shared
    store.activate(model, [(prepared(path, signature), 1.0)])
    ours = render(model)
    store.activate(model, [])
    truth = render(lycoris_merge(pipe, truth_file, 1.0))
    assert np.abs(truth - render(pipe)).max() > 2
    assert np.abs(ours - truth).max() <= ONE_LEVEL


def test_per_module_alphas_loaded_plainly_are_caught_not_applied(corpus, pipe, signature):
    """The old path (the file straight into diffusers) puts most attention and
    text-encoder alphas nowhere; the post-load check sees it and refuses."""
    path = corpus["lora-alphas-fp16"]
    model = copy.deepcopy(pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.load_lora_weights(str(path), adapter_name="plain")
    from safetensors.torch import load_file

    names = module_names(signature.layers)
    asked: dict[str, dict[str, float]] = {}
    for prefix, params in group_by_module(load_file(str(path))).items():
        component, module = names[prefix]
        rank = params["lora_down.weight"].shape[0]
        asked.setdefault(component, {})[module] = float(params["alpha"]) / rank
    report = LoraFileReport("0" * 64, 0, "kohya", (4,), (), ("unet",), module_scales=asked)
    with pytest.raises(LoraRejectedError, match="applied at the wrong strength"):
        verify_loaded_scales(model, "plain", report, name="alphas")


def test_two_formats_at_once_switched_away_and_back_are_exact_each_time(
    corpus, pipe, signature, shared
):
    model, store = shared
    loha, lokr = prepared(corpus["loha-fp16"], signature), prepared(corpus["lokr-bf16"], signature)
    full = prepared(corpus["full-fp16"], signature)
    pair = [(loha, 1.0), (lokr, 0.5)]
    store.activate(model, pair)
    first = render(model)
    store.activate(model, [(full, 1.0)])
    other = render(model)
    store.activate(model, list(reversed(pair)))
    assert np.array_equal(render(model), first)
    store.activate(model, [(full, 1.0)])
    assert np.array_equal(render(model), other)
    # Both together equal LyCORIS merging both (one after the other) within a level.
    both = lycoris_merge(lycoris_merge(pipe, corpus["loha-fp16"], 1.0), corpus["lokr-bf16"], 0.5)
    assert np.abs(first - render(both)).max() <= ONE_LEVEL


def test_concurrent_requests_with_different_formats_equal_their_solo_runs(
    corpus, signature, shared
):
    """8 requests at once, each its own format, serialised on the model like the engine
    does (one lock around activate + generate): each equals its own solo run bytewise."""
    import threading

    model, store = shared
    cases = [c[0] for c in CORPUS][:8]
    items = {case: prepared(corpus[case], signature) for case in cases}
    solo = {}
    for case in cases:
        store.activate(model, [(items[case], 0.8)])
        solo[case] = render(model, seed=3)
    lock = threading.Lock()

    def request(case):
        with lock:
            store.activate(model, [(items[case], 0.8)])
            return case, render(model, seed=3)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(request, cases + cases[::-1]))
    for case, image in results:
        assert np.array_equal(image, solo[case]), case


def test_a_file_naming_a_few_extra_layers_is_applied_without_them(
    corpus, pipe, signature, shared, tmp_path
):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(corpus["locon-bf16"]))
    extra = "lora_unet_down_blocks_7_attentions_0_proj_in"
    tensors[f"{extra}.lora_down.weight"] = torch.zeros(4, 8, dtype=torch.bfloat16)
    tensors[f"{extra}.lora_up.weight"] = torch.zeros(8, 4, dtype=torch.bfloat16)
    tensors[f"{extra}.alpha"] = torch.tensor(2.0, dtype=torch.bfloat16)
    path = tmp_path / "partial.safetensors"
    save_file(tensors, str(path))
    item = prepared(path, signature)
    assert item.report.skipped_layers == (extra,)
    assert item.report.describe()["skipped_layers"] == [extra]
    assert item.entry.to_recipe(1.0, item.report)["skipped_layers"] == [extra]
    model, store = shared
    store.activate(model, [(item, 1.0)])
    truth = render(lycoris_merge(pipe, corpus["locon-bf16"], 1.0))
    assert np.abs(render(model) - truth).max() <= ONE_LEVEL


@pytest.mark.parametrize(
    ("shipped", "extra"),
    [
        # diffusers metadata with alpha 2 at rank 8: the scale must survive the skipping
        ("tiny-faded", "unet.down_blocks.7.attentions.0.proj_in"),
        ("tiny-neon", "text_encoder.encoder.layers.9.self_attn.q_proj"),
    ],
)
def test_a_peft_file_naming_a_few_extra_layers_is_applied_without_them(
    shipped, extra, signature, shared, tmp_path
):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    source = SHIPPED / f"{shipped}.safetensors"
    tensors = load_file(str(source))
    with safe_open(str(source), "pt") as handle:
        metadata = handle.metadata()
    tensors[f"{extra}.lora_A.weight"] = torch.full((8, 32), 0.5)
    tensors[f"{extra}.lora_B.weight"] = torch.full((32, 8), 0.5)
    path = tmp_path / f"{shipped}-partial.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    item = prepared(path, signature)
    assert item.report.skipped_layers == (extra,)
    assert "1 layers this model lacks are skipped" in item.report.describe()["verdict"]
    model, store = shared
    store.activate(model, [(prepared(source, signature), 0.7)])
    whole = render(model)
    store.activate(model, [(item, 0.7)])
    assert np.abs(render(model) - whole).max() <= ONE_LEVEL  # same strength, layer by layer
    store.activate(model, [])


def test_a_file_mostly_for_other_layers_is_refused_and_a_misfit_names_the_base(
    corpus, signature, tmp_path
):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(corpus["locon-bf16"]))
    moved = {key.replace("lora_unet_", "lora_unet_x", 1): v for key, v in tensors.items()}
    keep = next(iter(tensors)).partition(".")[0]
    moved.update({k: v.clone() for k, v in tensors.items() if k.startswith(f"{keep}.")})
    path = tmp_path / "mostly-other.safetensors"
    save_file(moved, str(path))
    with pytest.raises(LoraRejectedError, match="different base model: only 1 of its"):
        validate_lora(path, signature, name="other")
    wide = {
        k: torch.cat([v, v], dim=-1) if k.endswith("lora_down.weight") and v.ndim == 2 else v
        for k, v in tensors.items()
    }
    save_file(wide, str(tmp_path / "wide.safetensors"))
    with pytest.raises(LoraRejectedError, match="different base model"):
        validate_lora(tmp_path / "wide.safetensors", signature, name="wide")


def test_hotswap_applies_a_converted_unet_file_exactly_or_refuses_it(
    corpus, pipe, signature, tmp_path
):
    from lycoris_corpus import UNET_TARGETS

    attention = [name for name in UNET_TARGETS if ".attentions." in name]
    path = write_lycoris_file(
        pipe,
        tmp_path / "attn-alphas.safetensors",
        algo="lora",
        vary_alphas=True,
        targets=attention,
        linear_dim=4,
        linear_alpha=2,
        seed=7,
    )
    model = copy.deepcopy(pipe)
    store = HotswapSlots(rank=16, slots=2)
    store.bind(model, signature)
    item = prepared(path, signature)
    assert item.report.converted_from == "kohya-per-module-alpha"
    base = render(pipe)
    for weight in (1.0, 0.5):
        store.activate(model, [(item, weight)])
        truth = render(lycoris_merge(pipe, path, weight))
        assert np.abs(render(model) - truth).max() <= ONE_LEVEL
    store.activate(model, [])
    assert np.array_equal(render(model), base)
    tucker = prepared(corpus["locon-tucker-fp16"], signature)
    with pytest.raises(LoraRejectedError, match="outside the attention blocks"):
        store.activate(model, [(tucker, 1.0)])


def test_every_library_entry_lists_its_verdict_before_anyone_uses_it(corpus, pipe, tmp_path):
    import json
    import shutil

    from pipelines.loras import LoraLibrary

    shutil.copy(corpus["loha-fp16"], tmp_path / "loha.safetensors")
    entry = {"name": "loha", "file": "loha.safetensors", "base": "tiny"}
    (tmp_path / "catalog.json").write_text(json.dumps({"version": 1, "loras": [entry]}))
    library = LoraLibrary(tmp_path, "tiny")
    library.bind(copy.deepcopy(pipe))
    (listed,) = [e.to_public_dict() for e in library.entries()]
    assert listed["format"] == "LyCORIS LoHa"
    assert listed["exact"] is True and listed["skipped_layers"] == []
    assert listed["verdict"].startswith("LyCORIS LoHa, rank 16")
    assert "converted to a standard LoRA" in listed["verdict"]


def test_lycoris_layouts_that_are_not_converted_are_refused_by_name(signature):
    from safetensors.torch import save

    layer = "lora_unet_down_blocks_1_resnets_0_conv1"
    tucker_loha = {
        f"{layer}.hada_w1_a": torch.ones(4, 64),
        f"{layer}.hada_w1_b": torch.ones(4, 32),
        f"{layer}.hada_w2_a": torch.ones(4, 64),
        f"{layer}.hada_w2_b": torch.ones(4, 32),
        f"{layer}.hada_t1": torch.ones(4, 4, 3, 3),
        f"{layer}.hada_t2": torch.ones(4, 4, 3, 3),
    }
    with pytest.raises(LoraRejectedError, match="LoHa weights Stencil does not convert"):
        validate_lora(save(tucker_loha), signature, name="tucker-loha")
