"""Soak: hundreds of small requests against the running app; its memory and disk as they go.

    .venv/bin/python bench/soak.py [--requests 300] [--every 25] [--profiles default,short]
                                   [--output PATH]

Starts `python app.py` on the tiny model (offline, everything under `.cache/bench/soak/`),
then sends it requests through gradio_client, as API users do: in turn a prompt-only
generation, a generation steered by a canny map of a freshly uploaded image, and a map
preview of another fresh upload (every fifth preview a pose map); 2 steps, 64x64 px, a new
seed and a new image each time, so no result is the same file as another. Every `--every`
requests it records the app's RSS (`/proc/<pid>/status`) and what Stencil's output folder
and Gradio's cache hold (files and bytes).

Profiles (each a fresh app and fresh folders):

- **default**: the budgets a public Space gets by default (files live an hour, so over a
  few minutes nothing expires yet: the table shows the growth per request that the age
  and byte budgets then bound);
- **short**: budgets a soak can watch act (outputs and Gradio's files live 10 s, Gradio
  sweeps every 2 s, outputs keep to 1 MB).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import (  # noqa: E402
    BENCH_CACHE,
    RESULTS,
    ROOT,
    command_line,
    machine_lines,
    markdown_table,
    run_probe,
    write_report,
)

SOAK_CACHE = BENCH_CACHE / "soak"
PROFILES = {
    "default": {},
    "short": {
        "STENCIL_OUTPUT_MAX_AGE_S": "10",
        "STENCIL_OUTPUT_MAX_MB": "1",
        "STENCIL_GRADIO_CACHE_MAX_AGE_S": "10",
        "STENCIL_GRADIO_CACHE_SWEEP_S": "2",
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--every", type=int, default=25, help="requests between samples")
    parser.add_argument("--profiles", default="default,short", help="comma list of profiles")
    parser.add_argument("--output", type=Path, default=RESULTS / "soak.md")
    parser.add_argument("--probe-map", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe_map:
        return print(json.dumps(map_probe(*args.probe_map)))
    names = [name for name in args.profiles.split(",") if name]
    if not names or any(name not in PROFILES for name in names):
        parser.error(f"--profiles takes {', '.join(PROFILES)}")
    started = time.perf_counter()
    runs = {name: soak(name, args.requests, args.every) for name in names}
    costs = [run_probe(Path(__file__), ["--probe-map", *map(str, case)]) for case in MAP_CASES]
    write_report(report(runs, costs, args, time.perf_counter() - started), args.output)


# ---- one run --------------------------------------------------------------------------------


class App:
    """`python app.py` in a subprocess with its own cache folder and budgets."""

    def __init__(self, profile: str):
        self.folder = SOAK_CACHE / profile
        shutil.rmtree(self.folder, ignore_errors=True)
        (self.folder / "client").mkdir(parents=True)
        self.port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("STENCIL_", "GRADIO_"))}
        env.update(
            HF_HUB_OFFLINE="1",
            HF_HUB_DISABLE_TELEMETRY="1",
            GRADIO_ANALYTICS_ENABLED="False",
            GRADIO_SERVER_PORT=str(self.port),
            STENCIL_MODEL="tiny",
            # Everything the run writes (the tiny model and stand-in weights, 25 MB, built
            # at start; outputs, Gradio's cache, uploads) lives in the profile's folder.
            STENCIL_CACHE_DIR=str(self.folder),
            TORCHINDUCTOR_CACHE_DIR=str(BENCH_CACHE / "inductor"),
            **PROFILES[profile],
        )
        self.log = open(self.folder / "app.log", "w")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py")],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=self.log,
        )
        self.url = f"http://127.0.0.1:{self.port}/"
        self._wait_until_up()

    def _wait_until_up(self) -> None:
        deadline = time.time() + 300
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"app exited: {(self.folder / 'app.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(self.url, timeout=2)
                return
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)

    def sample(self, done: int, elapsed: float) -> dict:
        outputs = _files(self.folder / "outputs")
        gradio = _files(self.folder / "gradio")
        return {
            "requests": done,
            "seconds": elapsed,
            "rss_mib": _rss_kib(self.process.pid) / 1024,
            "output_files": len(outputs),
            "output_bytes": sum(outputs),
            "gradio_files": len(gradio),
            "gradio_bytes": sum(gradio),
        }

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        self.log.close()


def soak(profile: str, requests: int, every: int) -> dict:
    from gradio_client import Client

    print(f"profile {profile}: starting the app", flush=True)
    app = App(profile)
    try:
        client = Client(app.url, verbose=False, download_files=str(app.folder / "client"))
        samples = [app.sample(0, 0.0)]
        started = time.perf_counter()
        for index in range(requests):
            send(client, index, app.folder / "client")
            if (index + 1) % every == 0 or index + 1 == requests:
                samples.append(app.sample(index + 1, time.perf_counter() - started))
                print(f"  {samples[-1]}", flush=True)
        return {"samples": samples, "env": PROFILES[profile]}
    finally:
        app.stop()


def send(client, index: int, scratch: Path) -> None:
    """Request `index` of the mix: prompt only, canny-steered, or a map preview."""
    from gradio_client import handle_file

    small = {"steps": 2, "width": 64, "height": 64, "seed": index}
    kind = index % 3
    if kind == 0:
        client.predict(prompt=f"a fox, take {index}", **small, api_name="/generate")
        return
    photo = fresh_image(index, scratch)
    if kind == 1:
        client.predict(
            prompt=f"a house, take {index}",
            control_type="canny",
            control_image=handle_file(str(photo)),
            control_resolution=64,
            **small,
            api_name="/generate",
        )
    else:
        control = "pose" if index % 5 == 2 else "canny"
        client.predict(
            control_type=control,
            control_image=handle_file(str(photo)),
            control_resolution=64,
            api_name="/preview_control",
        )
    photo.unlink()


def fresh_image(index: int, scratch: Path) -> Path:
    """A 64x64 picture no other request sends (so every upload is a new file)."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(index).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    path = scratch / f"photo-{index}.png"
    Image.fromarray(pixels).save(path)
    return path


