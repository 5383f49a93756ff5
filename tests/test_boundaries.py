"""The layer boundaries, held by tests: the engine never imports gradio, the page gets torch
only from the engine, and bad settings stop start-up with a message, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT

from pipelines.errors import SettingsError
from pipelines.settings import MAX_STEPS, load_limits


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_engine_runs_a_generation_without_ever_importing_gradio():
    code = """
import sys
from pathlib import Path
import pipelines, pipelines.service, pipelines.form, pipelines.controls
from pipelines.engine import Engine
from pipelines.families import FAMILIES
from pipelines.requests import GenerationRequest
engine = Engine(FAMILIES["tiny"], cache_root=Path(sys.argv[0]).parent / ".cache" / "test")
engine.generate(GenerationRequest("a fox", seed=1, steps=1))
loaded = sorted(m for m in sys.modules if m == "gradio" or m.startswith("gradio."))
assert not loaded, loaded
print("no gradio")
"""
    done = run_python(code.replace("sys.argv[0]", repr(str(ROOT / "x"))))
    assert done.returncode == 0 and "no gradio" in done.stdout, done.stderr[-2000:]


def test_the_page_module_and_the_field_tables_import_no_torch():
    code = """
import sys
import ui, pipelines.fields, pipelines.form, pipelines.requests, pipelines.recipe
import pipelines.service
assert "torch" not in sys.modules, "torch came in at import"
print("no torch")
"""
    done = run_python(code)
    assert done.returncode == 0 and "no torch" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("STENCIL_MAX_STEPS", "lots", "STENCIL_MAX_STEPS='lots' is not a whole number"),
        ("STENCIL_MAX_SIDE", "99999", "STENCIL_MAX_SIDE=99999 is out of range"),
        ("STENCIL_COMPILE", "maybe", "STENCIL_COMPILE='maybe' is not a yes/no value"),
        ("GRADIO_SERVER_PORT", "http", "GRADIO_SERVER_PORT='http' is not a whole number"),
        ("STENCIL_DTYPE", "float8", "STENCIL_DTYPE='float8' is not one of"),
    ],
)
def test_a_malformed_setting_stops_start_up_naming_the_variable(variable, value, message):
    done = subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "--model", "tiny"],
        cwd=ROOT,
        env={**os.environ, variable: value},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_a_bad_option_is_named_too():
    done = subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "--queue-size", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "--queue-size=0 is out of range" in done.stderr


def test_limits_are_read_from_the_environment_once_and_never_clamped():
    assert load_limits({"STENCIL_MAX_STEPS": "40"}).max_steps == 40
    assert load_limits({}).max_steps == MAX_STEPS.default
    with pytest.raises(SettingsError, match="from 1 to 500"):
        load_limits({"STENCIL_MAX_STEPS": "501"})
