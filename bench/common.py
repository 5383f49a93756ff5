"""Helpers shared by Stencil's benchmarks (bench/*.py): environment, interleaved timing,
memory accounting, markdown output, and the random-weight Stable Diffusion 1.5 folder.

Benchmarks here compare two ways of doing the same work in one process, timed A, B, B, A ...
so that the noise of a shared machine lands on both sides; they report medians and ratios,
never a lone absolute number. Nothing here runs at import: a benchmark calls `setup()`
first, before anything imports huggingface_hub (which reads its settings at import time).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH_CACHE = ROOT / ".cache" / "bench"
# A Hugging Face cache private to the benchmarks: it holds stand-in files under real Hub ids
# (see `link_into_hub_cache`) and must never mix with the user's own cache.
BENCH_HUB_CACHE = BENCH_CACHE / "hub"
RESULTS = ROOT / "bench" / "results"

# Bump when anything that `write_sd15_random` writes changes: old folders are then rebuilt.
SD15_RANDOM_VERSION = "v1"
SD15_RANDOM_SEED = 15_2026
SD15_RANDOM_DTYPE = "bfloat16"  # what the real-size benchmarks run in on the CPU
SD15_RANDOM_STAMP = "bench-model.json"  # records the version and dtype a folder was built with


def setup() -> None:
    """Offline, quiet, and writing only under .cache/bench; the repository root importable."""
    BENCH_CACHE.mkdir(parents=True, exist_ok=True)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["HF_HUB_CACHE"] = str(BENCH_HUB_CACHE)
    os.environ["STENCIL_CACHE_DIR"] = str(BENCH_CACHE)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(BENCH_CACHE / "inductor"))
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import warnings

    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*(mediapipe|Overwriting .* in registry).*")
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging, hub_logging):
        library.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    # Stand-in preprocessor weights are expected here; the engine's warning is not news.
    logging.getLogger("pipelines").setLevel(logging.ERROR)


# ---- timing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One side of a comparison. Only `run` is timed.

    `prepare(item)` builds what `run` needs (its result is `run`'s argument; the item itself
    when there is no prepare); `finish(item, result)` inspects or drops the result.
    """

    run: Callable[[Any], Any]
    prepare: Callable[[Any], Any] | None = None
    finish: Callable[[Any, Any], None] | None = None


def interleave(cases: Mapping[str, Case], items: Iterable[Any]) -> dict[str, list[float]]:
    """Seconds per case per item, the cases run back to back on each item.

    The order alternates (A B, then B A) so that a slow spell of the machine is shared, and
    garbage is collected before every timed run, never inside one.
    """
    names = list(cases)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for index, item in enumerate(items):
        for name in names if index % 2 == 0 else reversed(names):
            case = cases[name]
            argument = case.prepare(item) if case.prepare else item
            gc.collect()
            started = time.perf_counter()
            result = case.run(argument)
            seconds[name].append(time.perf_counter() - started)
            del argument
            if case.finish:
                case.finish(item, result)
            del result
    gc.collect()
    return seconds


@dataclass(frozen=True)
class Comparison:
    """Timings of a baseline and a contender, measured interleaved on the same items."""

    baseline: list[float]
    contender: list[float]

    @property
    def ratio_of_medians(self) -> float:
        """How many times longer the baseline takes (> 1: the contender is faster)."""
        return statistics.median(self.baseline) / statistics.median(self.contender)

    @property
    def median_paired_ratio(self) -> float:
        """The same ratio taken pair by pair (each pair ran back to back), then the median."""
        return statistics.median(b / c for b, c in zip(self.baseline, self.contender))

    @property
    def n(self) -> int:
        return len(self.baseline)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


# ---- memory -------------------------------------------------------------------------------