# ---- measuring ----------------------------------------------------------------------------


def _files(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return [p.lstat().st_size for p in folder.rglob("*") if p.is_file()]


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- the results file ------------------------------------------------------------------------


# ---- what one map costs ----------------------------------------------------------------------

# (width, height, detection resolution) of the image a pose map is made from: the default
# resolution; the map budget's limit (1024x1024, or 4:1 at 512); over it (2 and 4 MP), the
# sizes the budget refuses, measured with the budget lifted.
MAP_CASES = [
    (512, 512, 512),
    (1024, 1024, 1024),
    (2048, 512, 512),
    (2048, 1024, 1024),
    (4096, 1024, 1024),
]


def map_probe(width: int, height: int, resolution: int) -> dict:
    """One pose map of a noise image, in a fresh interpreter: seconds and peak RSS growth
    (the detector is loaded and run once on a small image first)."""
    import resource

    # The budget is lifted here, so that what it refuses can be measured.
    lifted = str(16 * 2**20)
    os.environ.update(
        HF_HUB_OFFLINE="1", STENCIL_CACHE_DIR=str(BENCH_CACHE), STENCIL_MAX_MAP_PIXELS=lifted
    )
    import numpy as np
    from PIL import Image

    from pipelines.controls import make_map

    rng = np.random.default_rng(0)
    make_map("pose", Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), 64, {})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    started = time.perf_counter()
    control_map = make_map("pose", image, resolution, {})
    seconds = time.perf_counter() - started
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    size = control_map.size
    return {"case": [width, height, resolution], "map": size, "seconds": seconds, "peak_kib": grown}


