"""scripts/train_teachers.py records: a warm-started stage keeps the recipe that came before it, and no record
keeps an evaluation of weights it no longer describes."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("train_teachers", ROOT / "scripts" / "train_teachers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


STAGE1 = {"command": "python scripts/train_teachers.py teacher mnist_dit max_steps=8000", "commit": "aaa",
          "machine": {"nproc": 2}, "steps": 7001, "train_wall_s": 5310.0, "wall_s": 5310.1,
          "final_losses": {"loss": 0.028}, "config": {"lr": 1e-3, "init": None}, "params": 10,
          "files": ["mnist_dit.pt", "grids/mnist_dit_step007001.png", "mnist_dit_samples.png"],
          "evaluation": {"class_accuracy": 0.32}, "evaluate_command": "python ... evaluate", "evaluate_commit": "bbb",
          "quality_bar": {"passed": False}}


def stage2(init):
    return {"command": "python scripts/train_teachers.py teacher mnist_dit init=assets/mnist_dit.pt", "commit": "ccc",
            "machine": {"nproc": 2}, "steps": 9000, "train_wall_s": 6000.0, "wall_s": 6001.0,
            "final_losses": {"loss": 0.2}, "config": {"lr": 3e-4, "init": init}, "params": 10,
            "files": ["mnist_dit.pt", "grids/mnist_dit_step009000.png"]}


def test_a_warm_started_stage_keeps_the_earlier_stage_and_drops_the_stale_evaluation():
    merged = _script().merge_record(STAGE1, stage2("assets/mnist_dit.pt"))
    assert merged["steps"] == 9000 and merged["commit"] == "ccc" and merged["config"]["init"] == "assets/mnist_dit.pt"
    assert merged["files"] == ["mnist_dit.pt", "grids/mnist_dit_step009000.png"]
    (earlier,) = merged["earlier_stages"]
    assert earlier["command"] == STAGE1["command"] and earlier["steps"] == 7001 and earlier["commit"] == "aaa"
    assert earlier["final_losses"] == {"loss": 0.028} and "evaluation" not in earlier and "files" not in earlier
    assert not {"evaluation", "evaluate_command", "evaluate_commit", "quality_bar"} & set(merged)
    third = _script().merge_record(merged, {**stage2("assets/mnist_dit.pt"), "steps": 500, "commit": "ddd"})
    assert [s["steps"] for s in third["earlier_stages"]] == [7001, 9000] and third["steps"] == 500


def test_a_fresh_training_forgets_the_old_weights_and_an_evaluation_only_adds():
    mod = _script()
    fresh = mod.merge_record(STAGE1, stage2(None))
    assert "earlier_stages" not in fresh and "evaluation" not in fresh and fresh["steps"] == 9000
    evaluated = mod.merge_record(fresh, {"evaluation": {"class_accuracy": 0.95}})
    assert evaluated["steps"] == 9000 and evaluated["evaluation"] == {"class_accuracy": 0.95}
