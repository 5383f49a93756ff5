"""The LoRA library's parts: a catalogue that knows no model, one adapter-store interface.

The adapter-store tests drive the strategies with a recording stand-in for the pipeline,
so they check the shared activation steps (hash order, restore on failure, LRU) in
milliseconds; tests/test_loras.py checks the same behaviour on real images.
"""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipelines import adapters, lora_catalogue, lora_sources, lora_text, loras
from pipelines.adapters import AdapterStore, HotswapSlots, NamedAdapters, build_adapter_store
from pipelines.errors import InvalidRequestError, LoraRejectedError, UnknownNameError
from pipelines.lora_catalogue import LoraCatalogue, LoraEntry
from pipelines.lora_files import LoraFileReport, ModelSignature
from pipelines.lora_sources import PreparedLora

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "loras"
INK = (SHIPPED / "tiny-ink.safetensors").read_bytes()


# --------------------------------------------------------------------------------------
# The catalogue knows no model


def test_the_catalogue_and_text_forms_import_no_torch():
    code = (
        "import sys, pipelines.lora_catalogue, pipelines.lora_text;"
        " heavy = {'torch', 'diffusers', 'peft'} & set(sys.modules);"
        " assert not heavy, heavy"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_catalogue_resolves_and_lists_without_a_model(tmp_path):
    catalogue = LoraCatalogue(SHIPPED, "tiny", max_upload_bytes=2**20, uploads_dir=tmp_path)
    assert catalogue.resolve("tiny-ink").file == "tiny-ink.safetensors"
    assert "lcm-sd15" not in catalogue.names()
    assert any(e.name == "lcm-sd15" for e in catalogue.all_entries())
    with pytest.raises(UnknownNameError):
        catalogue.resolve("tiny-inc")


def test_concurrent_uploads_and_lookups_keep_every_session_apart(tmp_path):
    catalogue = LoraCatalogue(SHIPPED, "tiny", max_upload_bytes=2**20, uploads_dir=tmp_path)
    sessions, per_session = [f"session-{i}" for i in range(6)], 4
    start = threading.Barrier(len(sessions) + 2)

    def upload_all(session: str) -> list[str]:
        start.wait()
        names = []
        for index in range(per_session):
            checked = catalogue.check_upload(INK, f"style {index}.safetensors", session)
            names.append(catalogue.add_upload(checked).name)
            assert catalogue.resolve(names[-1], session_id=session).session_id == session
        return names

    def look_up() -> None:
        start.wait()
        for _ in range(200):
            assert "tiny-ink" in catalogue.names(sessions[0])
            catalogue.entries(sessions[-1])

    with ThreadPoolExecutor(max_workers=len(sessions) + 2) as pool:
        readers = [pool.submit(look_up) for _ in range(2)]
        uploaded = dict(zip(sessions, pool.map(upload_all, sessions)))
        for reader in readers:
            reader.result()
    for session, names in uploaded.items():
        own = [e.name for e in catalogue.entries(session) if e.session_id is not None]
        assert sorted(own) == sorted(names) and len(set(names)) == per_session
    assert [p.name for p in tmp_path.iterdir()] == [f"{lora_hash()}.safetensors"]


def test_the_per_session_upload_limit_holds_under_concurrent_uploads(tmp_path):
    catalogue = LoraCatalogue(
        SHIPPED, "tiny", max_upload_bytes=2**20, max_uploads_per_session=3, uploads_dir=tmp_path
    )

    def upload(index: int) -> bool:
        checked = catalogue.check_upload(INK, f"style {index}.safetensors", "one")
        try:
            catalogue.add_upload(checked)
        except InvalidRequestError:
            return False
        return True

    with ThreadPoolExecutor(max_workers=8) as pool:
        accepted = list(pool.map(upload, range(12)))
    assert sum(accepted) == 3
    assert len([e for e in catalogue.entries("one") if e.session_id == "one"]) == 3


def lora_hash() -> str:
    import hashlib

    return hashlib.sha256(INK).hexdigest()


# --------------------------------------------------------------------------------------
# One adapter-store interface, chosen once


def test_both_strategies_implement_the_one_interface():
    named, slots = build_adapter_store(max_loaded=3), build_adapter_store(hotswap_rank=8)
    assert type(named) is NamedAdapters and type(slots) is HotswapSlots
    for store in (named, slots):
        assert isinstance(store, AdapterStore) and not inspect.isabstract(type(store))
        for method in ("bind", "activate", "loaded", "is_bound_to"):
            assert callable(getattr(store, method))
    assert (named.capacity, slots.capacity) == (3, 2)
    assert (named.keeps_compiled_graph, slots.keeps_compiled_graph) == (False, True)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"max_loaded": 0}, "max_loaded=0"),
        ({"hotswap_rank": 0}, "hotswap_rank=0"),
        ({"hotswap_slots": 17}, "hotswap_slots=17"),
        ({"max_loaded": 0, "hotswap_rank": 8}, "max_loaded=0"),  # checked whatever is used
    ],
)
def test_bad_store_settings_fail_at_start_up(settings, message):
    with pytest.raises(ValueError, match=message):
        build_adapter_store(**settings)