def memory_snapshot(*, trim: bool = True) -> dict[str, int]:
    """This process's memory in bytes, from /proc/self/smaps and /proc/self/status.

    Rss, Pss, Pss_Anon, Pss_File: summed over all mappings (as smaps_rollup gives them).
    Pss_Weights: PSS of the memory-mapped *.safetensors files. Pss_Model: Pss_Anon +
    Pss_Weights, the figure to compare: it leaves out code pages of shared libraries, whose
    share of PSS moves with whatever other processes on the machine map libtorch. VmHWM:
    peak RSS of the process so far.

    PSS charges a page shared with other processes in part, and a page this process maps
    twice once: the honest figure for memory-mapped weights, where RSS counts every
    mapping of the same file page again.
    """
    gc.collect()
    if trim:
        _malloc_trim()
    values = {"Pss_Weights": 0}
    with open("/proc/self/smaps_rollup") as rollup:
        for line in rollup:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss", "Pss_Anon", "Pss_File"):
                values[key] = int(rest.split()[0]) * 1024
    weights_file = False
    with open("/proc/self/smaps") as smaps:  # per mapping: header line, then its fields
        for line in smaps:
            key, _, rest = line.partition(":")
            if not rest or " " in key:
                weights_file = line.rstrip().endswith(".safetensors")
            elif key == "Pss" and weights_file:
                values["Pss_Weights"] += int(rest.split()[0]) * 1024
    values["Pss_Model"] = values["Pss_Anon"] + values["Pss_Weights"]
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                values["VmHWM"] = int(line.split()[1]) * 1024
    return values


MEMORY_KEYS = ("Rss", "Pss", "Pss_Anon", "Pss_File", "Pss_Weights", "Pss_Model")


def memory_growth(after: Mapping[str, int], before: Mapping[str, int]) -> dict[str, int]:
    return {key: after[key] - before[key] for key in MEMORY_KEYS}


def _malloc_trim() -> None:
    """Hand freed heap back to the kernel, so that memory let go of stops counting."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def module_tensors(modules: Iterable[Any]) -> Iterable[Any]:
    """Every parameter and buffer of every torch module given (None entries skipped)."""
    for module in modules:
        if module is None or not hasattr(module, "parameters"):
            continue
        yield from module.parameters()
        yield from module.buffers()


def unique_tensor_bytes(modules: Iterable[Any]) -> int:
    """Bytes of weights held, each storage counted once however many modules share it.

    Keyed by (data_ptr, size): a module shared between pipelines counts once, a second
    copy loaded from the same file counts again (on a GPU it is a second copy; on the CPU
    two memory maps of one file may share pages, which only PSS shows).
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in module_tensors(modules):
        size = tensor.numel() * tensor.element_size()
        key = (tensor.data_ptr(), size)
        if key not in seen:
            seen.add(key)
            total += size
    return total


def touch_weights(modules: Iterable[Any]) -> None:
    """Read every weight once, so that memory-mapped pages are resident before PSS is read."""
    import torch

    with torch.inference_mode():
        for tensor in module_tensors(modules):
            if tensor.numel():
                tensor.view(-1)[:: max(1, 4096 // tensor.element_size())].float().sum()


def pipeline_modules(pipe: Any) -> list[Any]:
    """The torch modules of a diffusers pipeline (UNet, VAE, text encoder, ControlNet ...)."""
    return [value for value in pipe.components.values() if hasattr(value, "parameters")]


# ---- subprocess probes ----------------------------------------------------------------------


def run_probe(script: Path, arguments: Sequence[str], *, timeout: float = 900) -> dict[str, Any]:
    """Run `script arguments` in a fresh interpreter; its last stdout line is a JSON object.

    Memory is measured in a process of its own, so that what one approach loaded never
    shows in the other's numbers.
    """
    command = [sys.executable, str(script), *arguments]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"probe {' '.join(arguments)} failed (exit {done.returncode}):\n{done.stderr[-3000:]}"
        )
    return json.loads(lines[-1])


# ---- reporting ----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`th percentile, linearly interpolated between the two nearest values."""
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q))


def seconds_text(seconds: float) -> str:
    sign, seconds = ("-" if seconds < 0 else ""), abs(seconds)
    if seconds < 1e-3:
        return f"{sign}{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{sign}{seconds * 1e3:.1f} ms"
    return f"{sign}{seconds:.2f} s"


def bytes_text(size: float) -> str:
    sign = "-" if size < 0 else ""
    size = abs(size)
    if size >= 2**30:
        return f"{sign}{size / 2**30:.2f} GiB"
    return f"{sign}{size / 2**20:.1f} MiB"


