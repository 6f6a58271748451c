"""Sharded sampling: a killed run resumes from its shards and ends with the same set; shards and the ADM
export have the documented layout."""
from __future__ import annotations

import subprocess
import sys

import lightning as L
import numpy as np
import torch
from pathlib import Path

from tiny_models import perturbed

from diffcache.modules.sampler import ShardedSampler, gather, set_hash, shard_path
from diffcache.policies.fora import FORAPolicy
from diffcache.solvers import make_solver


SCRIPT = str(Path(__file__).resolve().parents[2] / "scripts" / "export_adm_npz.py")


def _run(out, num=10, shard=4, policy=None, **kw):
    model = perturbed("tiny_dit", in_channels=kw.pop("in_channels", 4))
    s = ShardedSampler(model, make_solver("ddim", 6), policy, out, num_samples=num, shard_size=shard,
                       guidance=1.5, **kw)
    L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
              enable_model_summary=False).predict(s, return_predictions=False)
    return s


def test_resume_from_shards_gives_the_same_set(tmp_path):
    s = _run(tmp_path / "a", policy=FORAPolicy(2))
    assert s.num_shards == 3 and not s.missing()
    full = gather(tmp_path / "a", 10)
    assert full["index"].tolist() == list(range(10)) and full["samples"].shape == (10, 4, 8, 8)
    # "kill" it: the last shard never got written, only its temp file exists (writes are atomic renames)
    shard_path(tmp_path / "a", 2).unlink()
    last = shard_path(tmp_path / "a", 2)
    last.with_name(last.name + ".tmp999").write_bytes(b"half a shard")
    mtime = shard_path(tmp_path / "a", 0).stat().st_mtime_ns
    s2 = _run(tmp_path / "a", policy=FORAPolicy(2))
    assert shard_path(tmp_path / "a", 0).stat().st_mtime_ns == mtime  # done shards are not recomputed
    assert set_hash(gather(tmp_path / "a", 10)["samples"]) == set_hash(full["samples"]) and not s2.missing()
    # an independent run in a fresh directory is the same set too (everything is seeded per index / shard)
    assert set_hash(gather(_run(tmp_path / "b", policy=FORAPolicy(2)).out_dir)["samples"]) == set_hash(full["samples"])


def test_incomplete_set_is_a_clear_error(tmp_path):
    _run(tmp_path / "a", num=6, shard=3)
    shard_path(tmp_path / "a", 1).unlink()
    try:
        gather(tmp_path / "a", 6)
    except ValueError as e:
        assert "holds 3 samples, expected 6" in str(e)
    else:
        raise AssertionError("an incomplete shard set must not pass")


def test_pixel_shards_export_to_adm_npz(tmp_path):
    _run(tmp_path / "px", num=5, shard=2, in_channels=1)
    data = gather(tmp_path / "px", 5)
    assert data["images"].dtype == torch.uint8 and data["images"].shape == (5, 1, 8, 8)
    expect = (127.5 * data["samples"].clamp(-1, 1) + 128.0).clamp(0, 255).to(torch.uint8)  # DiT's sample_ddp rule
    assert torch.equal(data["images"], expect)
    out = tmp_path / "samples.npz"
    r = subprocess.run([sys.executable, SCRIPT, str(tmp_path / "px"), str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with np.load(out) as z:
        assert z["arr_0"].shape == (5, 8, 8, 1) and z["arr_0"].dtype == np.uint8 and z["labels"].shape == (5,)
        np.testing.assert_array_equal(z["arr_0"], data["images"].permute(0, 2, 3, 1).numpy())
    r = subprocess.run([sys.executable, SCRIPT, str(tmp_path / "missing"), str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: no sample shards")


def test_an_interrupted_atomic_write_leaves_the_old_file_whole(tmp_path):
    from diffcache.utils.atomic import write_atomically

    path = write_atomically(tmp_path / "sub" / "x.pt", lambda tmp: torch.save({"v": 1}, tmp))
    assert torch.load(path) == {"v": 1} and [p.name for p in path.parent.iterdir()] == ["x.pt"]

    def dies(tmp):
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    try:
        write_atomically(path, dies)
    except KeyboardInterrupt:
        pass
    assert torch.load(path) == {"v": 1}  # the reader still sees the whole old file
