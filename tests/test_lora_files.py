"""LoRA file checks: every refused file is refused with its reason, before any load.

Stage 1 (the bytes) needs no model. Stage 2 (the keys) runs against the tiny family's
`ModelSignature`, built once per session from the model folder on disk.
"""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file

from pipelines.errors import LoraRejectedError
from pipelines.lora_files import (
    ModelSignature,
    check_lora_keys,
    read_lora_file,
    read_safetensors,
    validate_lora,
)

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "loras"
ATTN2_TO_K = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"


@pytest.fixture(scope="module")
def signature(tiny_family) -> ModelSignature:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_family)
    return ModelSignature.from_pipeline(pipe)


def rejected(match: str):
    return pytest.raises(LoraRejectedError, match=match)


def pair(rank: int, fan_in: int, fan_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ones(rank, fan_in), torch.ones(fan_out, rank)


def peft_file(layers: dict[str, tuple[int, int]], rank: int = 4, metadata=None) -> bytes:
    tensors = {}
    for module, (fan_in, fan_out) in layers.items():
        a, b = pair(rank, fan_in, fan_out)
        tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"] = a, b
    return save(tensors, metadata=metadata)


# --------------------------------------------------------------------------------------
# Stage 1: the bytes


def test_shipped_files_pass_the_byte_checks():
    for path in sorted(SHIPPED.glob("*.safetensors")):
        checked = read_lora_file(path, name=path.stem)
        assert checked.tensors and len(checked.sha256) == 64


def test_a_torch_save_checkpoint_renamed_safetensors_is_refused(tmp_path):
    path = tmp_path / "sneaky.safetensors"
    torch.save({"lora_A": torch.ones(2, 2)}, path)
    with rejected("zip archive .*torch.save.* not a safetensors file"):
        read_lora_file(path, name="sneaky")


def test_a_raw_pickle_is_refused_without_unpickling():
    class Boom:
        def __reduce__(self):  # would run on unpickling
            return (pytest.fail, ("the pickle was executed",))

    with rejected("Python pickle.*never loaded"):
        read_safetensors(pickle.dumps(Boom(), protocol=4), name="boom")


def test_a_truncated_file_is_refused():
    data = (SHIPPED / "tiny-ink.safetensors").read_bytes()
    with rejected("truncated: tensor .* ends at byte"):
        read_safetensors(data[:-100], name="cut")
    with rejected("truncated: the header needs"):
        read_safetensors(data[:200], name="cut")
    with rejected("truncated"):
        read_safetensors(data[:5], name="cut")


def test_an_oversized_header_is_refused_before_it_is_read():
    claim = 60 * 1024 * 1024
    with rejected("header claims .* above the 50 MB limit"):
        read_safetensors(struct.pack("<Q", claim) + b"{}", name="huge")


def test_a_header_that_is_not_json_is_refused():
    body = b"not json at all"
    with rejected("header is not valid JSON"):
        read_safetensors(struct.pack("<Q", len(body)) + body, name="garbled")


def raw_file(header: dict, data: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def test_offsets_must_match_shape_and_dtype():
    header = {"x.lora_A.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}
    with rejected(r"needs 16 bytes but its data_offsets span 8"):
        read_safetensors(raw_file(header, b"\0" * 8), name="short")


def test_offsets_must_stay_inside_the_file_and_not_overlap():
    header = {
        "a.lora_A.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "a.lora_B.weight": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    with rejected("overlaps another"):
        read_safetensors(raw_file(header, b"\0" * 12), name="overlap")
    outside = {"a.lora_A.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    with rejected("truncated"):
        read_safetensors(raw_file(outside, b"\0" * 8), name="outside")


def test_unknown_dtypes_and_malformed_entries_are_refused():
    for entry, reason in [
        ({"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}, "unknown dtype"),
        ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, "malformed shape"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [4]}, "malformed data_offsets"),
    ]:
        with rejected(reason):
            read_safetensors(raw_file({"x.lora_A.weight": entry}, b"\0" * 16), name="odd")


def test_the_size_cap_is_checked_before_reading(tmp_path):
    path = tmp_path / "big.safetensors"
    path.write_bytes(b"\0" * 4096)
    with rejected("above the 0 MB limit"):
        read_lora_file(path, name="big", max_bytes=1024)


def test_the_file_name_does_not_matter_only_the_bytes(tmp_path):
    path = tmp_path / "looks-like-a.ckpt"
    path.write_bytes((SHIPPED / "tiny-ink.safetensors").read_bytes())
    assert read_lora_file(path, name="renamed").tensors


# --------------------------------------------------------------------------------------
# Stage 2: the keys against the tiny model


def test_shipped_files_report_layout_rank_alpha_and_targets(signature):
    reports = {
        path.stem: validate_lora(path, signature, name=path.stem)
        for path in SHIPPED.glob("tiny-*.safetensors")
        if not path.stem.startswith("tiny-xl-")  # the tiny SDXL family's (tests/test_sdxl.py)
    }
    assert reports["tiny-ink"].ranks == (4,) and reports["tiny-ink"].targets == ("unet",)
    assert reports["tiny-watercolor"].ranks == (2,)
    assert reports["tiny-neon"].targets == ("unet", "text_encoder")
    sketch = reports["tiny-sketch-kohya"]
    assert (sketch.layout, sketch.ranks, sketch.alphas) == ("kohya", (16,), (8.0,))
    faded = reports["tiny-faded"]
    assert (faded.ranks, faded.alphas, faded.has_adapter_metadata) == ((8,), (2.0,), True)


def test_an_sdxl_shaped_lora_is_refused_as_another_base(signature):
    # SDXL's cross-attention reads 2048-wide text features; this model's reads 32.
    data = peft_file({f"unet.{ATTN2_TO_K}": (2048, 64)})
    with rejected("different base model: it looks like an SDXL LoRA, cross-attention width 2048"):
        validate_lora(data, signature, name="xl")


def test_an_sd15_shaped_lora_names_its_base(signature):
    data = peft_file({f"unet.{ATTN2_TO_K}": (768, 64)})
    with rejected("different base model: it looks like an SD 1.x LoRA"):
        validate_lora(data, signature, name="sd15")


def test_kohya_sdxl_files_are_refused_as_another_base(signature):
    tensors = {
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(
            4, 1280
        ),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(1280, 4),
    }
    with rejected("different base model: .*second text encoder"):
        validate_lora(save(tensors), signature, name="xl-kohya")
    sgm = {
        "lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.ones(4, 640),
        "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.ones(640, 4),
    }
    with rejected("different base model"):
        validate_lora(save(sgm), signature, name="sgm")


def test_a_lora_matching_no_layer_is_refused(signature):
    data = peft_file({"unet.not_a_block.0.to_q": (32, 32)})
    with rejected("matches no layer of this model .*would change nothing"):
        validate_lora(data, signature, name="nowhere")


def test_a_lora_partly_outside_the_model_is_refused(signature):
    data = peft_file({f"unet.{ATTN2_TO_K}": (32, 64), "unet.down_blocks.7.attentions.0.x": (4, 4)})
    with rejected("different base model: only 1 of its 2 layers exist in this model"):
        validate_lora(data, signature, name="half")


def test_keys_for_no_known_component_are_refused(signature):
    data = peft_file({"vae.decoder.conv_in": (4, 4)})
    with rejected("not addressed to a part of this model"):
        validate_lora(data, signature, name="vae")


def test_a_full_checkpoint_is_not_a_lora(signature):
    data = save({"down_blocks.0.resnets.0.conv1.weight": torch.ones(2, 2)})
    with rejected("it is not a LoRA"):
        validate_lora(data, signature, name="ckpt")


def test_dora_and_lycoris_files_are_refused(signature):
    dora = {
        f"unet.{ATTN2_TO_K}.lora_A.weight": torch.ones(4, 32),
        f"unet.{ATTN2_TO_K}.lora_B.weight": torch.ones(64, 4),
        f"unet.{ATTN2_TO_K}.lora_magnitude_vector": torch.ones(64),
    }
    with rejected("DoRA"):
        validate_lora(save(dora), signature, name="dora")
    loha = {"lora_unet_x.hada_w1_a": torch.ones(2, 2)}
    with rejected("LoHa"):
        validate_lora(save(loha), signature, name="loha")


def test_a_lone_half_of_a_pair_is_refused(signature):
    data = save({f"unet.{ATTN2_TO_K}.lora_A.weight": torch.ones(4, 32)})
    with rejected("has no lora_B weight"):
        validate_lora(data, signature, name="half-pair")


def test_kohya_text_keys_diffusers_would_drop_are_refused(signature):
    # With mlp weights but no out_proj, diffusers' conversion leaves q_proj's keys unrenamed
    # and the text encoder loads without them (a warning only). Refuse instead.
    tensors = {}
    for module, width in (("self_attn_q_proj", 32), ("mlp_fc1", 64)):
        key = f"lora_te_text_model_encoder_layers_0_{module}"
        tensors[f"{key}.lora_down.weight"] = torch.ones(4, 32)
        tensors[f"{key}.lora_up.weight"] = torch.ones(width, 4)
    with rejected("diffusers would not load some of its weights"):
        validate_lora(save(tensors), signature, name="partial-te")


def test_metadata_must_describe_the_weights(signature):
    layers = {f"unet.{ATTN2_TO_K}": (32, 64)}
    bad_rank = {"lora_adapter_metadata": json.dumps({"unet.r": 8, "unet.lora_alpha": 4})}
    with rejected("metadata says rank 8 but layer .* has rank 4"):
        validate_lora(peft_file(layers, metadata=bad_rank), signature, name="r")
    narrow = {
        "lora_adapter_metadata": json.dumps(
            {"unet.r": 4, "unet.lora_alpha": 2, "unet.target_modules": ["to_q"]}
        )
    }
    with rejected("target_modules leave out layers"):
        validate_lora(peft_file(layers, metadata=narrow), signature, name="t")
    garbage = {"lora_adapter_metadata": "{not json"}
    with rejected("adapter metadata is not valid JSON"):
        validate_lora(peft_file(layers, metadata=garbage), signature, name="j")
    unknown = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.flavour": "x"})}
    with rejected("not a valid LoRA config"):
        validate_lora(peft_file(layers, metadata=unknown), signature, name="u")


def test_check_lora_keys_reports_alpha_from_metadata(signature, tmp_path):
    a, b = pair(4, 32, 64)
    tensors = {f"unet.{ATTN2_TO_K}.lora_A.weight": a, f"unet.{ATTN2_TO_K}.lora_B.weight": b}
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 1})}
    path = tmp_path / "scaled.bin"  # any name: the bytes decide
    save_file(tensors, str(path), metadata=meta)
    report = check_lora_keys(read_lora_file(path, name="scaled"), signature, name="scaled")
    assert report.alphas == (1.0,) and report.ranks == (4,)


def test_keys_diffusers_cannot_convert_are_refused_not_crashed(signature):
    data = save({"text_encoder.encoder.layers.0.self_attn.q_proj.lora_X.weight": torch.ones(2, 2)})
    with rejected("diffusers cannot convert its text_encoder keys"):
        validate_lora(data, signature, name="odd-te")