def _sources_of(module) -> str:
    return Path(inspect.getsourcefile(module)).read_text(encoding="utf-8")


def test_no_strategy_branch_outside_the_strategy_classes():
    shared = [loras, lora_catalogue, lora_sources, lora_text]
    for module in shared:
        assert "hotswap_rank is" not in _sources_of(module), module.__name__
        assert _branches_on_hotswap(ast.parse(_sources_of(module))) == [], module.__name__
    engine_source = (REPO / "pipelines" / "engine.py").read_text(encoding="utf-8")
    assert "hotswap_rank is" not in engine_source
    # In adapters.py only the factory (which chooses) and the hotswap strategy itself may.
    tree = ast.parse(_sources_of(adapters))
    allowed = {"build_adapter_store", "HotswapSlots"}
    outside = [n for n in tree.body if getattr(n, "name", None) not in allowed]
    assert _branches_on_hotswap(ast.Module(body=outside, type_ignores=[])) == []


def _branches_on_hotswap(tree: ast.AST) -> list[int]:
    branches = (ast.If, ast.IfExp, ast.While)
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, branches) and "hotswap" in ast.unparse(node.test).lower()
    ]


# --------------------------------------------------------------------------------------
# The shared activation steps, on a recording stand-in for the pipeline


class RecordingPipe:
    """Just the adapter calls a store makes, recorded; `failing` files refuse to load."""

    def __init__(self, failing: frozenset[str] = frozenset()):
        self.unet = object()
        self.failing = failing
        self.adapters: list[str] = []
        self.calls: list[tuple] = []

    def load_lora_weights(self, folder, *, weight_name, adapter_name, **options):
        self.calls.append(("load", weight_name))
        if weight_name in self.failing:
            raise RuntimeError("cannot load")
        self.adapters.append(adapter_name)

    def get_list_adapters(self):
        return {"unet": list(self.adapters)} if self.adapters else {}

    def delete_adapters(self, names):
        self.calls.append(("delete", tuple(names)))
        self.adapters = [a for a in self.adapters if a not in names]

    def set_adapters(self, names, adapter_weights):
        self.calls.append(("set", tuple(names), tuple(adapter_weights)))

    def enable_lora(self):
        self.calls.append(("enable",))

    def disable_lora(self):
        self.calls.append(("disable",))


SIGNATURE = ModelSignature(
    pipeline_class=RecordingPipe,
    layers={},
    cross_attention_dim=None,
    text_hidden_size=None,
    text_encoders_with_text_model=frozenset(),
)


def prepared(name: str, sha_digit: str, param_count: int = 10) -> PreparedLora:
    report = LoraFileReport(
        sha256=sha_digit * 64,
        size_bytes=100,
        layout="peft",
        ranks=(4,),
        alphas=(4.0,),
        targets=("unet",),
        param_count=param_count,
    )
    entry = LoraEntry(name=name, display_name=name, base="tiny", file=f"{name}.safetensors")
    return PreparedLora(entry, Path(f"/loras/{name}.safetensors"), report)


def bound_store(pipe: RecordingPipe, **settings) -> NamedAdapters:
    store = NamedAdapters(**settings)
    store.bind(pipe, SIGNATURE)
    return store


def test_adapters_sum_in_file_hash_order_whatever_the_request_order():
    pipe = RecordingPipe()
    store = bound_store(pipe)
    late, early = prepared("late", "b"), prepared("early", "a")
    first = store.activate(pipe, [(late, 0.5), (early, 0.8)])
    again = store.activate(pipe, [(early, 0.8), (late, 0.5)])
    assert first == again and [w for _, w in first] == [0.8, 0.5]
    assert [c[0] for c in pipe.calls].count("set") == 1  # the same set again: no call
    assert store.loaded() == ["early", "late"]  # the latest request touched late last


def test_a_failed_load_restores_the_previous_set():
    pipe = RecordingPipe(failing=frozenset({"broken.safetensors"}))
    store = bound_store(pipe)
    before = store.activate(pipe, [(prepared("ink", "a"), 0.7)])
    with pytest.raises(LoraRejectedError, match="diffusers could not load it"):
        store.activate(pipe, [(prepared("ink", "a"), 0.7), (prepared("broken", "c"), 1.0)])
    assert pipe.calls[-1] == ("set", tuple(a for a, _ in before), (0.7,))
    assert store.loaded() == ["ink"]


def test_least_recently_used_adapters_go_first_never_the_set_being_activated():
    pipe = RecordingPipe()
    store = bound_store(pipe, max_loaded=2)
    a, b, c = prepared("a", "a"), prepared("b", "b"), prepared("c", "c")
    store.activate(pipe, [(a, 1.0)])
    store.activate(pipe, [(b, 1.0)])
    store.activate(pipe, [(c, 1.0), (b, 1.0)])
    assert store.loaded() == ["c", "b"] and len(pipe.adapters) == 2
    with pytest.raises(InvalidRequestError, match="at most 2 LoRAs"):
        store.activate(pipe, [(a, 1.0), (b, 1.0), (c, 1.0)])
    store.activate(pipe, [])
    assert pipe.calls[-1] == ("disable",)
