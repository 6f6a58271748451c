"""QualityMetrics.compute() syncs across DDP ranks: 2 CPU processes (gloo), each holding half of an uneven
split of the set, give the same numbers on both ranks as one process holding all of it."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from test_generative import images, tiny_extractor  # noqa: E402  (imported before forking the ranks)

from diffcache.metrics.generative import QualityMetrics, to_uint8  # noqa: E402
from diffcache.metrics.reference import reference_from_images  # noqa: E402

N = 41  # uneven: rank 0 gets 21 images, rank 1 gets 20


def build_and_feed(ranks: list[int], world: int) -> dict:
    ext = tiny_extractor()
    qm = QualityMetrics(ext, reference_from_images(to_uint8(images(50, 0)), ext), name="tiny", is_splits=1)
    fake, teacher = images(N, 1, shift=0.02), images(N, 2)
    for rank in ranks:  # the same batches as the ranks see, so float32 features match bit for bit
        for chunk in torch.arange(rank, N, world).split(8):
            qm.update(fake[chunk], teacher[chunk])
    return qm.compute()


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out = build_and_feed([rank], world)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_compute_syncs_across_two_cpu_ranks(tmp_path):
    # fork, not spawn: the children inherit the imported modules instead of importing torch again.
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="fork")
    single = build_and_feed([0, 1], 2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # every rank logs the same, synced values
    assert set(single) == {"tiny_fid", "tiny_is", "tiny_precision", "tiny_recall", "mse", "psnr"}
    assert 0 < single["tiny_precision"] < 1 and 0 < single["tiny_recall"] < 1  # non-trivial, so order matters
    for k, v in single.items():
        # Same features; only the float64 sums are reduced in another order (round-off ~1e-15 relative,
        # amplified by the cancellation in FID (~1e2 here) and the eigendecompositions): 1e-9 has margin.
        assert ranks[0][k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
