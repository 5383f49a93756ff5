"""The app end to end: started as a user starts it, offline, called through gradio_client."""

from __future__ import annotations

import json
import urllib.request

import pytest
from PIL import Image


def _image_path(gallery_item) -> str:
    return gallery_item["image"] if isinstance(gallery_item, dict) else gallery_item[0]


def test_offline_app_says_so_on_the_page(running_app):
    config = json.loads(urllib.request.urlopen(running_app + "config", timeout=10).read())
    texts = json.dumps(config)
    assert "Offline" in texts and "tiny model" in texts


def test_generate_with_only_a_prompt_returns_an_image(client):
    gallery, _maps, seed, _recipe, _snippet, _preview = client.predict(
        prompt="a red fox", api_name="/generate"
    )
    image = Image.open(_image_path(gallery[0]))
    assert image.size == (64, 64)
    assert isinstance(seed, (int, float)) and seed >= 0


def test_same_seed_through_the_api_gives_the_same_image(client):
    first, *_ = client.predict(prompt="a red fox", seed=42, steps=3, api_name="/generate")
    second, *_ = client.predict(prompt="a red fox", seed=42, steps=3, api_name="/generate")
    a = Image.open(_image_path(first[0])).tobytes()
    b = Image.open(_image_path(second[0])).tobytes()
    assert a == b


def test_a_bad_field_gets_a_clear_message_and_the_next_request_works(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="multiple of 8"):
        client.predict(prompt="a fox", width=100, height=64, api_name="/generate")
    gallery, *_ = client.predict(prompt="a fox", api_name="/generate")
    assert gallery


def test_direct_http_calls_cannot_skip_the_queue(running_app):
    import urllib.error

    request = urllib.request.Request(
        running_app + "gradio_api/run/generate",
        data=json.dumps({"data": ["a fox"]}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert "join the queue" in refused.value.read().decode()
