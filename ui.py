"""The Stencil page: Gradio Blocks only. It talks to the engine through `StencilService`
(plain values in and out) and never imports torch."""

from __future__ import annotations

import threading
from typing import Any

import gradio as gr

from pipelines.errors import StencilError
from pipelines.schedulers import DEFAULT_SCHEDULER, SCHEDULERS
from pipelines.service import RANDOM_SEED, StencilService
from pipelines.settings import LIMITS

# Every event that touches the model shares this id, so they queue one at a time.
MODEL_QUEUE = "stencil-model"


class _Cancels:
    """Stop tokens by browser session: the Stop button reaches the running request."""

    def __init__(self) -> None:
        self._tokens: dict[str, Any] = {}
        self._lock = threading.Lock()

    def start(self, session: str):
        from pipelines.engine import CancelToken

        token = CancelToken()
        with self._lock:
            self._tokens[session] = token
        return token

    def stop(self, session: str) -> None:
        with self._lock:
            token = self._tokens.get(session)
        if token is not None:
            token.cancel()

    def finish(self, session: str, token) -> None:
        with self._lock:
            if self._tokens.get(session) is token:
                del self._tokens[session]


def status_markdown(service: StencilService) -> str:
    status = service.engine.status
    line = f"**Model:** {status.label} · `{status.base}` · {status.device} / {status.dtype}"
    if status.notice:
        line = f"⚠️ **{status.notice}**\n\n" + line
    return line


def create_demo(service: StencilService, *, queue_size: int = 32) -> gr.Blocks:
    cancels = _Cancels()

    def generate(
        prompt: str,
        negative_prompt: str = "",
        seed: float = RANDOM_SEED,
        steps: float = 20,
        guidance_scale: float = 7.0,
        width: float = 0,
        height: float = 0,
        scheduler: str = DEFAULT_SCHEDULER,
        num_images: float = 1,
        request: gr.Request = None,
        progress: gr.Progress = gr.Progress(),
    ):
        session = getattr(request, "session_hash", None) or "anonymous"
        token = cancels.start(session)
        progress(0, desc="waiting for the model")
        try:
            outcome = service.generate(
                prompt,
                negative_prompt=negative_prompt,
                seed=seed,
                steps=steps,
                guidance_scale=guidance_scale,
                width=width,
                height=height,
                scheduler=scheduler,
                num_images=num_images,
                session_id=session,
                progress=lambda done, total, stage: progress((done, total), desc=stage),
                cancel=token,
            )
        except StencilError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        finally:
            cancels.finish(session, token)
        for warning in outcome.warnings:
            gr.Warning(warning)
        return list(outcome.image_paths), outcome.seeds[0]

    def stop(request: gr.Request):
        cancels.stop(request.session_hash)

    with gr.Blocks(title="Stencil", analytics_enabled=False) as demo:
        gr.Markdown("# Stencil\nControlled image generation: prompt, control maps and LoRAs.")
        gr.Markdown(status_markdown(service), elem_id="status")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", lines=2, max_length=LIMITS.max_prompt_chars)
                negative = gr.Textbox(value="", label="Negative prompt", lines=1)
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                    halt = gr.Button("Stop", elem_id="stop")
                with gr.Accordion("Advanced", open=False):
                    steps = gr.Slider(1, LIMITS.max_steps, value=20, step=1, label="Steps")
                    guidance = gr.Slider(
                        0, LIMITS.max_guidance, value=7.0, step=0.5, label="Guidance scale"
                    )
                    scheduler = gr.Dropdown(
                        list(SCHEDULERS), value=DEFAULT_SCHEDULER, label="Scheduler"
                    )
                    width = gr.Slider(0, LIMITS.max_side, value=0, step=8, label="Width (0 = auto)")
                    height = gr.Slider(
                        0, LIMITS.max_side, value=0, step=8, label="Height (0 = auto)"
                    )
                    seed = gr.Number(value=RANDOM_SEED, precision=0, label="Seed (-1 = random)")
                    count = gr.Slider(1, LIMITS.max_images, value=1, step=1, label="Images")
            with gr.Column():
                gallery = gr.Gallery(label="Results", format="png", elem_id="results")
                used_seed = gr.Number(label="Seed used", precision=0, interactive=False)
        event = run.click(
            generate,
            inputs=[prompt, negative, seed, steps, guidance, width, height, scheduler, count],
            outputs=[gallery, used_seed],
            api_name="generate",
            concurrency_id=MODEL_QUEUE,
            concurrency_limit=1,
        )
        halt.click(stop, None, None, queue=False, api_visibility="private")
        del event
    # api_open=False: direct HTTP calls go through the queue like the page does.
    demo.queue(max_size=queue_size, api_open=False, default_concurrency_limit=1)
    return demo
