"""Say which file of a model folder is broken, on one line, without machine paths.

diffusers' own errors on a damaged folder are long, name absolute cache paths, and often do
not say which component failed. Operators get the full error in the log; users and the page
get this module's short description.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

# An absolute path inside a message: replaced by its last part, so no machine path leaves.
# One glued to a name before it (a Hub id's `owner/name/file.safetensors`) is no machine
# path: it is left whole.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.-])(?:[A-Za-z]:)?(?:[\\/][^\s'\"`:,;()\[\]<>]+){2,}")


def without_paths(text: str) -> str:
    """`text` with every absolute path shortened to its file or folder name."""
    return _ABSOLUTE_PATH.sub(lambda match: Path(match.group()).name or "…", text)


def model_folder(source: str) -> Path | None:
    """The folder `from_pretrained(source)` reads: a local folder, or a cached Hub snapshot."""
    if Path(source).is_dir():
        return Path(source)
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(source, "model_index.json")
    except Exception:  # not a valid repo id: there is no folder to look into
        return None
    return Path(found).parent if isinstance(found, str) else None


def describe_load_failure(source: str, error: BaseException) -> str:
    """The first broken file of `source` and what is wrong with it, else the error itself."""
    folder = model_folder(source)
    problem = first_broken_file(folder) if folder is not None else None
    return problem or error_line(error)


def describe_component_failure(source: str, error: BaseException) -> str:
    """The same for one component loaded alone (a ControlNet): its folder's first damaged
    file, else the error itself."""
    folder = Path(source)
    problem = _component_problem(folder) if folder.is_dir() else None
    return problem or error_line(error)


def error_line(error: BaseException) -> str:
    """An error as one short line, without machine paths."""
    lines = without_paths(str(error)).splitlines() or [""]
    return f"{type(error).__name__}: {lines[0][:300]}"


def first_broken_file(folder: Path) -> str | None:
    """A pipeline folder's first missing or damaged file, in words (None: none found)."""
    index = folder / "model_index.json"
    try:
        components = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "model_index.json is missing or not JSON"
    for name, value in sorted(components.items()):
        if name.startswith("_") or not isinstance(value, list) or value[0] is None:
            continue
        problem = _component_problem(folder / name)
        if problem is not None:
            return f"{name}: {problem}"
    return None


def _component_problem(folder: Path) -> str | None:
    if not folder.is_dir():
        return "its folder is missing"
    files = [path for path in folder.iterdir() if path.is_file()]
    if not files:
        return "its folder is empty"
    for path in sorted(p for p in files if p.suffix == ".safetensors"):
        problem = safetensors_problem(path)
        if problem is not None:
            return f"{path.name} {problem}"
    return None


def safetensors_problem(path: Path) -> str | None:
    """Whether a .safetensors file is whole: its header parses and its data is all there."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return "is truncated (no header)"
            (header_bytes,) = struct.unpack("<Q", head)
            if header_bytes > 100 * 2**20:
                return "has an impossible header size"
            header = json.loads(handle.read(header_bytes))
        ends = [
            entry["data_offsets"][1]
            for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict)
        ]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return "has a damaged header"
    expected = 8 + header_bytes + max(ends, default=0)
    actual = path.stat().st_size
    if actual < expected:
        return f"is truncated ({actual} of {expected} bytes)"
    return None
