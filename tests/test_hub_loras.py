"""LoRAs from the Hub by id (`--allow-hub-loras`), against a fake Hub on this machine.

huggingface_hub's two calls that Stencil makes (`HfApi.model_info` and `hf_hub_download`)
are replaced at the module boundary by `FakeHub`, which checks every call against the real
function's signature and serves bytes of the shipped tiny LoRAs. No test uses the network.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import numpy as np
import pytest
from conftest import load_tiny_pipe, render_np
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, Response
from huggingface_hub.hf_api import BlobLfsInfo, RepoSibling

from pipelines import lora_hub
from pipelines.errors import (
    HubUnavailableError,
    InvalidRequestError,
    LoraRejectedError,
    UnknownNameError,
)
from pipelines.loras import LoraLibrary
from pipelines.requests import LoraChoice

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "loras"
INK = (SHIPPED / "tiny-ink.safetensors").read_bytes()
NEON = (SHIPPED / "tiny-neon.safetensors").read_bytes()
COMMIT = "0123abcd" * 5
REAL_MODEL_INFO = huggingface_hub.HfApi.model_info
REAL_DOWNLOAD = huggingface_hub.hf_hub_download
OFFLINE = "the Hugging Face Hub cannot be reached from this server (offline)"
# huggingface_hub's HTTP client (its errors carry one of its responses).
HTTP = importlib.import_module(Response.__module__.partition(".")[0])


class FakeHub:
    """The Hub as Stencil sees it: repo id -> {path: bytes}. A path given as a bare size is
    listed with that size but must never be downloaded."""

    def __init__(self, repos: dict[str, dict[str, bytes | int]]):
        self.repos = repos
        self.listed: list[str] = []
        self.downloads: list[tuple[str, str, str]] = []
        self.listing_error: Exception | None = None
        self.download_error: Exception | None = None
        self.served: dict[tuple[str, str], bytes] = {}  # bytes other than those listed

    def model_info(self, repo_id, **options):  # stands in for HfApi().model_info
        inspect.signature(REAL_MODEL_INFO).bind(None, repo_id, **options)
        assert options["token"] is False and options["files_metadata"] is True
        self.listed.append(repo_id)
        if self.listing_error is not None:
            raise self.listing_error
        if repo_id not in self.repos:
            answer = Response(404, request=HTTP.Request("GET", "http://127.0.0.1/"))
            raise RepositoryNotFoundError("404 Repository Not Found", response=answer)
        siblings = [self._sibling(path, item) for path, item in self.repos[repo_id].items()]
        return SimpleNamespace(id=repo_id, sha=COMMIT, siblings=siblings, gated=False)

    def hf_hub_download(self, repo_id, filename, **options):
        inspect.signature(REAL_DOWNLOAD).bind(repo_id, filename, **options)
        assert options["token"] is False
        self.downloads.append((repo_id, filename, options["revision"]))
        if self.download_error is not None:
            raise self.download_error
        data = self.served.get((repo_id, filename), self.repos[repo_id][filename])
        assert isinstance(data, bytes), f"{filename} must never be fetched"
        path = Path(options["cache_dir"]) / "snapshots" / options["revision"] / filename
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
        return str(path)

    @staticmethod
    def _sibling(path: str, item: bytes | int) -> RepoSibling:
        size = item if isinstance(item, int) else len(item)
        digest = hashlib.sha256(item).hexdigest() if isinstance(item, bytes) else "0" * 64
        lfs = BlobLfsInfo(size=size, sha256=digest, pointer_size=134)
        return RepoSibling(rfilename=path, size=size, lfs=lfs)


@pytest.fixture
def online(monkeypatch):
    """The Hub is 'reachable': conftest's offline switch off for this test."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def hub(monkeypatch) -> FakeHub:
    fake = FakeHub(
        {
            "stencil-tests/ink": {"ink.safetensors": INK, "README.md": b"# ink"},
            "stencil-tests/two": {"a.safetensors": INK, "styles/b.safetensors": NEON},
            "stencil-tests/pickles": {"model.bin": INK, "lora.ckpt": INK},
            "stencil-tests/mixed": {"lora.bin": 10**9, "lora.safetensors": NEON},
            "stencil-tests/huge": {"huge.safetensors": 10**12},
            "stencil-tests/evil": {"evil.safetensors": b"PK\x03\x04 not a safetensors file"},
        }
    )
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", fake.model_info)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
    return fake


@pytest.fixture
def library(tmp_path) -> LoraLibrary:
    return LoraLibrary(SHIPPED, "tiny", uploads_dir=tmp_path / "uploads", allow_hub_loras=True)


