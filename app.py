"""Stencil: controlled image generation in the browser.

Composition root: read settings, build the engine, build the page, launch. Run
`python app.py --help` for the options; every option also reads an environment variable
so a Hugging Face Space can be configured without editing code.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pipelines.errors import SettingsError, StencilError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, each defaulting to its environment variable (read via pipelines.settings,
    which also holds every limit). A bad value stops here with a message naming it."""
    from pipelines import settings
    from pipelines.backends import BACKENDS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])

    def add_whole(option: str, setting: settings.WholeSetting, help: str) -> None:
        """A whole-number option: its variable is its default, its range its check."""

        def parse(raw: str) -> int:
            try:
                return setting.parse(raw, option)
            except settings.SettingsError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None

        default = setting.read(os.environ)
        described = f"{help} [env {setting.variable}]"
        parser.add_argument(option, type=parse, default=default, help=described)

    parser.add_argument(
        "--model",
        default=settings.env_text("STENCIL_MODEL", "auto"),
        help="model family (sd15, sdxl, tiny, tiny-xl), a local diffusers folder, a "
        ".safetensors checkpoint file (A1111 / Civitai layout), or 'auto' "
        "(sd15 when cached or reachable, else the built-in tiny model) [env STENCIL_MODEL]",
    )
    parser.add_argument(
        "--model-config",
        default=settings.env_text("STENCIL_MODEL_CONFIG", "") or None,
        help="for a single-file checkpoint as --model: where its configs, tokenizers and "
        "scheduler come from (a family name such as sd15 or tiny, a diffusers folder or a "
        "Hub id; default: the SD 1.5 or SDXL base, by the file) [env STENCIL_MODEL_CONFIG]",
    )
    parser.add_argument(
        "--vae",
        default=settings.env_text("STENCIL_VAE", "") or None,
        help="another VAE (Hub id or folder); with an fp16-safe SDXL VAE such as "
        "madebyollin/sdxl-vae-fp16-fix, SDXL runs in float16 on CUDA [env STENCIL_VAE]",
    )
    parser.add_argument(
        "--controlnet",
        choices=("per-control", "union"),
        default=settings.env_text("STENCIL_CONTROLNET", "per-control"),
        help="per-control: each control type its own ControlNet; union: every unit on the "
        "family's one ControlNet Union model (SDXL) [env STENCIL_CONTROLNET]",
    )
    parser.add_argument(
        "--host",
        default=settings.env_text("GRADIO_SERVER_NAME", "127.0.0.1"),
        help="address to listen on [env GRADIO_SERVER_NAME]",
    )
    add_whole(
        "--port",
        settings.PORT,
        "port to listen on",
    )
    parser.add_argument(
        "--loras",
        default=settings.env_text("STENCIL_LORA_DIR", str(Path(__file__).with_name("loras"))),
        help="folder of the LoRA library [env STENCIL_LORA_DIR]",
    )
    add_whole(
        "--lora-hotswap-rank",
        settings.LORA_HOTSWAP_RANK,
        "swap LoRAs into fixed slots padded to this rank (needed with --compile; 0: off)",
    )
    parser.add_argument(
        "--allow-hub-loras",
        action="store_true",
        default=settings.env_flag(settings.ALLOW_HUB_LORAS),
        help="let users add a LoRA from a public Hub repository (owner/name) to their own "
        "session; off by default, as each is a download made on a user's request "
        "[env STENCIL_ALLOW_HUB_LORAS]",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        default=settings.env_flag("STENCIL_COMPILE"),
        help="torch.compile the UNet (GPU; pair with --lora-hotswap-rank) [env STENCIL_COMPILE]",
    )
    add_whole(
        "--live-preview-every",
        settings.LIVE_PREVIEW_EVERY,
        "steps between two previews of a run in progress (0: none; -1: every 5 on a GPU, "
        "none on the CPU)",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default=settings.env_text("STENCIL_BACKEND", "local"),
        help="local: the model in this process; ray: engines on a Ray Serve cluster (the one "
        "at RAY_ADDRESS, else one started here), routed by LoRA set; needs "
        "requirements-ray.txt [env STENCIL_BACKEND]",
    )
    add_whole(
        "--replicas",
        settings.REPLICAS,
        "with --backend ray: engines to deploy, one GPU each (unless the cluster already "
        "runs the stencil-engine application)",
    )
    add_whole(
        "--queue-size",
        settings.QUEUE_SIZE,
        "requests that may wait in the queue before new ones are turned away",
    )
    add_whole(
        "--queue-per-session",
        settings.QUEUE_PER_SESSION,
        "requests one session may have waiting",
    )
    add_whole(
        "--batch-size",
        settings.BATCH_SIZE,
        "images per forward pass; compatible requests share one, padded to this size so "
        "no image depends on its companions (1: off)",
    )
    add_whole(
        "--max-overtakes",
        settings.MAX_OVERTAKES,
        "how often a request may be passed by one whose LoRAs are already loaded",
    )
    return parser.parse_args(argv)


def zero_gpu_slot():
    """On a ZeroGPU Space, the GPU is lent per call of a `spaces.GPU` function: the engine
    asks for one slot per batch (and per detector map), sized for it. Elsewhere, None.

    `spaces` is imported before torch, as ZeroGPU requires."""
    try:
        import spaces
        from spaces.config import Config
    except ImportError:
        return None
    if not Config.zero_gpu:
        return None
    return lambda run, seconds: spaces.GPU(duration=seconds)(run)


