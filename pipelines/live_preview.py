"""What a generation looks like while it runs: its latents every few steps, decoded.

A family whose small preview decoder (TAESD: the same latent space, a few percent of the
VAE's work) can be loaded uses it; any other model decodes with its own VAE, which costs
about as much as a final decode per preview. Either way the preview only reads the
latents: the images a run returns are the same bytes with previews on or off
(tests/test_live_preview.py).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

# Steps between two previews when the operator does not say: on a GPU a TAESD decode
# costs well under a step; on the CPU even a small VAE decode costs several (the page
# then shows the step counter only). bench/results/live_preview.md has the numbers.
DEFAULT_EVERY_ON_GPU = 5


def default_every(device: str) -> int:
    return DEFAULT_EVERY_ON_GPU if str(device).startswith("cuda") else 0


class LatentDecoder:
    """Latents (B, C, h, w) -> one RGB PIL image per sample."""

    def __init__(self, vae: Any, *, source: str):
        self.vae = vae
        self.source = source  # "taesd" (a named Hub repo) or "vae": what the status says

    @classmethod
    def for_pipe(cls, pipe: Any, repo: str | None, *, offline: bool) -> LatentDecoder:
        """The family's TAESD when its weights can be read, else the pipeline's own VAE."""
        if repo is not None:
            tiny = _load_tiny_autoencoder(repo, pipe, offline=offline)
            if tiny is not None:
                return cls(tiny, source="taesd")
        return cls(pipe.vae, source="vae")

    @property
    def usable(self) -> bool:
        """An fp16 VAE that the pipeline upcasts for its final decode (SDXL's own) would
        give NaNs here, and upcasting it mid-run would change the run: no preview."""
        vae = self.vae
        return not (
            self.source == "vae"
            and getattr(vae.config, "force_upcast", False)
            and str(vae.dtype) == "torch.float16"
        )

    def decode(self, latents: Any) -> list:
        import torch
        from PIL import Image

        vae = self.vae
        scale = getattr(vae.config, "scaling_factor", 1.0) or 1.0
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        with torch.inference_mode():
            # A copy of the step's latents, in the decoder's dtype: the run's own stay put.
            z = latents.detach().to(device=vae.device, dtype=vae.dtype) / scale + shift
            # One sample at a time: a convolution over a batch may round differently from
            # one over a single sample, and a preview must be the same bytes whoever else
            # shares its pass (measured on one CPU thread: it was not, batched).
            pixels = torch.cat(
                [vae.decode(z[i : i + 1], return_dict=False)[0] for i in range(len(z))]
            )
            pixels = ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return [Image.fromarray(sample.permute(1, 2, 0).cpu().numpy()) for sample in pixels]


def _load_tiny_autoencoder(repo: str, pipe: Any, *, offline: bool):
    from diffusers import AutoencoderTiny

    try:
        tiny = AutoencoderTiny.from_pretrained(
            repo, torch_dtype=pipe.vae.dtype, use_safetensors=True, local_files_only=offline
        )
    except Exception as exc:  # not cached offline, no network, a damaged download ...
        log.info("live preview decodes with the VAE: %s could not be loaded (%s)", repo, exc)
        return None
    return tiny.to(pipe.vae.device)