@pytest.fixture
def pipe(tiny_family):
    return load_tiny_pipe(tiny_family)


# --------------------------------------------------------------------------------------
# What a user may type


HOSTILE_REPO_IDS = [
    "../x",
    "a/b/../../c",
    "/etc/passwd",
    "a//b",
    "a/b?x",
    "a/b#main",
    "a/b@main",
    "owner/re po",
    "own er/repo",
    "owner/\nrepo",
    "owner/repo\x00",
    "a" * 97 + "/b",
    "owner/" + "b" * 97,
    "ownér/repo",
    "owner/repо",  # a Cyrillic 'о'
    "１２/repo",  # full-width digits
    "owner",
    "owner/repo/extra",
    "owner\\repo",
    "C:/repo",
    "-owner/repo",
    "owner/repo-",
    ".owner/repo",
    "owner/repo.",
    "owner/_repo",
    "own--er/repo",
    "owner/re..po",
    "",
    "   ",
]


@pytest.mark.parametrize("repo", HOSTILE_REPO_IDS)
def test_hostile_repo_ids_are_refused_before_the_hub_is_asked(library, hub, online, repo):
    with pytest.raises(InvalidRequestError) as refused:
        library.add_hub_lora(repo, "", "session-a")
    assert refused.value.field == "hub_repo"
    assert "owner/name" in str(refused.value)
    assert hub.listed == [] and hub.downloads == []


HOSTILE_FILE_NAMES = [
    "../ink.safetensors",
    "a/../../ink.safetensors",
    "/etc/ink.safetensors",
    "a//ink.safetensors",
    "a\\ink.safetensors",
    "C:/ink.safetensors",
    ".hidden/ink.safetensors",
    ".safetensors",
    "ink.safetensors/",
    "ink.ckpt",
    "ink.bin",
    "ink.pt",
    "ink.safetensors.bin",
    "ink.SAFETENSORS",
    "my ink.safetensors",
    "ink?.safetensors",
    "ínk.safetensors",
    "a/" * 8 + "ink.safetensors",
    "x" * 300 + ".safetensors",
]


@pytest.mark.parametrize("file", HOSTILE_FILE_NAMES)
def test_hostile_file_names_are_refused_before_the_hub_is_asked(library, hub, online, file):
    with pytest.raises(InvalidRequestError) as refused:
        library.add_hub_lora("stencil-tests/ink", file, "session-a")
    assert refused.value.field == "hub_file"
    assert hub.listed == [] and hub.downloads == []


@pytest.mark.parametrize(
    "repo, file, expected",
    [
        ("owner/repo", "", ("owner/repo", None)),
        ("  Owner-1/repo.name_2  ", None, ("Owner-1/repo.name_2", None)),
        ("a/b", " sub/dir/x+v1.safetensors ", ("a/b", "sub/dir/x+v1.safetensors")),
        ("a" * 96 + "/" + "b" * 96, "", ("a" * 96 + "/" + "b" * 96, None)),
    ],
)
def test_good_ids_are_taken_as_given(repo, file, expected):
    wanted = lora_hub.parse_hub_lora(repo, file)
    assert (wanted.repo_id, wanted.filename) == expected


def test_non_text_values_are_refused_naming_the_field(library, hub, online):
    for repo, file, field in [(42, "", "hub_repo"), ("a/b", ["x.safetensors"], "hub_file")]:
        with pytest.raises(InvalidRequestError, match="must be text") as refused:
            library.add_hub_lora(repo, file, "session-a")
        assert refused.value.field == field


# --------------------------------------------------------------------------------------
# Off by default, and offline


def test_hub_loras_are_off_unless_the_operator_allows_them(tmp_path, hub, online):
    library = LoraLibrary(SHIPPED, "tiny", uploads_dir=tmp_path)
    with pytest.raises(HubUnavailableError) as refused:
        library.add_hub_lora("stencil-tests/ink", "", "session-a")
    assert str(refused.value) == (
        "LoRAs from the Hub are turned off on this server; the operator can allow them with"
        " --allow-hub-loras (or STENCIL_ALLOW_HUB_LORAS=1)"
    )
    assert hub.listed == [] and hub.downloads == []


