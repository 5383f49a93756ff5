"""Sampler registry: display name -> how to build a fresh scheduler from the model's config.

A new scheduler object per request matters: schedulers keep a step index and model-output
history, so sharing one between two requests in flight corrupts both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import UnknownNameError


@dataclass(frozen=True)
class SchedulerSpec:
    name: str
    class_name: str
    overrides: dict[str, Any] = field(default_factory=dict)

    def build(self, base_config: Any):
        import diffusers

        cls = getattr(diffusers, self.class_name)
        return cls.from_config(base_config, **self.overrides)


SCHEDULERS: dict[str, SchedulerSpec] = {
    spec.name: spec
    for spec in (
        SchedulerSpec("Euler a", "EulerAncestralDiscreteScheduler"),
        SchedulerSpec("Euler", "EulerDiscreteScheduler"),
        SchedulerSpec("DPM++ 2M", "DPMSolverMultistepScheduler"),
        SchedulerSpec(
            "DPM++ 2M Karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}
        ),
        SchedulerSpec("UniPC", "UniPCMultistepScheduler"),
        # SD 1.5 was trained without sample clipping; DDIM would otherwise default to it.
        SchedulerSpec("DDIM", "DDIMScheduler", {"clip_sample": False}),
        # For the few-step distillation LoRAs of the catalogue (LCM-LoRA, TCD-LoRA, Hyper-SD):
        # 4 to 8 steps at a guidance scale of about 1.
        SchedulerSpec("LCM", "LCMScheduler"),
        SchedulerSpec("TCD", "TCDScheduler"),
    )
}
DEFAULT_SCHEDULER = "Euler a"


def get_scheduler_spec(name: str) -> SchedulerSpec:
    try:
        return SCHEDULERS[name]
    except (KeyError, TypeError):
        raise UnknownNameError("scheduler", name, list(SCHEDULERS)) from None
