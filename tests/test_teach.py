"""Teacher training through Hydra (``teach.py``, ``conf/teach.yaml``) and the ``make teachers`` recipe on it."""
from __future__ import annotations

import json
import re

import torch
from hydra import compose, initialize_config_dir
from hydra_utils import CONF, ROOT
from test_reliability import _cli

from diffcache.backbones import load_backbone

SMALL = "backbone.overrides={hidden_size:32,depth:1,num_heads:2}"  # the mnist_dit layout, tiny width


def test_teach_trains_exports_a_loadable_ema_and_reports_its_figures(tmp_path):
    res = _cli("teach.py", [SMALL, "trainer.max_steps=4", "trainer.val_check_interval=2", "data.batch_size=4",
                            "module.grid_per_class=1", "callbacks.ema.decay=0.0", "paths.log_dir=logs"], tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = next((tmp_path / "logs" / "teach" / "runs" / "teach-mnist_dit").iterdir())
    fig = json.loads((run / "figures.json").read_text())
    assert fig["steps"] == 4 and fig["files"] == ["mnist_dit.pt", "grids/mnist_dit_step000004.png"]
    assert fig["config"]["trainer"]["max_steps"] == 4 and fig["config"]["init"] is None
    assert fig["config"]["callbacks"]["ema"]["decay"] == 0.0
    assert {"loss", "mse"} <= set(fig["final_losses"]) and all(v == v for v in fig["final_losses"].values())
    assert (run / "grids" / "mnist_dit_step000002.png").is_file() and (run / fig["files"][1]).is_file()
    ema = load_backbone("mnist_dit", ckpt=str(run / "mnist_dit.pt"), hidden_size=32, depth=1, num_heads=2)
    raw = torch.load(run / "csv" / "raw_mnist_dit.pt")  # the trained weights at the last validation (step 4)
    start = load_backbone("mnist_dit", random_init=True, hidden_size=32, depth=1, num_heads=2)
    # EMA decay 0: the EMA is the trained weights; and training moved them from the seeded init
    assert all(torch.equal(v, raw[k]) for k, v in ema.state_dict().items())
    assert any(not torch.equal(v, start.state_dict()[k]) for k, v in ema.state_dict().items())


def test_make_teachers_lines_compose_with_the_teach_config():
    """Every ``scripts/train_teachers.py teacher`` line of ``make teachers`` is a valid teach.py override set."""
    text = (ROOT / "Makefile").read_text()
    variables = dict(re.findall(r"^(\w+) \?= (.*)$", text, flags=re.M))
    lines = re.findall(r"train_teachers\.py teacher (\S+) (.*?)(?: &|$)", text, flags=re.M)
    assert len(lines) == 5, lines
    for name, rest in lines:
        args = re.sub(r"\$\((\w+)\)", lambda m: variables[m.group(1)], rest).split()
        with initialize_config_dir(str(CONF), version_base="1.3"):
            cfg = compose("teach", overrides=[f"backbone={name}", "paths.output_dir=/tmp/x", *args])
        assert cfg.backbone.arch == name and cfg.module.max_steps == cfg.trainer.max_steps >= 8000
        assert cfg.max_minutes >= 88 and cfg.module.schedule == "linear"
        assert (cfg.backbone.ckpt is None) == ("backbone.ckpt=" not in rest)