def test_the_flag_and_its_variable_reach_the_library(monkeypatch, engine):
    import app
    from pipelines.engine import Engine

    monkeypatch.delenv("STENCIL_ALLOW_HUB_LORAS", raising=False)
    assert app.parse_args([]).allow_hub_loras is False
    assert app.parse_args(["--allow-hub-loras"]).allow_hub_loras is True
    monkeypatch.setenv("STENCIL_ALLOW_HUB_LORAS", "1")
    args = app.parse_args([])
    assert args.allow_hub_loras is True

    class Started(Exception):
        pass

    def start(model, **options):
        raise Started(options)

    monkeypatch.setattr(Engine, "start", start)
    with pytest.raises(Started) as started:
        app.build_app(args)
    assert started.value.args[0]["allow_hub_loras"] is True
    library = engine._open_lora_library(SHIPPED, None, True)
    assert library.allow_hub_loras is True and engine.loras.allow_hub_loras is False


def test_a_bad_flag_value_stops_start_up(monkeypatch):
    import app
    from pipelines.errors import SettingsError

    monkeypatch.setenv("STENCIL_ALLOW_HUB_LORAS", "maybe")
    with pytest.raises(SettingsError, match="STENCIL_ALLOW_HUB_LORAS='maybe'"):
        app.parse_args([])


def test_offline_says_so_and_asks_nothing(library, hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnavailableError) as refused:
        library.add_hub_lora("stencil-tests/ink", "", "session-a")
    assert str(refused.value) == f"{OFFLINE}, so 'stencil-tests/ink' cannot be fetched"
    assert hub.listed == [] and hub.downloads == []


@pytest.mark.parametrize(
    "error",
    [
        ConnectionError("Failed to establish a new connection"),
        TimeoutError("timed out"),
        OSError("Name or service not known"),
    ],
)
def test_a_hub_that_does_not_answer_reads_as_offline(library, hub, online, error):
    hub.listing_error = error
    with pytest.raises(HubUnavailableError, match=r"cannot be reached .*\(offline\)"):
        library.add_hub_lora("stencil-tests/ink", "", "session-a")
    assert hub.downloads == []


def test_a_download_that_cannot_connect_reads_as_offline(library, hub, online):
    # hf_hub_download's own word for "could not connect and it is not cached".
    hub.download_error = LocalEntryNotFoundError("cannot find the requested files")
    with pytest.raises(HubUnavailableError, match=r"cannot be reached .*\(offline\)"):
        library.add_hub_lora("stencil-tests/ink", "", "session-a")
    assert library.names("session-a") == library.names()


def test_an_unknown_repository_is_named(library, hub, online):
    with pytest.raises(InvalidRequestError, match="no public model repository") as refused:
        library.add_hub_lora("stencil-tests/absent", "", "session-a")
    assert refused.value.field == "hub_repo" and hub.downloads == []


# --------------------------------------------------------------------------------------
# Fetched: one file, pinned, checked and kept like an upload


def test_a_hub_lora_is_used_by_its_session_only_at_the_listed_commit(
    library, hub, online, pipe, tiny_family, tmp_path
):
    base = render_np(load_tiny_pipe(tiny_family))
    library.bind(pipe)
    entry = library.add_hub_lora("stencil-tests/ink", "", "session-a")
    assert hub.downloads == [("stencil-tests/ink", "ink.safetensors", COMMIT)]
    assert entry.name.startswith("hub-") and entry.name.endswith("-ink")
    public = entry.to_public_dict()
    assert public["source"] == "hub" and public["pinned"] is True
    assert (public["repo_id"], public["weight_name"], public["revision"]) == (
        "stencil-tests/ink",
        "ink.safetensors",
        COMMIT,
    )
    assert public["display_name"] == "ink.safetensors from stencil-tests/ink"
    assert "ranks" in public  # checked against the bound model on arrival, like an upload
    # Stored once under its content hash; the scratch download is gone.
    sha256 = hashlib.sha256(INK).hexdigest()
    assert [p.name for p in (tmp_path / "uploads").iterdir()] == [f"{sha256}.safetensors"]

    assert entry.name in library.names("session-a")
    assert entry.name not in library.names("session-b") + library.names()
    with pytest.raises(UnknownNameError):
        library.resolve(entry.name, session_id="session-b")
    with pytest.raises(UnknownNameError):
        library.activate(pipe, [LoraChoice(entry.name, 1.0)], session_id="session-b")

    applied = library.activate(pipe, [LoraChoice(entry.name, 1.0)], session_id="session-a")
    fetched = render_np(pipe)
    assert float(np.abs(fetched - base).mean()) > 1e-3, "the LoRA changed nothing"
    library.activate(pipe, [LoraChoice("tiny-ink", 1.0)])
    assert np.array_equal(render_np(pipe), fetched), "not the same as the same file shipped"
    assert applied == [
        {
            "name": entry.name,
            "display_name": "ink.safetensors from stencil-tests/ink",
            "weight": 1.0,
            "active": True,
            "source": "hub",
            "sha256": sha256,
            "repo_id": "stencil-tests/ink",
            "weight_name": "ink.safetensors",
            "revision": COMMIT,
        }
    ]

    library.forget_session("session-a")
    assert entry.name not in library.names("session-a")
    assert list((tmp_path / "uploads").iterdir()) == []


