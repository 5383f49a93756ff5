"""ControlNet composition on the shared model (per-control ControlNets, or ControlNet Union).

`WindowedMultiControlNet` runs the request's units and skips any unit whose effective
scale is zero at this step. diffusers' ControlNet pipelines still run a unit's full
forward pass outside its guidance window and multiply the result by zero; skipping it
gives the same image for less work (tests prove the equality).
"""

from __future__ import annotations

from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from diffusers.models.controlnets.multicontrolnet_union import MultiControlNetUnionModel


class WindowedMultiControlNet(MultiControlNetModel):
    """A MultiControlNetModel that does no work for units switched off at this step.

    Always used, even for one unit, so the pipeline takes one code path (lists of images,
    scales and windows) whatever the number of units.
    """

    def forward(
        self,
        sample,
        timestep,
        encoder_hidden_states,
        controlnet_cond,
        conditioning_scale,
        class_labels=None,
        timestep_cond=None,
        attention_mask=None,
        added_cond_kwargs=None,
        cross_attention_kwargs=None,
        guess_mode: bool = False,
        return_dict: bool = True,
    ):
        down_total, mid_total = None, None
        for image, scale, controlnet in zip(controlnet_cond, conditioning_scale, self.nets):
            if scale == 0.0 and not guess_mode:
                continue
            down, mid = controlnet(
                sample=sample,
                timestep=timestep,
                encoder_hidden_states=encoder_hidden_states,
                controlnet_cond=image,
                conditioning_scale=scale,
                class_labels=class_labels,
                timestep_cond=timestep_cond,
                attention_mask=attention_mask,
                added_cond_kwargs=added_cond_kwargs,
                cross_attention_kwargs=cross_attention_kwargs,
                guess_mode=guess_mode,
                return_dict=False,
            )
            down_total, mid_total = _add_residuals(down_total, mid_total, down, mid)
        # (None, None) tells the UNet "no control at this step", exactly as if absent.
        return down_total, mid_total


class WindowedMultiControlNetUnion(MultiControlNetUnionModel):
    """The same for ControlNet Union: one entry per unit, each the one shared union model
    run with its unit's mode, scale and window (one set of weights, however many units).

    One pass per unit rather than one pass for all modes: each unit keeps its own strength
    and guidance window, which a single union pass (one scale for all) cannot give.
    """

    def forward(
        self,
        sample,
        timestep,
        encoder_hidden_states,
        controlnet_cond,
        control_type,
        control_type_idx,
        conditioning_scale,
        class_labels=None,
        timestep_cond=None,
        attention_mask=None,
        added_cond_kwargs=None,
        cross_attention_kwargs=None,
        guess_mode: bool = False,
        return_dict: bool = True,
    ):
        down_total, mid_total = None, None
        units = zip(controlnet_cond, control_type, control_type_idx, conditioning_scale, self.nets)
        for image, modes, mode_ids, scale, controlnet in units:
            if scale == 0.0 and not guess_mode:
                continue
            down, mid = controlnet(
                sample=sample,
                timestep=timestep,
                encoder_hidden_states=encoder_hidden_states,
                controlnet_cond=image,
                control_type=modes,
                control_type_idx=mode_ids,
                conditioning_scale=scale,
                class_labels=class_labels,
                timestep_cond=timestep_cond,
                attention_mask=attention_mask,
                added_cond_kwargs=added_cond_kwargs,
                cross_attention_kwargs=cross_attention_kwargs,
                guess_mode=guess_mode,
                return_dict=False,
            )
            down_total, mid_total = _add_residuals(down_total, mid_total, down, mid)
        return down_total, mid_total


def _add_residuals(down_total, mid_total, down, mid):
    """One unit's residuals added to the sum so far (None before the first unit), in
    MultiControlNetModel's order, so the sums are its bytes."""
    if down_total is None:
        return list(down), mid
    return [prev + cur for prev, cur in zip(down_total, down)], mid_total + mid
