"""What Stencil keeps on disk has an owner and a lifetime: outputs pruned by age and size,
one output folder reused across starts, Gradio's folder swept of what a killed run left."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
from PIL import Image

from pipelines.settings import SettingsError, load_budgets
from pipelines.storage import BoundedFolder, folder_bytes, prune_older_than


class Clock:
    """A clock the test moves; files get their modification time from it too."""

    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def write_at(folder: BoundedFolder, clock: Clock, name: str, size: int):
    path = folder.write(name, b"x" * size)
    os.utime(path, (clock.now, clock.now))
    return path


def names(folder: BoundedFolder) -> list[str]:
    return [stored.path.name for stored in folder.files()]


def test_files_past_their_age_go_at_the_next_write(tmp_path):
    clock = Clock()
    folder = BoundedFolder(tmp_path, max_bytes=10_000, max_age_s=30, min_age_s=0, clock=clock)
    write_at(folder, clock, "old.png", 10)
    clock.now += 20
    write_at(folder, clock, "newer.png", 10)
    clock.now += 15  # old.png is 35 s old now, newer.png 15 s
    write_at(folder, clock, "newest.png", 10)
    assert names(folder) == ["newer.png", "newest.png"]


def test_the_oldest_files_go_first_past_the_byte_budget(tmp_path):
    clock = Clock()
    folder = BoundedFolder(tmp_path, max_bytes=250, max_age_s=3600, min_age_s=0, clock=clock)
    for index in range(6):
        write_at(folder, clock, f"{index}.png", 100)
        clock.now += 1
    folder.prune()
    assert names(folder) == ["4.png", "5.png"]
    assert folder.total_bytes() <= 250


def test_a_result_younger_than_the_minimum_age_is_kept_whatever_the_budget(tmp_path):
    clock = Clock()
    folder = BoundedFolder(tmp_path, max_bytes=100, max_age_s=3600, min_age_s=10, clock=clock)
    write_at(folder, clock, "a.png", 100)
    clock.now += 5
    write_at(folder, clock, "b.png", 100)  # over budget, but a.png is only 5 s old
    assert names(folder) == ["a.png", "b.png"]
    clock.now += 6  # a.png is 11 s old now: the budget applies to it
    folder.prune()
    assert names(folder) == ["b.png"]


def test_rewriting_a_result_refreshes_its_age(tmp_path):
    clock = Clock()
    folder = BoundedFolder(tmp_path, max_bytes=10_000, max_age_s=30, min_age_s=0, clock=clock)
    write_at(folder, clock, "same.png", 10)
    clock.now += 25
    write_at(folder, clock, "same.png", 10)  # content-addressed: the same result again
    clock.now += 25
    folder.prune()
    assert names(folder) == ["same.png"]


def test_a_write_is_whole_or_absent_and_names_stay_inside(tmp_path):
    folder = BoundedFolder(tmp_path, max_bytes=10_000, max_age_s=30)
    assert folder.write("a.png", b"data").read_bytes() == b"data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]  # no staging file left
    with pytest.raises(ValueError):
        folder.write("../escape.png", b"data")


def stub_engine():
    """What StencilService reads of an engine to build its fields and write results."""
    return SimpleNamespace(model_facts={"text_encoder_layers": 2}, loras=None)


def test_two_services_share_one_output_folder_and_a_start_prunes_it(tmp_path, monkeypatch):
    from pipelines.service import StencilService

    monkeypatch.setenv("STENCIL_CACHE_DIR", str(tmp_path / "cache"))
    budgets = load_budgets({"STENCIL_OUTPUT_MAX_AGE_S": "60"})
    first = StencilService(stub_engine(), budgets=budgets)
    left = first.outputs.write("left-by-an-earlier-run.png", b"old")
    os.utime(left, (left.stat().st_mtime - 120,) * 2)
    kept = first.outputs.write("recent.png", b"new")

    second = StencilService(stub_engine(), budgets=budgets)
    assert second.output_dir == first.output_dir == tmp_path / "cache" / "outputs"
    assert not left.exists() and kept.exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["outputs"]


def test_results_are_written_into_the_bounded_folder(tmp_path):
    from pipelines.service import StencilService

    budgets = load_budgets({"STENCIL_OUTPUT_MAX_MB": "1"})
    service = StencilService(stub_engine(), tmp_path, budgets=budgets)
    noisy = Image.effect_noise((256, 256), 64).convert("RGB")  # ~170 KB as PNG
    paths = [service._write_png(noisy.rotate(turn), None, prefix="map") for turn in range(8)]
    assert all(p.startswith(str(tmp_path)) for p in paths)
    # None is a minute old yet, so none may go: the minimum age protects them.
    assert service.outputs.min_age_s == 60 and len(service.outputs.files()) == 8
    for age, path in enumerate(reversed(paths)):  # the first written is the oldest
        os.utime(path, (os.stat(path).st_mtime - 120 - age,) * 2)
    newest = service._write_png(noisy.rotate(45), None, prefix="map")
    assert service.outputs.total_bytes() <= budgets.output_max_bytes
    assert os.path.exists(newest) and os.path.exists(paths[-1]) and not os.path.exists(paths[0])


def test_prune_older_than_sweeps_old_files_and_empty_folders(tmp_path):
    old = tmp_path / "abc" / "old.png"
    new = tmp_path / "def" / "new.png"
    for path in (old, new):
        path.parent.mkdir()
        path.write_bytes(b"12345")
    for path in (old, old.parent):  # an upload of long ago, in its own folder
        os.utime(path, (path.stat().st_mtime - 100,) * 2)
    just_made = tmp_path / "f00"
    just_made.mkdir()  # about to receive its file: it stays
    assert prune_older_than(tmp_path, 50) == 1
    assert not old.parent.exists() and new.exists() and just_made.exists()
    assert folder_bytes(tmp_path) == 5
    assert prune_older_than(tmp_path / "missing", 50) == 0


def test_stencil_sweeps_the_gradio_folder_it_owns_at_start(tmp_path, monkeypatch):
    import app

    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
    monkeypatch.setenv("STENCIL_CACHE_DIR", str(tmp_path))
    leftover = tmp_path / "gradio" / "0123" / "upload.png"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"left by a killed run")
    os.utime(leftover, (leftover.stat().st_mtime - 7200,) * 2)
    assert app.claim_gradio_cache() == (tmp_path / "gradio", True)
    assert os.environ["GRADIO_TEMP_DIR"] == str(tmp_path / "gradio")
    assert not leftover.exists()


def test_an_operator_chosen_gradio_folder_is_left_alone(tmp_path, monkeypatch):
    import app

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    leftover = tmp_path / "theirs.png"
    leftover.write_bytes(b"x")
    os.utime(leftover, (leftover.stat().st_mtime - 7200,) * 2)
    assert app.claim_gradio_cache() == (tmp_path, False) and leftover.exists()


def test_budget_settings_are_read_and_checked():
    budgets = load_budgets({"STENCIL_OUTPUT_MAX_MB": "3", "STENCIL_GRADIO_CACHE_MAX_AGE_S": "60"})
    assert budgets.output_max_bytes == 3 * 2**20
    assert budgets.gradio_delete_cache == (300, 60)
    defaults = load_budgets({})
    assert defaults.output_max_age_s == 3600 and defaults.map_cache_bytes == 128 * 2**20
    with pytest.raises(SettingsError, match="STENCIL_MAP_CACHE_MB='lots'"):
        load_budgets({"STENCIL_MAP_CACHE_MB": "lots"})
    with pytest.raises(SettingsError, match="STENCIL_OUTPUT_MAX_AGE_S=1 is out of range"):
        load_budgets({"STENCIL_OUTPUT_MAX_AGE_S": "1"})
