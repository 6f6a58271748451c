"""Teacher pretraining: the config's EMA callback wired to validation and export, label dropout, and an export that loads through ``backbone.ckpt``."""
from __future__ import annotations

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from diffcache.backbones import build_backbone, load_backbone
from diffcache.modules.teacher_pretrain import TeacherPretrain
from diffcache.utils.resolvers import conf_dir

CONF = conf_dir()

SMALL = dict(hidden_size=32, depth=1, num_heads=2)  # the mnist_dit layout (1 channel, 32x32), tiny width


def _module(tmp_path, **kw):
    torch.manual_seed(0)
    return TeacherPretrain(build_backbone("mnist_dit", **SMALL), out_dir=str(tmp_path), export_name="t.pt",
                           grid_per_class=1, **kw)


class _Raw(L.Callback):
    """Records the trained (raw) weights after every optimiser step, before any validation swaps them."""

    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.steps.append({k: v.detach().clone() for k, v in pl_module.backbone.state_dict().items()})


def test_ema_from_the_teach_config_is_what_validation_samples_and_exports(tmp_path):
    """``callbacks.ema`` of conf/teach.yaml, decay 0.5, two steps: the export at the step-2 validation is
    0.5 p1 + 0.5 p2 (the average starts from the first step's weights), the raw export is p2, and after fit
    the module holds the average."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("teach", overrides=["callbacks.ema.decay=0.5", "paths.output_dir=/tmp/unused"])
    ema = instantiate(cfg.callbacks.ema)
    m, raw = _module(tmp_path, lr=1e-2, warmup_steps=1), _Raw()
    g = torch.Generator().manual_seed(0)
    data = [{"x0": torch.rand(4, 1, 32, 32, generator=g) * 2 - 1, "cond": torch.tensor([1, 2, 3, 4])} for _ in range(2)]
    trainer = L.Trainer(max_steps=2, val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=0,
                        callbacks=[ema, raw], logger=CSVLogger(str(tmp_path), name="csv", version=""),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(m, DataLoader(data, batch_size=None), DataLoader(data[:1], batch_size=None))
    p1, p2 = raw.steps
    assert any(not torch.equal(p1[k], p2[k]) for k in p1)  # the weights moved between the steps
    exported = torch.load(tmp_path / "t.pt")
    raw_export = torch.load(tmp_path / "csv" / "raw_t.pt")
    for k in p1:
        torch.testing.assert_close(exported[k], 0.5 * p1[k] + 0.5 * p2[k], rtol=1e-6, atol=1e-7)
        assert torch.equal(raw_export[k], p2[k])
        torch.testing.assert_close(m.backbone.state_dict()[k], exported[k], rtol=0, atol=0)
    assert len(m.grids) == 1 and not hasattr(m, "ema")


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
    for k, v in m.backbone.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
