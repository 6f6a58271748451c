"""Issue 9, the parts a user reads: router plots, CSV rows, progress format, evaluation inputs, preflight
checks, sweep tables, benchmark keys."""
from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from diffcache.backbones import build_backbone
from diffcache.plot import main as plot_main
from diffcache.policies.l2c import L2CPolicy
from diffcache.policies.toca import ToCaPolicy
from diffcache.solvers import DDIM
from diffcache.tasks.eval_io import Conditioning, decode
from diffcache.tasks import preflight
from diffcache.utils.loggers import StepCSVLogger
from diffcache.utils.sweep import summarize

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT.parent / "shared" / "fixtures" / "l2c_routers"


def test_plot_cli_draws_trained_and_released_router_files(tmp_path, capsys):
    from PIL import Image

    bb = build_backbone("tiny_pixart")  # three site kinds: attn, xattn, mlp
    pol = L2CPolicy(theta=0.5, init_seed=0)
    pol.setup(bb, DDIM(20, schedule="linear"))
    router = pol.export_official(tmp_path / "router")
    assert plot_main([str(router), "--out", str(tmp_path / "p.png")]) == 0  # kinds from the file's record
    w, h = Image.open(tmp_path / "p.png").size
    assert w > 300 and h > 300  # two panels (betas and the mask), readable
    assert plot_main([str(router), "--kinds", "attn,xattn,mlp,x", "--out", str(tmp_path / "bad.png")]) == 2
    assert "--kinds" in capsys.readouterr().err  # 2 layers x 3 kinds are not a multiple of 4
    (tmp_path / "notes.txt").write_text("not a router")
    assert plot_main([str(tmp_path / "notes.txt")]) == 2
    if FIXTURES.is_dir():
        for name, extra in (("DiT_DDIM20_router.pt", []), ("U-ViT_dpm20_router.pth", ["--schedule", "shifted"])):
            assert plot_main([str(FIXTURES / name), "--out", str(tmp_path / f"{name}.png"), *extra]) == 0


def test_csv_logger_writes_one_row_per_step_even_across_a_flush(tmp_path):
    lg = StepCSVLogger(save_dir=tmp_path, name="csv", version="", flush_logs_every_n_steps=1)
    for step in range(3):
        lg.log_metrics({"lr": 0.1}, step=step)       # the LR monitor
        lg.log_metrics({"loss": 1.0 + step}, step=step)  # the step's losses
        lg.save()                                    # a flush between two calls of the same step
        lg.log_metrics({"router/cached": 2.0 * step}, step=step)
    lg.finalize("success")
    with open(tmp_path / "csv" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["step"], r["lr"], r["loss"], r["router/cached"]) for r in rows] == [
        ("0", "0.1", "1.0", "0.0"), ("1", "0.1", "2.0", "2.0"), ("2", "0.1", "3.0", "4.0")]


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_progress_off_a_terminal_is_plain_lines_and_on_one_fits_80_columns(tmp_path, monkeypatch, caplog):
    """Issue 23.3: piped stdout gets a plain line every N steps (and the last), the validation stage is announced
    and reported; on a terminal the one redrawn line fits 80 columns; losses of 1e-6 read 1.234e-06."""
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    from hydra_utils import compose_cfg

    from diffcache.callbacks.progress import StepProgress
    from diffcache.tasks import train as train_task

    caplog.set_level("INFO", logger="diffcache.tasks.compare")
    streams = {True: _Stream(True), False: _Stream(False)}
    made = iter(streams.values())
    monkeypatch.setattr(train_task, "StepProgress", lambda total: StepProgress(total, every_steps=2, stream=next(made)))
    monkeypatch.setenv("COLUMNS", "80")
    compare = ["compare=default", "compare.num_samples=2", "compare.batch_size=2", "compare.cache_dir=null",
               "compare.fora_intervals=[2]", "compare.toca=false"]  # off a terminal: the comparison's stages too
    for tty in (True, False):
        train_task.train(compose_cfg("train", ["trainer.max_steps=4", "data.batch_size=2", "+trainer.val_check_interval=3",
                                               "trainer.limit_val_batches=1", "+data.val_samples=2", "callbacks=none",
                                               *([] if tty else compare)], tmp_path / str(tty)))
    plain = streams[False].getvalue().splitlines()
    assert [ln.split()[1] for ln in plain if ln.startswith("train ")] == ["2/4", "4/4"]
    assert "validating at step 3" in plain[1] and plain[2].startswith("validation at step 3")
    assert "\r" not in streams[False].getvalue() and re.search(r"loss \d\.\d{3}e[-+]\d\d", plain[0])
    stages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("comparing ")]
    n = len(stages)  # full, L2C, FORA N=2 (and fewer steps when some step count reaches L2C's MACs)
    assert n >= 3 and [st.split(":")[0] for st in stages] == [f"comparing {k}/{n}" for k in range(1, n + 1)]
    drawn = re.split(r"[\r\n]", streams[True].getvalue())
    assert sum(ln.startswith("train ") for ln in drawn) == 4 and max(map(len, drawn)) <= 79