def ratio_text(ratio: float) -> str:
    return f"{ratio:.0f}x" if ratio >= 100 else f"{ratio:.2f}x"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table; numbers right-aligned, text left-aligned by the first row."""
    rows = [[str(cell) for cell in row] for row in rows]
    numeric = [
        bool(rows) and all(_looks_numeric(row[column]) for row in rows)
        for column in range(len(headers))
    ]
    lines = ["| " + " | ".join(headers) + " |"]
    lines.append("|" + "|".join("---:" if right else "---" for right in numeric) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _looks_numeric(text: str) -> bool:
    return bool(text) and (text[0].isdigit() or (text[0] == "-" and text[1:2].isdigit()))


def machine_lines(dtype_note: str) -> list[str]:
    """What ran the benchmark, as markdown bullet lines."""
    import diffusers
    import torch
    import transformers

    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line)
    except (OSError, StopIteration):
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [
        f"- CPU: {cpu}, {os.cpu_count()} logical CPUs ({usable} usable), no GPU used",
        f"- Python {platform.python_version()}, torch {torch.__version__}, "
        f"diffusers {diffusers.__version__}, transformers {transformers.__version__}",
        f"- dtype: {dtype_note}",
        f"- load average at start (1/5/15 min): {' / '.join(f'{x:.2f}' for x in os.getloadavg())}"
        " (the machine is shared: other processes ran tests meanwhile)",
    ]


def command_line() -> str:
    """The command that ran this benchmark, as someone would type it in the repository."""
    import shlex

    python = _relative_to_root(Path(sys.executable))
    script = _relative_to_root(Path(sys.argv[0]).resolve())
    return shlex.join([python, script, *sys.argv[1:]])


def _relative_to_root(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


# ---- the real-size model: SD 1.5's shapes, random weights -----------------------------------


def sd15_random_dir(cache_root: Path = BENCH_CACHE) -> Path:
    return Path(cache_root) / "sd15-random"


def ensure_sd15_random(
    cache_root: Path = BENCH_CACHE, controlnets: Sequence[str] = ("canny", "pose", "depth")
) -> Path:
    """A diffusers folder shaped exactly like Stable Diffusion 1.5, with seeded random weights.

    `pipelines.sd_builder` at `SD15_SIZE` (the tokenizer is Stencil's offline BPE: its ids
    are small, so the full-size 49408-token embedding reads them), with a `controlnet-<type>/`
    ControlNet per type. Written once in SD15_RANDOM_DTYPE, aside and renamed into place;
    rebuilt when SD15_RANDOM_VERSION or the dtype changes, or a ControlNet is missing.
    """
    from pipelines.atomic_folder import build_atomically

    target = sd15_random_dir(cache_root)
    stamp = {"version": SD15_RANDOM_VERSION, "dtype": SD15_RANDOM_DTYPE}

    def is_complete(folder: Path) -> bool:
        stamp_file = folder / SD15_RANDOM_STAMP
        return (
            stamp_file.is_file()
            and json.loads(stamp_file.read_text()) == stamp
            and all(
                (folder / f"controlnet-{kind}" / "config.json").is_file() for kind in controlnets
            )
        )

    def write(folder: Path) -> None:
        print(f"building the random-weight SD 1.5 folder in {target} (once) ...", flush=True)
        started = time.perf_counter()
        write_sd15_random(folder, controlnets)
        (folder / SD15_RANDOM_STAMP).write_text(json.dumps(stamp))
        print(f"  built in {time.perf_counter() - started:.0f} s", flush=True)

    return build_atomically(target, write, is_complete=is_complete)


def write_sd15_random(folder: Path, controlnets: Sequence[str]) -> None:
    from pipelines.sd_builder import SD15_SIZE, write_sd_family

    size = replace(SD15_SIZE, seed=SD15_RANDOM_SEED)
    write_sd_family(folder, size, controlnets, dtype=SD15_RANDOM_DTYPE)


def link_into_hub_cache(folder: Path, repo_id: str, hub_cache: Path = BENCH_HUB_CACHE) -> None:
    """Make `repo_id` resolve, offline, to the files of `folder` (symlinks, no copy).

    The snapshot is laid out as huggingface_hub caches a download (`pipelines.hub`), so the
    engine's own `from_pretrained(repo_id)` loads these stand-ins exactly as it would load
    downloaded weights. Only ever used with the bench's private cache (BENCH_HUB_CACHE).
    """
    import hashlib

    from pipelines.hub import hub_snapshot

    revision = hashlib.sha1(f"stencil-bench:{folder.resolve()}".encode()).hexdigest()
    snapshot = hub_snapshot(hub_cache, repo_id, revision)
    snapshot.mkdir(parents=True, exist_ok=True)
    for source in Path(folder).iterdir():
        link = snapshot / source.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(source.resolve())


def bench_parser(
    description: str, probes: Sequence[str], sizes: Mapping[str, Any], results_file: Path
) -> argparse.ArgumentParser:
    """The arguments both benchmarks take: sizes, threads, where the results go, and the
    hidden probe switches with which a benchmark runs one memory probe in a fresh
    interpreter."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--sizes", default="tiny,real", help="comma list of: tiny, real")
    parser.add_argument("--threads", type=int, help="torch threads (default 1; see Size)")
    parser.add_argument(
        "--output",
        type=Path,
        default=results_file,
        help=f"results file (default {results_file.relative_to(ROOT)}; a quick trial run "
        "can write elsewhere and leave the published results alone)",
    )
    parser.add_argument("--probe", choices=probes, help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=list(sizes), help=argparse.SUPPRESS)
    return parser


