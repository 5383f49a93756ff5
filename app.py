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

from pipelines.errors import SettingsError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, each defaulting to its environment variable (read via pipelines.settings,
    which also holds every limit). A bad value stops here with a message naming it."""
    from pipelines import settings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])

    def whole(setting: settings.WholeSetting, option: str):
        def parse(raw: str) -> int:
            try:
                return setting.parse(raw, option)
            except settings.SettingsError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None

        return parse

    parser.add_argument(
        "--model",
        default=settings.env_text("STENCIL_MODEL", "auto"),
        help="model family (sd15, sdxl, tiny), a local diffusers folder, or 'auto' "
        "(sd15 when cached or reachable, else the built-in tiny model) [env STENCIL_MODEL]",
    )
    parser.add_argument(
        "--host",
        default=settings.env_text("GRADIO_SERVER_NAME", "127.0.0.1"),
        help="address to listen on [env GRADIO_SERVER_NAME]",
    )
    parser.add_argument(
        "--port",
        type=whole(settings.PORT, "--port"),
        default=settings.PORT.read(os.environ),
        help="port to listen on [env GRADIO_SERVER_PORT]",
    )
    parser.add_argument(
        "--loras",
        default=settings.env_text("STENCIL_LORA_DIR", str(Path(__file__).with_name("loras"))),
        help="folder of the LoRA library [env STENCIL_LORA_DIR]",
    )
    parser.add_argument(
        "--lora-hotswap-rank",
        type=whole(settings.LORA_HOTSWAP_RANK, "--lora-hotswap-rank"),
        default=settings.LORA_HOTSWAP_RANK.read(os.environ),
        help="swap LoRAs into fixed slots padded to this rank (needed with --compile; 0: off) "
        "[env STENCIL_LORA_HOTSWAP_RANK]",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        default=settings.env_flag("STENCIL_COMPILE"),
        help="torch.compile the UNet (GPU; pair with --lora-hotswap-rank) [env STENCIL_COMPILE]",
    )
    parser.add_argument(
        "--queue-size",
        type=whole(settings.QUEUE_SIZE, "--queue-size"),
        default=settings.QUEUE_SIZE.read(os.environ),
        help="requests that may wait in the queue before new ones are turned away "
        "[env STENCIL_QUEUE_SIZE]",
    )
    return parser.parse_args(argv)


def build_app(args: argparse.Namespace):
    """Engine, service and page, wired together; nothing is launched here."""
    from pipelines.engine import Engine
    from pipelines.service import StencilService
    from ui import create_demo

    engine = Engine.start(
        args.model,
        lora_folder=args.loras,
        lora_hotswap_rank=args.lora_hotswap_rank or None,
        compile_unet=args.compile,
    )
    service = StencilService(engine)
    return create_demo(service, queue_size=args.queue_size)


def limit_image_decoding() -> None:
    """Set PIL's decompression-bomb guard to Stencil's limit before anything is decoded,
    by us or by Gradio, so a few-KB PNG that claims 100000x100000 pixels is refused."""
    from PIL import Image

    from pipelines.images import MAX_IMAGE_PIXELS

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        args = parse_args(argv)  # reads pipelines.settings, and with it every limit
        limit_image_decoding()
        demo = build_app(args)
    except SettingsError as exc:
        sys.exit(f"Stencil cannot start: {exc}")
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        allowed_paths=[],
        strict_cors=True,
        enable_monitoring=False,
        show_error=True,
        # Big enough for a LoRA upload; images have their own, smaller cap when decoded.
        max_file_size="200mb",
    )


if __name__ == "__main__":
    main()
