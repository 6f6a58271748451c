"""Shared pieces of the benchmarks: timing, peak memory, the machine, and writing JSON + Markdown.

Benchmarks print and save ratios; they never assert timings (the machine is shared and noisy).
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from diffcache.metrics.latency import measure  # noqa: F401  (re-exported for the sections)

RESULTS = Path(__file__).resolve().parent / "results"


# ============================================================================================ machine
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on (threads and load matter on a shared machine)."""
    info = {"nproc": os.cpu_count(), "cpu": cpu_model(), "torch_threads": torch.get_num_threads(),
            "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()], "torch": torch.__version__,
            "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ============================================================================================ memory
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
TIMING_MMAP, TIMING_TRIM = 32 * 2**20, 64 * 2**20


def _libc(fn: str, *args: int) -> bool:
    try:
        import ctypes

        return bool(getattr(ctypes.CDLL("libc.so.6"), fn)(*(int(a) for a in args)))
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def freed_memory_returned(threshold: int = 128 * 1024) -> Iterator[bool]:
    """Inside: an honest CPU peak-memory figure. glibc's *dynamic* mmap threshold grows after a large block is
    freed, so later tensors come from the heap, stay resident and an RSS delta reads 0; a fixed small
    threshold keeps large tensors mmapped (returned to the OS when freed). After: 32 MiB mmap / 64 MiB trim,
    where the dynamic thresholds settle after the first large free, so timings run as they would without
    this. (Left at 128 KiB, every fresh tensor page-faults: a DiT-S/2 training step ran 1.5-1.75x slower.)
    Linux/glibc only; yields whether the threshold was set."""
    ok = _libc("mallopt", M_MMAP_THRESHOLD, threshold)
    _libc("malloc_trim", 0)  # free heap pages that earlier (timed) calls left resident would serve this call unseen
    try:
        yield ok
    finally:
        if ok:
            _libc("mallopt", M_MMAP_THRESHOLD, TIMING_MMAP)
            _libc("mallopt", M_TRIM_THRESHOLD, TIMING_TRIM)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(fn: Callable[[], object], device: torch.device, interval_s: float = 0.002) -> tuple[object, float]:
    """(result, peak MiB) of one call: CUDA ``max_memory_allocated`` above the start, or on CPU the
    resident-set peak above the start, sampled every ``interval_s`` by a thread (tracemalloc does not
    see torch's C allocations; ``ru_maxrss`` is a lifetime high-water mark, useless after the first run)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with freed_memory_returned():
        return _rss_peak(fn, interval_s)


def _rss_peak(fn: Callable[[], object], interval_s: float) -> tuple[object, float]:
    base = _rss_bytes()
    peak = [base]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(interval_s)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    try:
        out = fn()
    finally:
        stop.set()
        th.join()
    peak[0] = max(peak[0], _rss_bytes())
    return out, (peak[0] - base) / 2**20


# ============================================================================================ timing
def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


# ============================================================================================ output
def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A Markdown table of ``rows`` with (header, key) columns; floats to 3 significant places."""
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    head = "| " + " | ".join(h for h, _ in columns) + " |"
    sep = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(cell(r.get(k)) for _, k in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def save(name: str, payload: dict, markdown: str, out_dir: Path = RESULTS) -> Path:
    """Write ``<name>.json`` and ``<name>.md`` under ``out_dir``; returns the JSON path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    (out_dir / f"{name}.md").write_text(markdown + "\n")
    return path


def seeded_inputs(model, batch: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The same noise and labels for every row of a table (a CPU generator: identical across devices)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=g)
    y = torch.randint(0, model.null_class, (batch,), generator=g)
    return noise.to(device, dtype), y.to(device)
