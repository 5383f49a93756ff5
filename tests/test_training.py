"""The tiny family's training data, its measures, and the training's determinism.

The adherence tests are only as good as the reader of pictures they use: here it reads the
pictures the model was trained on, whose answers are known, and must get them right.
"""

from __future__ import annotations

import numpy as np
import torch

from tiny_training import measure, scenes, train


def _scenes(count, seed=0, figure=None):
    return scenes.random_scenes(count, seed, figure=figure)


def test_the_reader_names_the_colours_and_shape_of_drawn_scenes():
    made = _scenes(200, seed=1)
    right = sum(
        (reading.colour, reading.background, reading.shape) == (s.colour, s.background, s.shape)
        for s in made
        for reading in [measure.read_picture(scenes.render(s))]
    )
    assert right / len(made) >= 0.97


def test_the_reader_names_inverted_colours_by_the_colour_they_invert():
    palette = measure.inverted_palette()
    for scene in _scenes(40, seed=2, figure=False):
        reading = measure.read_picture(scenes.render(scenes.with_style(scene, "inverted")), palette)
        assert (reading.colour, reading.background) == (scene.colour, scene.background)


def test_maps_follow_the_scene():
    for scene in _scenes(20, seed=3):
        mask = scenes.shape_mask(scene)
        # The canny map is the picture's own outline: a perfect score against itself (where
        # the two colours differ enough in grey for canny's default thresholds to see)...
        edges = scenes.canny_map(scene)
        if np.asarray(edges).any():
            assert measure.edge_f1(scenes.render(scene), edges) == 1.0
        # ...and the depth map is nearest (brightest) on the shape.
        depth = np.asarray(scenes.depth_map(scene))[:, :, 0]
        assert depth[mask].mean() > depth[~mask].max()
    for scene in _scenes(10, seed=4, figure=True):
        skeleton = np.asarray(scenes.pose_map(scene)).max(axis=2) > 0
        assert skeleton.any()
        # controlnet-aux draws the skeleton over the figure it belongs to.
        assert measure.centroid_distance(skeleton, scenes.shape_mask(scene)) < 6


def test_the_outline_measure_sees_the_outlined_style_only():
    for scene in _scenes(20, seed=5, figure=False):
        plain = measure.outline_strength(scenes.render(scene), scene)
        outlined = measure.outline_strength(
            scenes.render(scenes.with_style(scene, "outlined")), scene
        )
        assert plain < 0.1 < 0.9 < outlined


def test_training_is_deterministic_from_its_seed():
    plan = train.Plan(vae_steps=2, vae_batch=4, scenes=16)
    torch.manual_seed(0)
    first = train.train_vae(plan, seed=9, log=lambda message: None).state_dict()
    torch.manual_seed(1)  # the stage seeds itself: the global state does not matter
    second = train.train_vae(plan, seed=9, log=lambda message: None).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_the_tiny_xl_stage_is_deterministic_from_its_seed():
    """Two steps from the committed SD run, twice: every trained tensor the same bits."""
    from diffusers import AutoencoderKL

    from pipelines.tiny import TRAINED_TINY_DIR
    from pipelines.tiny_xl import TINY_XL_SIZE
    from tiny_training import train_xl

    plan = train_xl.XLPlan(steps=2, scenes=8, batch=4)

    def trained(global_seed: int) -> dict:
        torch.manual_seed(global_seed)  # the stage seeds itself: the global state does not matter
        vae = AutoencoderKL.from_pretrained(TRAINED_TINY_DIR / "vae").eval()
        vae = train_xl.rescaled_vae(vae, TINY_XL_SIZE.sd.vae_scaling_factor)
        parts = train_xl.train_xl(plan, 9, vae, TRAINED_TINY_DIR, log=lambda message: None)
        modules = {"unet": parts["pipe"].unet, "union": parts["union"], **parts["controlnets"]}
        return {
            f"{name}.{key}": value
            for name, module in modules.items()
            for key, value in module.state_dict().items()
        }

    first, second = trained(0), trained(1)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