def with_threads(sizes: Mapping[str, Any], threads: int | None) -> dict[str, Any]:
    """The sizes, each with `threads` torch threads where given (sizes are dataclasses)."""
    return {
        name: replace(size, threads=threads) if threads else size for name, size in sizes.items()
    }


def parse_size_names(parser, text: str, known: Mapping[str, Any]) -> list[str]:
    """`--sizes tiny,real` as a list, or an argparse error naming the sizes there are."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names or any(name not in known for name in names):
        parser.error(f"--sizes takes {', '.join(known)}, comma-separated")
    return names


def report_head(title: str, began: float, dtype_note: str) -> list[str]:
    """A results file's opening lines: its title, when and by what command it was measured
    (and in how long since `began`, a `time.perf_counter()`), and the machine."""
    import datetime

    return [
        f"# {title}",
        "",
        f"Measured {datetime.date.today().isoformat()} in {time.perf_counter() - began:.0f} s"
        f" with `{command_line()}`.",
        "",
        *machine_lines(dtype_note),
    ]


def write_table_report(
    path: Path, title: str, began: float, dtype_note: str, how: str, table: str
) -> None:
    """A results file of one table: `report_head`, a line on how it was measured, the table."""
    write_report("\n".join([*report_head(title, began, dtype_note), "", how, "", table, ""]), path)


def write_report(text: str, path: Path) -> None:
    """Write the results file, print it, and say where it went."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print(text)
    print(f"written to {_relative_to_root(path)}", file=sys.stderr)


def run_probes(script: Path, probes: Iterable[str], size: Any, extra: Sequence[str] = ()):
    """Each memory probe of `script` in its own interpreter, at `size`, timed for the log."""
    out = {}
    for name in probes:
        started = time.perf_counter()
        arguments = ["--probe", name, "--size", size.name, "--threads", str(size.threads)]
        out[name] = run_probe(script, [*arguments, *extra])
        print(f"  probe {name}: {time.perf_counter() - started:.0f} s", flush=True)
    return out


def plain_run_of(
    plain: Any, request: Any, *, scheduler_config: Any = None, **extra: Any
) -> Callable[[], Any]:
    """`request` as a plain diffusers call on `plain`, the baseline the engine's own run of
    it is compared with: the same scheduler (made fresh each run from `scheduler_config`,
    default `plain`'s own, as the engine does), steps, guidance, size and seeded CPU
    generator, plus `extra` (a ControlNet's `image`), so both make the same image; returns
    a function that makes it."""
    import torch

    from pipelines.schedulers import get_scheduler_spec

    spec = get_scheduler_spec(request.scheduler)
    config = plain.scheduler.config if scheduler_config is None else scheduler_config

    def run():
        plain.scheduler = spec.build(config)
        return plain(
            request.prompt,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            width=request.width,
            height=request.height,
            generator=torch.Generator().manual_seed(request.seed),
            **extra,
        ).images[0]

    return run
