"""Live preview: images of a run in progress, every few steps, that do not change the run."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ROOT, pixels


@pytest.fixture(scope="module")
def previewing_engine(cache_root):
    from pipelines.engine import Engine
    from pipelines.families import FAMILIES

    return Engine(
        FAMILIES["tiny"], cache_root=cache_root, lora_folder=ROOT / "loras", live_preview_every=2
    )


def _request(**overrides):
    from pipelines.requests import GenerationRequest

    values = dict(prompt="a red circle on a blue background", seed=11, steps=6)
    values.update(overrides)
    return GenerationRequest(**values)


def test_previews_arrive_every_n_steps_and_approach_the_result(previewing_engine):
    shown = []
    result = previewing_engine.generate(
        _request(), preview=lambda images, step, steps: shown.append((step, steps, images))
    )
    # Every 2 steps but the last, whose image is the result itself.
    assert [(step, steps) for step, steps, _ in shown] == [(2, 6), (4, 6)]
    final = pixels(result.images[0])
    for _, _, images in shown:
        assert len(images) == 1 and images[0].size == result.images[0].size
    far, near = (np.abs(pixels(images[0]) - final).mean() for _, _, images in shown)
    # A user watching sees the picture settle: step 4 is nearer the result than step 2.
    assert near < far, (far, near)


def test_previews_do_not_change_the_images(previewing_engine):
    request = _request(num_images=2, loras=(), seed=5)
    watched = previewing_engine.generate(request, preview=lambda *_: None)
    unwatched = previewing_engine.generate(request)
    for a, b in zip(watched.images, unwatched.images):
        assert a.tobytes() == b.tobytes()


def test_each_sample_of_a_batch_is_previewed(previewing_engine):
    shown = []
    previewing_engine.generate(
        _request(num_images=3, steps=3), preview=lambda images, *_: shown.append(images)
    )
    # One pass per image at batch size 1: each pass shows its own sample at step 2.
    assert [len(images) for images in shown] == [1, 1, 1]
    # Different seeds: three different pictures, not one repeated.
    assert len({images[0].tobytes() for images in shown}) == 3


def test_off_by_default_on_the_cpu(engine):
    assert engine.live_preview_every == 0 and engine.latent_decoder is None
    assert engine.status.live_preview == "off"
    shown = []
    engine.generate(_request(steps=4), preview=lambda *args: shown.append(args))
    assert shown == []


def test_status_says_how_previews_are_made(previewing_engine):
    # The tiny model has no TAESD: its own VAE decodes.
    assert previewing_engine.status.live_preview == "every 2 steps, decoded by the VAE"


def test_a_bad_interval_is_refused(cache_root):
    from pipelines.engine import Engine
    from pipelines.errors import InvalidRequestError
    from pipelines.families import FAMILIES

    with pytest.raises(InvalidRequestError, match="live_preview_every"):
        Engine(FAMILIES["tiny"], cache_root=cache_root, live_preview_every=-3)


def test_in_a_shared_pass_each_request_sees_only_its_own_samples(cache_root):
    """Two users' requests share one forward pass; each sees its own previews, the same
    pictures as when it runs alone."""
    from concurrent.futures import ThreadPoolExecutor

    from pipelines.engine import Engine
    from pipelines.families import FAMILIES
    from pipelines.scheduler import QueueRules

    engine = Engine(
        FAMILIES["tiny"],
        cache_root=cache_root,
        queue_rules=QueueRules(batch_size=4),
        live_preview_every=1,
    )
    mine = _request(prompt="a green square", seed=3, steps=3, session_id="me")
    theirs = _request(prompt="a blue triangle", seed=9, steps=3, num_images=2, session_id="them")

    def watched(request):
        shown = []
        engine.generate(request, preview=lambda images, step, _: shown.append((step, images)))
        return [(step, [image.tobytes() for image in images]) for step, images in shown]

    alone = watched(mine)
    runs_before = engine.scheduler.stats.runs
    with ThreadPoolExecutor(max_workers=2) as pool:
        with engine.scheduler.holding():
            futures = [pool.submit(watched, request) for request in (mine, theirs)]
            while engine.scheduler.waiting_count() < 2:
                pass
        mine_shared, theirs_shared = (future.result() for future in futures)
    assert engine.scheduler.stats.runs == runs_before + 1  # one pass for both
    assert mine_shared == alone
    assert [len(images) for _, images in theirs_shared] == [2, 2]
    assert all(image not in alone[0][1] for image in theirs_shared[0][1])


def test_a_family_with_a_small_preview_decoder_uses_it(cache_root, tmp_path):
    """TAESD's path: the family names a preview decoder (here a seeded AutoencoderTiny
    written to a folder, loaded by the same `from_pretrained` as the Hub's), the engine
    decodes previews with it, and the run's images stay what they are without it."""
    import dataclasses

    import torch
    from diffusers import AutoencoderTiny

    from pipelines.engine import Engine
    from pipelines.families import FAMILIES

    torch.manual_seed(0)
    AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
    ).save_pretrained(tmp_path / "taesd")
    family = dataclasses.replace(FAMILIES["tiny"], preview_decoder=str(tmp_path / "taesd"))
    engine = Engine(family, cache_root=cache_root, live_preview_every=2)
    assert engine.latent_decoder.source == "taesd"
    assert engine.status.live_preview == "every 2 steps, decoded by TAESD"
    shown = []
    request = _request(steps=4)
    result = engine.generate(request, preview=lambda images, *_: shown.append(images))
    assert len(shown) == 1 and shown[0][0].mode == "RGB"
    plain = Engine(FAMILIES["tiny"], cache_root=cache_root)
    assert result.images[0].tobytes() == plain.generate(request).images[0].tobytes()