def report(runs: dict, costs: list[dict], args, seconds: float) -> str:
    lines = [
        "# Soak: memory and disk over many requests",
        "",
        f"Generated by `bench/soak.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}."
        " Command (from the repository root):",
        "",
        f"    {command_line()}",
        "",
        f"Total runtime {seconds / 60:.1f} min. {args.requests} requests per profile,"
        " through gradio_client against `python app.py` on the tiny model: in turn a"
        " prompt-only generation, a canny-steered generation of a fresh upload, and a map"
        " preview of a fresh upload (every fifth a pose map); 2 steps, 64x64 px.",
        "",
        *machine_lines("float32 (tiny model)"),
        "",
        "RSS: the app process (`VmRSS`). Outputs: Stencil's output folder"
        " (`<cache>/outputs`). Gradio: Gradio's cache (`<cache>/gradio`: uploads, Gradio's"
        " copies of results, and the page's four example images).",
    ]
    for name, run in runs.items():
        settings = ", ".join(f"`{k}={v}`" for k, v in run["env"].items()) or "none (defaults)"
        lines += ["", f"## Profile `{name}`", "", f"Budget settings: {settings}.", ""]
        lines += [table(run["samples"]), "", summary(run["samples"])]
    from pipelines.settings import MAX_MAP_PIXELS

    budget = MAX_MAP_PIXELS.default
    lines += [
        "",
        "## One pose map, by its size",
        "",
        "Each in a fresh interpreter (stand-in OpenPose weights, a noise image), after one"
        " small warm-up map: the time of `make_map`, and how far the peak RSS rose. Maps"
        f" over the default budget (`STENCIL_MAX_MAP_PIXELS`, {budget} pixels) are refused"
        " by the app; they were measured here with the budget lifted.",
        "",
        markdown_table(
            ["image", "resolution", "map", "megapixels", "seconds", "peak RSS growth MiB"]
            + ["within the budget"],
            [
                [
                    f"{c['case'][0]}x{c['case'][1]}",
                    c["case"][2],
                    f"{c['map'][0]}x{c['map'][1]}",
                    f"{c['map'][0] * c['map'][1] / 1e6:.2f}",
                    f"{c['seconds']:.1f}",
                    f"{c['peak_kib'] / 1024:.0f}",
                    "yes" if c["map"][0] * c["map"][1] <= budget else "no: refused",
                ]
                for c in costs
            ],
        ),
    ]
    return "\n".join(lines) + "\n"


def summary(samples: list[dict]) -> str:
    """The run in one line: the last half's growth, where a bound shows as none."""
    middle, last = samples[len(samples) // 2], samples[-1]
    requests = last["requests"] - middle["requests"]

    def per_request(key: str) -> str:
        return f"{(last[key] - middle[key]) / 1024 / max(requests, 1):+.1f} KiB"

    peak = max(s["output_files"] for s in samples), max(s["gradio_files"] for s in samples)
    return (
        f"Over the last {requests} requests, per request: outputs {per_request('output_bytes')},"
        f" Gradio's cache {per_request('gradio_bytes')}; RSS"
        f" {last['rss_mib'] - middle['rss_mib']:+.0f} MiB in all. Most files at a sample:"
        f" {peak[0]} outputs, {peak[1]} in Gradio's cache."
    )


def table(samples: list[dict]) -> str:
    headers = ["requests", "seconds", "RSS MiB", "output files", "output KiB"]
    headers += ["Gradio files", "Gradio KiB"]
    rows = [
        [
            s["requests"],
            f"{s['seconds']:.0f}",
            f"{s['rss_mib']:.0f}",
            s["output_files"],
            f"{s['output_bytes'] / 1024:.0f}",
            s["gradio_files"],
            f"{s['gradio_bytes'] / 1024:.0f}",
        ]
        for s in samples
    ]
    return markdown_table(headers, rows)


if __name__ == "__main__":
    main()
