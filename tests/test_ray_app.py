"""`python app.py --backend ray`, as the README's "Scaling out" section runs it: a local Ray
cluster started by the app, one replica of the tiny engine, the page and API in front."""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest import ROOT, _free_port, served_app
from gradio_client import Client, handle_file
from PIL import Image

pytest.importorskip("ray.serve", reason="the Ray backend's tests need requirements-ray.txt")


def _ray_processes() -> list[str]:
    listing = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in listing.splitlines() if "raylet" in line or "gcs_server" in line]


def test_the_page_generates_on_ray_serve_replicas():
    assert not _ray_processes(), "a Ray cluster is already running here"
    env = dict(
        os.environ,
        GRADIO_SERVER_PORT=str(_free_port()),
        STENCIL_MODEL="tiny",
        STENCIL_BACKEND="ray",
        STENCIL_REPLICAS="1",
    )
    env.pop("RAY_ADDRESS", None)
    with served_app(env, "app-ray.log") as url:
        client = Client(url, verbose=False)
        gallery, maps, seed, recipe, _snippet, _preview = client.predict(
            prompt="a cottage, ink",
            control_type="canny",
            control_image=handle_file(str(ROOT / "examples" / "house.png")),
            loras="tiny-ink:0.9",
            seed=5,
            steps=3,
            api_name="/generate",
        )
        image = Image.open(gallery[0]["image"])
        assert image.size == (64, 40)
        assert maps and seed == 5
        assert recipe["loras"][0]["name"] == "tiny-ink"
    # Stopping the app (SIGTERM) takes its Ray cluster down with it.
    assert not _ray_processes()


def test_a_ray_client_address_is_refused_with_the_reason(monkeypatch):
    from pipelines.errors import StencilError
    from pipelines.ray_backend import start_ray_backend

    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    with pytest.raises(StencilError, match="Ray Client address, which cannot stream"):
        start_ray_backend({"model": "tiny"}, replicas=1)
