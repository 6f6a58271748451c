"""Teacher pretraining: EMA arithmetic, label dropout, and an export that loads through ``backbone.ckpt``."""
from __future__ import annotations

import torch

from diffcache.backbones import build_backbone, load_backbone
from diffcache.modules.teacher_pretrain import TeacherPretrain

SMALL = dict(hidden_size=32, depth=1, num_heads=2)  # the mnist_dit layout (1 channel, 32x32), tiny width


def _module(tmp_path, **kw):
    torch.manual_seed(0)
    return TeacherPretrain(build_backbone("mnist_dit", **SMALL), out_dir=str(tmp_path), export_name="t.pt",
                           grid_per_class=1, **kw)


def test_ema_is_decay_weighted_average(tmp_path):
    m = _module(tmp_path, ema_decay=0.9)
    old = {k: v.clone() for k, v in m.ema.state_dict().items()}
    with torch.no_grad():
        for p in m.backbone.parameters():
            p.add_(1.0)
    m.on_train_batch_end(None, None, 0)
    new = m.backbone.state_dict()
    for k, v in m.ema.state_dict().items():
        torch.testing.assert_close(v, 0.9 * old[k] + 0.1 * new[k], rtol=1e-6, atol=1e-6)
    assert not any(p.requires_grad for p in m.ema.parameters())


def test_training_step_drops_labels_to_null(tmp_path):
    m = _module(tmp_path, label_drop=1.0)
    seen = []
    m.backbone.register_forward_pre_hook(lambda mod, args: seen.append(args[2].clone()))
    x0 = torch.rand(4, 1, 32, 32) * 2 - 1
    loss = m.training_step({"x0": x0, "cond": torch.tensor([1, 2, 3, 4])}, 0)
    assert torch.isfinite(loss) and loss.requires_grad
    assert seen[0].tolist() == [10] * 4  # the null class of a 10-class DiT
    m = _module(tmp_path, label_drop=0.0)
    assert m._drop_labels(torch.tensor([1, 2])).tolist() == [1, 2]


def test_grid_and_export_load_strictly(tmp_path):
    m = _module(tmp_path, guidance=1.5)
    x = m.sample_grid()
    assert x.shape == (10, 1, 32, 32) and torch.isfinite(x).all()
    assert (tmp_path / "grids" / "t_step000000.png").is_file()
    loaded = load_backbone("mnist_dit", ckpt=str(tmp_path / "t.pt"), **SMALL)
    for k, v in m.ema.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