def test_an_oversize_file_is_refused_before_any_download(tmp_path, hub, online):
    small = LoraLibrary(
        SHIPPED, "tiny", uploads_dir=tmp_path, allow_hub_loras=True, max_upload_mb=0.01
    )
    with pytest.raises(LoraRejectedError, match="above the 10 KB limit; it was not downloaded"):
        small.add_hub_lora("stencil-tests/ink", "", "session-a")
    with pytest.raises(LoraRejectedError, match="it was not downloaded"):
        small.add_hub_lora("stencil-tests/huge", "", "session-a")
    assert hub.listed == ["stencil-tests/ink", "stencil-tests/huge"]
    assert hub.downloads == []


def test_a_file_larger_than_listed_is_not_read_past_the_cap(tmp_path, hub, online):
    small = LoraLibrary(
        SHIPPED, "tiny", uploads_dir=tmp_path, allow_hub_loras=True, max_upload_mb=0.01
    )
    hub.repos["stencil-tests/liar"] = {"small.safetensors": 10}
    hub.served[("stencil-tests/liar", "small.safetensors")] = INK  # 90 KB, listed as 10 bytes
    with pytest.raises(LoraRejectedError, match="the file fetched is above the 10 KB limit"):
        small.add_hub_lora("stencil-tests/liar", "", "session-a")
    assert list(tmp_path.iterdir()) == [], "the scratch download is gone"


def test_only_safetensors_files_are_ever_fetched(library, hub, online):
    with pytest.raises(InvalidRequestError, match="holds no .safetensors file"):
        library.add_hub_lora("stencil-tests/pickles", "", "session-a")
    with pytest.raises(InvalidRequestError) as refused:
        library.add_hub_lora("stencil-tests/pickles", "model.bin", "session-a")
    assert refused.value.field == "hub_file"
    entry = library.add_hub_lora("stencil-tests/mixed", "", "session-a")  # the .bin is skipped
    assert entry.hub.weight_name == "lora.safetensors"
    assert hub.downloads == [("stencil-tests/mixed", "lora.safetensors", COMMIT)]


def test_a_repository_with_several_files_needs_the_file_named(library, hub, online):
    with pytest.raises(InvalidRequestError) as refused:
        library.add_hub_lora("stencil-tests/two", "", "session-a")
    assert refused.value.field == "hub_file"
    assert "holds 2 .safetensors files; name one of: a.safetensors, styles/b.safetensors" in str(
        refused.value
    )
    with pytest.raises(InvalidRequestError, match="no such file; name one of: a.safetensors"):
        library.add_hub_lora("stencil-tests/two", "c.safetensors", "session-a")
    assert hub.downloads == []
    first = library.add_hub_lora("stencil-tests/two", "a.safetensors", "session-a")
    second = library.add_hub_lora("stencil-tests/two", "styles/b.safetensors", "session-a")
    assert first.name != second.name, "two files of one repository keep two names"
    assert {first.name, second.name} <= set(library.names("session-a"))


def test_the_listing_names_a_bounded_number_of_files(library, hub, online):
    hub.repos["stencil-tests/many"] = {f"v{i:02}.safetensors": INK for i in range(25)}
    with pytest.raises(InvalidRequestError, match=r"v09.safetensors and 15 more$"):
        library.add_hub_lora("stencil-tests/many", "", "session-a")


def test_fetched_bytes_pass_the_upload_checks(library, hub, online):
    with pytest.raises(LoraRejectedError, match="evil.safetensors from stencil-tests/evil"):
        library.add_hub_lora("stencil-tests/evil", "", "session-a")
    hub.served[("stencil-tests/ink", "ink.safetensors")] = NEON  # not the bytes it listed
    with pytest.raises(LoraRejectedError, match="not those the Hub lists"):
        library.add_hub_lora("stencil-tests/ink", "", "session-a")
    assert library.names("session-a") == library.names()