def test_conditioning_labels_prompts_and_refusals(tmp_path):
    dit, pix = build_backbone("tiny_dit"), build_backbone("tiny_pixart")
    g = torch.Generator()
    c = Conditioning(dit, [3, 7])
    assert [int(c(i, g)) for i in range(5)] == [3, 7, 3, 7, 3]
    assert int(Conditioning(dit, 4)(9, g)) == 4
    assert int(Conditioning(dit, OmegaConf.create([2]))(0, g)) == 2  # a Hydra list
    with pytest.raises(ValueError, match="outside the backbone's classes 0..9"):
        Conditioning(dit, [10])
    with pytest.raises(ValueError, match="eval.prompts"):
        Conditioning(dit, None, prompts="p.pt")
    with pytest.raises(ValueError, match="eval.labels is for class-conditional"):
        Conditioning(pix, [1])
    with pytest.raises(FileNotFoundError, match="encode_prompts.py"):
        Conditioning(pix, None, prompts=str(tmp_path / "missing.pt"))
    torch.save({"y": torch.zeros(2, 5, pix.caption_channels), "mask": torch.ones(2, 5)}, tmp_path / "short.pt")
    with pytest.raises(ValueError, match="the backbone expects"):
        Conditioning(pix, None, prompts=str(tmp_path / "short.pt"))


def test_decode_shows_pixels_directly_and_latents_by_channels():
    x = torch.tensor([-1.0, 0.0, 1.0, 3.0]).view(1, 1, 2, 2)
    torch.testing.assert_close(decode(x), torch.tensor([0.0, 0.5, 1.0, 1.0]).view(1, 1, 2, 2))  # [-1, 1] -> [0, 1]
    lat = torch.arange(4 * 4, dtype=torch.float32).view(1, 4, 2, 2)
    out = decode(lat)
    assert out.shape == (1, 3, 2, 2) and out.min() == 0 and out.max() == pytest.approx(1.0, abs=1e-6)


def test_toca_fresh_ratio_and_threshold_are_checked_at_config_time():
    with pytest.raises(ValueError, match="policy.fresh_ratio"):
        ToCaPolicy(preset=None, fresh_ratio=1.5)
    with pytest.raises(ValueError, match="fresh_threshold"):
        ToCaPolicy(preset=None, fresh_threshold=0)
    ToCaPolicy(preset=None, fresh_ratio=1.0)


def test_preflight_trainer_and_writability(tmp_path, monkeypatch):
    cfg = OmegaConf.create
    with pytest.raises(ValueError, match="ddp_find_unused_parameters_true"):
        preflight.check_trainer(cfg({"accelerator": "cpu", "devices": 2, "strategy": "auto"}))
    preflight.check_trainer(cfg({"accelerator": "cpu", "devices": 2, "strategy": "ddp_find_unused_parameters_true"}))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="this machine has 2 GPU"):
        preflight.check_trainer(cfg({"accelerator": "gpu", "devices": 8, "strategy": "ddp_find_unused_parameters_true"}))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        preflight.check_trainer(cfg({"accelerator": "gpu", "devices": 1}))
    preflight.check_writable(tmp_path / "new" / "deeper", "paths.log_dir")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        preflight.check_writable(tmp_path / "file" / "logs", "paths.log_dir")


