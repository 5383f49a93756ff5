"""Stop works at every stage: a queued run never starts, and Gradio's own cancel (what
gradio_client's Job.cancel() sends) stops a running one within one denoising step.

The page is served in this process so the test can hold a run at a known step; what is
asserted is counted work (steps run, runs started), never time.
"""

from __future__ import annotations

import threading

import pytest
from gradio_client import Client

from pipelines.engine import CancelToken, GenerationCancelled
from pipelines.service import StencilService

HOLD_AT_STEP = 2


class HeldRuns:
    """Wraps the service so each run reports its steps, and the first can be held."""

    def __init__(self, service: StencilService) -> None:
        self.service = service
        self.real_generate = service.generate
        self.started: list[str] = []
        self.steps: dict[str, int] = {}
        self.tokens: dict[str, CancelToken] = {}
        self.outcomes: dict[str, str] = {}
        self.holding = threading.Event()
        self.release = threading.Event()

    def generate(self, values, *, session_id=None, progress=None, cancel=None, preview=None):
        prompt = values["prompt"]
        self.started.append(prompt)
        self.tokens[prompt] = cancel

        def counted(done, total, stage):
            self.steps[prompt] = done
            if prompt == "held" and done == HOLD_AT_STEP:
                self.holding.set()
                assert self.release.wait(60), "the test never released the held run"
            progress(done, total, stage)

        try:
            outcome = self.real_generate(
                values, session_id=session_id, progress=counted, cancel=cancel, preview=preview
            )
        except GenerationCancelled:
            self.outcomes[prompt] = "cancelled"
            raise
        self.outcomes[prompt] = "finished"
        return outcome


@pytest.fixture
def served(engine, tmp_path, monkeypatch):
    import socket

    from ui import create_demo

    service = StencilService(engine, output_dir=tmp_path)
    runs = HeldRuns(service)
    monkeypatch.setattr(service, "generate", runs.generate)
    demo = create_demo(service)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    demo.launch(server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield runs, f"http://127.0.0.1:{port}/"
    finally:
        runs.release.set()
        demo.close()


def _wait_until(condition, what: str) -> None:
    done = threading.Event()
    for _ in range(600):
        if condition():
            return
        done.wait(0.05)
    raise AssertionError(f"never happened: {what}")


def test_job_cancel_stops_the_run_within_one_step_and_frees_the_model(served, engine):
    runs, url = served
    job = Client(url, verbose=False).submit(prompt="held", steps=50, api_name="/generate")
    assert runs.holding.wait(120), "the run never reached its held step"
    job.cancel()
    _wait_until(lambda: runs.tokens["held"].cancelled, "the engine's cancel token was set")
    runs.release.set()
    _wait_until(lambda: "held" in runs.outcomes, "the held run ended")
    assert runs.outcomes["held"] == "cancelled"
    # The step in progress when the cancel arrived finishes; no other step runs.
    assert runs.steps["held"] <= HOLD_AT_STEP + 1
    assert engine._lock.acquire(timeout=30)  # the model is free again
    engine._lock.release()


def test_a_run_cancelled_while_queued_never_starts(served, engine):
    """Gradio hands every request to the engine's scheduler, where it waits its turn; a
    cancel there takes it out of the line before any step of it runs."""
    runs, url = served
    holder = Client(url, verbose=False).submit(prompt="held", steps=4, api_name="/generate")
    assert runs.holding.wait(120)
    queued = Client(url, verbose=False).submit(prompt="queued", steps=2, api_name="/generate")
    _wait_until(lambda: engine.scheduler.waiting_count() == 1, "it was queued")
    queued.cancel()
    _wait_until(lambda: "queued" in runs.outcomes, "the queued run ended")
    runs.release.set()
    holder.result(timeout=120)
    after = Client(url, verbose=False).predict(prompt="after", steps=1, api_name="/generate")
    assert after and runs.started == ["held", "queued", "after"]
    assert runs.outcomes["queued"] == "cancelled"
    assert runs.steps.get("queued", 0) == 0  # not one denoising step of it ran


def test_the_stop_button_cancels_the_pages_run(served):
    """The page's Stop uses the same cancel, so a queued run is dropped from the queue."""
    _runs, url = served
    config = Client(url, verbose=False).config
    dependencies = config["dependencies"]
    button = next(
        c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "generate"
    )
    page_run = next(d for d in dependencies if [button, "click"] in d.get("targets", []))
    stoppers = [d for d in dependencies if page_run["id"] in (d.get("cancels") or [])]
    assert stoppers, "no event cancels the page's run"