def test_a_full_session_is_refused_before_the_download(tmp_path, hub, online):
    library = LoraLibrary(
        SHIPPED, "tiny", uploads_dir=tmp_path, allow_hub_loras=True, max_uploads_per_session=1
    )
    library.add_hub_lora("stencil-tests/ink", "", "session-a")
    with pytest.raises(InvalidRequestError, match="may hold 1 uploaded LoRAs"):
        library.add_hub_lora("stencil-tests/mixed", "", "session-a")
    assert [d[0] for d in hub.downloads] == ["stencil-tests/ink"]


# --------------------------------------------------------------------------------------
# The page and the API


def _component_ids(demo) -> dict[str, dict]:
    return {
        c["props"]["elem_id"]: c["props"]
        for c in demo.config["components"]
        if c.get("props", {}).get("elem_id")
    }


def _endpoint(demo, api_name: str):
    (found,) = [d for d in demo.fns.values() if d.api_name == api_name]
    return found.fn


def test_with_the_flag_off_the_page_has_no_hub_control_and_the_api_says_why(engine, tmp_path):
    import gradio as gr

    from pipelines.service import StencilService
    from ui import create_demo

    assert engine.loras.allow_hub_loras is False  # the default
    demo = create_demo(StencilService(engine, tmp_path / "out"))
    assert not {"hub_repo", "hub_file", "hub_add"} & set(_component_ids(demo))
    add = _endpoint(demo, "add_hub_lora")
    with pytest.raises(gr.Error, match="turned off on this server.*--allow-hub-loras"):
        add("stencil-tests/ink", "", request=SimpleNamespace(session_hash="page-off"))


def test_with_the_flag_on_the_page_shows_the_hub_control(engine, tmp_path, monkeypatch):
    from pipelines.service import StencilService
    from ui import create_demo

    monkeypatch.setattr(engine.loras, "allow_hub_loras", True)
    demo = create_demo(StencilService(engine, tmp_path / "out"))
    shown = _component_ids(demo)
    assert {"hub_repo", "hub_file", "hub_add"} <= set(shown)
    assert all(shown[key].get("visible", True) is not False for key in ("hub_repo", "hub_add"))


def test_the_api_adds_a_hub_lora_for_the_calling_client_only(
    engine, tmp_path, monkeypatch, hub, online
):
    import socket

    from gradio_client import Client

    from pipelines.service import StencilService
    from ui import create_demo

    monkeypatch.setattr(engine.loras, "allow_hub_loras", True)
    demo = create_demo(StencilService(engine, tmp_path / "out"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    demo.launch(server_port=port, prevent_thread_lock=True, quiet=True)
    mine, theirs = (Client(f"http://127.0.0.1:{port}/", verbose=False) for _ in range(2))
    try:
        entry = mine.predict(hub_repo="stencil-tests/ink", api_name="/add_hub_lora")
        assert entry["repo_id"] == "stencil-tests/ink" and entry["revision"] == COMMIT
        job = {"prompt": "a fox", "seed": 7, "steps": 2, "width": 64, "height": 64}
        plain, *_ = mine.predict(**job, api_name="/generate")
        styled, _maps, _seed, recipe, _snippet, _preview = mine.predict(
            **job, loras=f"{entry['name']}:1", api_name="/generate"
        )
        assert recipe["loras"][0]["revision"] == COMMIT
        assert not np.array_equal(_pixels(styled), _pixels(plain))
        with pytest.raises(Exception, match="unknown LoRA"):
            theirs.predict(**job, loras=f"{entry['name']}:1", api_name="/generate")
        with pytest.raises(Exception, match=r"hub_repo='\.\./x' is not allowed"):
            mine.predict(hub_repo="../x", hub_file="", api_name="/add_hub_lora")
        # A path in the repository reaches the client whole (the edge drops machine paths).
        with pytest.raises(Exception, match="name one of: a.safetensors, styles/b.safetensors"):
            mine.predict(hub_repo="stencil-tests/two", api_name="/add_hub_lora")
    finally:
        demo.close()
        for client in (mine, theirs):
            engine.loras.forget_session(client.session_hash)


def _pixels(gallery) -> np.ndarray:
    from PIL import Image

    item = gallery[0]
    path = item["image"] if isinstance(item, dict) else item[0]
    return np.asarray(Image.open(path).convert("RGB"))


def test_messages_keep_paths_in_a_repository_and_still_drop_machine_paths():
    from pipelines.model_check import without_paths

    listing = "name one of: a.safetensors, styles/v1/b.safetensors (in owner/name)"
    assert without_paths(listing) == listing
    assert without_paths("cannot open '/srv/stencil/cache/x.safetensors'") == (
        "cannot open 'x.safetensors'"
    )
    assert without_paths("see /srv/stencil/cache/x.bin") == "see x.bin"
