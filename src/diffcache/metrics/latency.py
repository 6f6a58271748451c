"""Wall-clock latency of a callable: warm-up, device synchronisation, CUDA events when on GPU."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def measure(fn: Callable[[], object], repeats: int = 5, warmup: int = 1, device: torch.device | str = "cpu") -> dict:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed; seconds per call (mean, std, median, min, max)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return {"mean_s": statistics.fmean(times), "std_s": statistics.pstdev(times) if len(times) > 1 else 0.0,
            "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats}