def build_app(args: argparse.Namespace):
    """Engine, service and page, wired together; nothing is launched here."""
    gpu_slot = zero_gpu_slot()
    from pipelines.engine import Engine
    from pipelines.scheduler import QueueRules
    from pipelines.service import StencilService
    from ui import create_demo

    options = {
        "model": args.model,
        "model_config": args.model_config,
        "lora_folder": args.loras,
        "lora_hotswap_rank": args.lora_hotswap_rank or None,
        "allow_hub_loras": args.allow_hub_loras,
        "compile_unet": args.compile,
        "controlnet": args.controlnet,
        "vae": args.vae,
        "live_preview_every": None if args.live_preview_every < 0 else args.live_preview_every,
    }
    rules = QueueRules(
        per_session=args.queue_per_session,
        total=args.queue_size,
        batch_size=args.batch_size,
        max_overtakes=args.max_overtakes,
    )
    if args.backend == "ray":
        from pipelines.ray_backend import start_ray_backend

        # Each replica's engine queues and batches what Ray routes to it, by the same rules.
        backend = start_ray_backend(
            {**options, "queue_rules": rules},
            replicas=args.replicas,
            lora_folder=args.loras,
            allow_hub_loras=args.allow_hub_loras,
        )
    else:
        backend = Engine.start(**options, queue_rules=rules, gpu_slot=gpu_slot)
    service = StencilService(backend)
    return create_demo(service, queue_size=args.queue_size)


def limit_image_decoding() -> None:
    """Set PIL's decompression-bomb guard to Stencil's limit before anything is decoded,
    by us or by Gradio, so a few-KB PNG that claims 100000x100000 pixels is refused."""
    from PIL import Image

    from pipelines.images import MAX_IMAGE_PIXELS

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


def claim_gradio_cache() -> tuple[Path, bool]:
    """Gradio's cache folder, and whether Stencil owns it: under Stencil's own cache unless
    GRADIO_TEMP_DIR names another (which may be shared, so Stencil leaves it to Gradio).

    Gradio expires only files it tracks in this run (`delete_cache`); files left by a run
    that was killed would stay for ever, so in a folder Stencil owns they go at start once
    past their age. Set before Gradio is imported: it reads the variable then."""
    from pipelines.settings import BUDGETS, cache_dir
    from pipelines.storage import prune_older_than

    chosen = os.environ.get("GRADIO_TEMP_DIR")
    if chosen:
        return Path(chosen), False
    folder = cache_dir() / "gradio"
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    prune_older_than(folder, BUDGETS.gradio_cache_max_age_s)
    return folder, True


def sweep_gradio_cache(demo, folder: Path):
    """Sweep the Gradio cache Stencil owns on Gradio's schedule, of the files `delete_cache`
    does not track (see `GradioCacheSweeper`), keeping those Gradio keeps (the examples)."""
    from pipelines.settings import BUDGETS
    from pipelines.storage import GradioCacheSweeper

    def kept_by_gradio() -> list[str]:
        blocks = demo.blocks.values()
        return [path for block in blocks for path in getattr(block, "keep_in_cache", ())]

    sweeper = GradioCacheSweeper(
        folder,
        max_age_s=BUDGETS.gradio_cache_max_age_s,
        every_s=BUDGETS.gradio_cache_sweep_s,
        keep=kept_by_gradio,
    )
    return sweeper.start()


def upload_limits(gradio_cache: Path) -> dict:
    """`launch` arguments that bound what an upload may cost (see upload_guard.py).

    Gradio 6 has one per-file cap for every upload (no component has its own), so it is
    the larger of Stencil's two: a LoRA file's; images are checked against their own,
    smaller cap before they are decoded."""
    from starlette.middleware import Middleware

    from pipelines.settings import BUDGETS, LIMITS
    from upload_guard import UploadGuard

    max_file_bytes = max(LIMITS.max_upload_bytes, BUDGETS.max_lora_upload_bytes)
    guard = Middleware(
        UploadGuard,
        cache_dir=gradio_cache,
        max_file_bytes=max_file_bytes,
        max_cache_bytes=BUDGETS.gradio_cache_max_bytes,
    )
    # num_workers=0: no static file workers (an SSR-mode option), which would serve the
    # upload route outside this middleware.
    return {
        "max_file_size": max_file_bytes,
        "app_kwargs": {"middleware": [guard]},
        "num_workers": 0,
    }


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        args = parse_args(argv)  # reads pipelines.settings, and with it every limit
        gradio_cache, stencil_owns_it = claim_gradio_cache()
        limit_image_decoding()
        demo = build_app(args)
    except (SettingsError, StencilError) as exc:  # a bad option, setting or model
        sys.exit(f"Stencil cannot start: {exc}")
    if stencil_owns_it:
        sweep_gradio_cache(demo, gradio_cache)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        allowed_paths=[],
        strict_cors=True,
        enable_monitoring=False,
        show_error=True,
        **upload_limits(gradio_cache),
    )


if __name__ == "__main__":
    main()
