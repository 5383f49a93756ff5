"""Shared fixtures. Every test runs offline on the built-in tiny family."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_CACHE = ROOT / ".cache" / "test"

# Set before anything imports huggingface_hub or gradio: they read these at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["STENCIL_CACHE_DIR"] = str(TEST_CACHE)
os.environ.setdefault("GRADIO_TEMP_DIR", str(ROOT / ".cache" / "gradio"))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(ROOT / ".cache" / "inductor"))
# One intra-op thread, in this process and in the apps and Ray workers it starts (they inherit
# it, and a thread count changes rounding, so their images match this process's). The tiny
# models' operations are too small to share: one thread draws a tiny image in 0.27 s against
# 0.46 s on two. And OpenMP gives each thread that runs torch its own team of helpers: with
# several engines in one process (tests make many) and two threads each, there are more
# helpers than cores, OpenMP stops spinning between operations, and every image took 3-4x
# as long (tiny-xl: 1.9 s against 0.37 s).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

# Tests import the Hub-cache layout helper from here; it lives with the other Hub questions.
from pipelines.hub import hub_snapshot  # noqa: E402, F401


@pytest.fixture(scope="session")
def cache_root() -> Path:
    TEST_CACHE.mkdir(parents=True, exist_ok=True)
    return TEST_CACHE


@pytest.fixture(scope="session")
def tiny_family(cache_root) -> Path:
    """The tiny family's folder, built once per session (the same one the engine loads)."""
    from pipelines.tiny import ensure_tiny_family

    return ensure_tiny_family(cache_root)


def load_tiny_pipe(folder: Path):
    """A fresh StableDiffusionPipeline of the tiny family, loaded the way the engine does."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def engine(cache_root):
    """One engine for the whole session, shared like the app shares it between users."""
    from pipelines.engine import Engine
    from pipelines.families import FAMILIES

    return Engine(FAMILIES["tiny"], cache_root=cache_root, lora_folder=ROOT / "loras")


def pixels(image):
    import numpy as np

    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def served_app(env: dict, log_name: str):
    """`python app.py` in a subprocess with `env`, until it serves its page; yields its URL.

    `env` must name GRADIO_SERVER_PORT. The app's output goes to `.cache/<log_name>`."""
    import subprocess
    import sys
    import time
    import urllib.request

    log_path = ROOT / ".cache" / log_name
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py")], cwd=ROOT, env=env, stdout=log, stderr=log
        )
    url = f"http://127.0.0.1:{env['GRADIO_SERVER_PORT']}/"
    try:
        deadline = time.time() + 180
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"app exited early:\n{log_path.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError as exc:
                if time.time() > deadline:
                    tail = log_path.read_text()[-3000:]
                    raise RuntimeError(f"app did not start:\n{tail}") from exc
                time.sleep(0.25)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="session")
def running_app(cache_root):
    """`python app.py` in a subprocess, offline, on a free port; yields its URL."""
    # Live preview on (every 5 steps), as on a GPU: the page's preview box is tested too.
    env = dict(
        os.environ,
        GRADIO_SERVER_PORT=str(_free_port()),
        STENCIL_MODEL="auto",
        STENCIL_LIVE_PREVIEW_EVERY="5",
    )
    with served_app(env, "app-under-test.log") as url:
        yield url


def render_np(pipe, prompt: str = "a photo of a cat"):
    """A 64x64, 2-step image of a plain diffusers pipeline as floats (seed 1234)."""
    import torch

    generator = torch.Generator().manual_seed(1234)
    result = pipe(
        prompt, num_inference_steps=2, height=64, width=64, generator=generator, output_type="np"
    )
    return result.images[0]


@pytest.fixture(scope="session")
def client(running_app):
    from gradio_client import Client

    return Client(running_app, verbose=False)