def test_sweep_table_lists_failed_runs_and_only_reported_columns(tmp_path):
    (tmp_path / "0_policy.lam-1e-06").mkdir()
    (tmp_path / "0_policy.lam-1e-06" / "summary.json").write_text(json.dumps(
        {"overrides": ["policy.lam=1e-06"], "lam": 1e-6, "cached_fraction": 0.25, "macs_fraction": 0.8}))
    (tmp_path / "1_policy.lam-inf").mkdir()
    (tmp_path / "1_policy.lam-inf" / "FAILED").write_text("ValueError: policy.lam must be finite\n")
    rows = summarize(tmp_path)
    assert [r["status"] for r in rows] == ["ok", "failed: ValueError: policy.lam must be finite"]
    header = (tmp_path / "summary.csv").read_text().splitlines()[0].split(",")
    assert header == ["run", "status", "overrides", "lam", "cached_fraction", "macs_fraction"]


def test_benchmark_rows_use_evaluate_names(tmp_path):
    from benchmarks import speed

    rows = speed.run(arch="tiny_dit", steps=6, batches=(1,), repeats=1, compile_modes=(), routers=None,
                     policies=("fora",))
    row = next(r for r in rows if r["policy"] == "fora")
    assert {"macs_fraction", "speedup_macs", "speedup_latency", "efficiency"} <= set(row)
    assert 0 < row["macs_fraction"] < 1 < row["speedup_macs"]  # fraction = cached / full, speedup = full / cached
    assert row["speedup_macs"] == pytest.approx(1 / row["macs_fraction"], rel=2e-3)  # both rounded
    assert row["efficiency"] == pytest.approx(row["speedup_latency"] / row["speedup_macs"], rel=5e-3)


def test_speed_benchmark_times_every_method_record(monkeypatch):
    """The speed table's rows come from the comparison's METHODS: a method added there is one more timed row."""
    from benchmarks import speed
    from diffcache.policies.fora import FORAPolicy
    from diffcache.tasks import methods

    labels = [c["policy"] for c in speed.candidates("tiny_dit", 20, None)]
    assert labels[:2] == ["full", "l2c"] and {"fora", "toca", "search"} <= set(labels)
    fewer = [c for c in speed.candidates("tiny_dit", 20, None) if c["policy"].startswith("ddim")]
    assert len(fewer) == 1 and fewer[0]["solver"].num_steps < 20
    extra = methods.Method("fora5", lambda ctx: [ctx.cached("fora5", "FORA", FORAPolicy(interval=5), N=5)])
    monkeypatch.setattr(methods, "METHODS", [*methods.METHODS, extra])
    rows = speed.candidates("tiny_dit", 20, None)
    assert [c["policy"] for c in rows] == labels + ["fora5"] and rows[-1]["make"]().interval == 5


def test_user_errors_catch_input_errors_only(capsys, tmp_path, monkeypatch):
    from hydra.errors import InstantiationException

    from diffcache.utils.cli import user_errors

    monkeypatch.delenv("DIFFCACHE_DEBUG", raising=False)

    def wrapped(cause):
        try:
            raise cause
        except Exception as e:
            try:
                raise InstantiationException("Error in call to target") from e
            except InstantiationException as outer:
                return outer

    for err in (ValueError("policy.theta is bad"), FloatingPointError("loss is nan"),
                FileNotFoundError("no such file"), wrapped(ValueError("policy.lam is bad")),
                wrapped(TypeError("__init__() got an unexpected keyword argument 'foo'"))):
        with pytest.raises(SystemExit) as ex, user_errors():
            raise err
        assert ex.value.code == 2
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: ")]
        assert len(lines) == 1
    for bug in (TypeError("unsupported operand"), KeyError("x"), wrapped(TypeError("unsupported operand"))):
        with pytest.raises(type(bug)), user_errors():  # a programming bug keeps its traceback
            raise bug
