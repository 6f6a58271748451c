"""Train the offline demo's MNIST models and write them to ``assets/`` with ``assets/MANIFEST.json``.

    python scripts/train_teachers.py classifier                 # the quality extractor (~4 min on 2 cores)
    python scripts/train_teachers.py teacher mnist_dit [k=v ..]  # teach.py into assets/ (conf/teach.yaml overrides)
    python scripts/train_teachers.py evaluate mnist_dit          # class accuracy of its CFG samples
    python scripts/train_teachers.py manifest                    # sha256 + records -> assets/MANIFEST.json
    python scripts/train_teachers.py diagnose mnist_dit          # x0 error per noise level vs class-mean image

``make teachers`` runs all of them. Each step writes a record (exact command, commit, wall time, machine,
final losses, accuracy) to ``logs/teachers/<name>.json``; ``manifest`` gathers them with the files' sha256.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
RECORDS = ROOT / "logs" / "teachers"


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {"nproc": os.cpu_count(), "cpu": cpu, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "python": platform.python_version()}


def git_commit() -> str:
    try:
        head = subprocess.check_output(["git", "-C", str(ROOT), "rev-parse", "HEAD"], text=True).strip()
        dirty = subprocess.call(["git", "-C", str(ROOT), "diff", "--quiet", "HEAD", "--", "src", "scripts", "conf"])
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


QUALITY_BAR = 0.9  # issue 11: a teacher's CFG samples are classified as their conditioning class >= 90% of the time
# what a training stage writes into a record; a warm-started stage moves its predecessor's under earlier_stages
STAGE_KEYS = ("command", "commit", "machine", "steps", "train_wall_s", "wall_s", "final_losses", "config",
              "params", "concurrency")
EVAL_KEYS = ("evaluation", "evaluate_command", "evaluate_commit", "quality_bar")


def merge_record(old: dict, new: dict) -> dict:
    """``old`` updated by the record ``new`` of a step. A new training (``steps`` in it) drops the old
    evaluation (it measured other weights); one warm-started from the previous weights (``config.init``) keeps
    the earlier stages' training fields under ``earlier_stages``, so the manifest tells the whole recipe."""
    if "steps" in new:
        history = []
        if (new.get("config") or {}).get("init") and old.get("steps"):
            history = old.get("earlier_stages", []) + [{k: old[k] for k in STAGE_KEYS if k in old}]
        old = {k: v for k, v in old.items() if k not in STAGE_KEYS + EVAL_KEYS + ("earlier_stages",)}
        new = {**new, "earlier_stages": history} if history else new
    return {**old, **new}


def write_record(name: str, record: dict) -> None:
    RECORDS.mkdir(parents=True, exist_ok=True)
    base = {"command": "python " + " ".join([f"scripts/{Path(sys.argv[0]).name}"] + sys.argv[1:]),
            "commit": START_COMMIT, "machine": machine()}
    path = RECORDS / f"{name}.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps(merge_record(old, {**base, **record} if "files" in record else record), indent=2))
    print(f"record -> {path}")


def cmd_classifier(args: list[str]) -> None:
    import torch

    from diffcache.metrics.classifier import train_classifier

    kw = dict(a.split("=", 1) for a in args)
    epochs = int(kw.get("epochs", 30))
    t0 = time.time()
    model, fig = train_classifier(epochs=epochs, seed=int(kw.get("seed", 0)))
    ASSETS.mkdir(exist_ok=True)
    out = ASSETS / "mnist_classifier.pt"
    torch.save(model.state_dict(), out)
    print(f"classifier: heldout accuracy {fig['heldout_accuracy']:.4f} -> {out}")
    write_record("mnist_classifier", {"files": [out.name], "wall_s": round(time.time() - t0, 1), **fig})


def cmd_teacher(args: list[str]) -> None:
    """``teacher <name> [Hydra overrides of conf/teach.yaml]``: ``teach(cfg)`` into assets/, logs under
    logs/teachers/<name>, and its record."""
    from hydra import compose, initialize_config_dir

    from diffcache.tasks.teach import teach
    from diffcache.utils.resolvers import conf_dir

    name, overrides = args[0], args[1:]
    log_dir = ROOT / "logs" / "teachers" / name
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("teach", overrides=[f"backbone={name}", f"export_dir={ASSETS}", f"paths.output_dir={log_dir}",
                                          *overrides])
    t0 = time.time()
    fig = teach(cfg)
    for grid in (ASSETS / "grids").glob(f"{name}_step*.png"):  # an earlier stage's final grid: not shipped twice
        if grid.relative_to(ASSETS).as_posix() not in fig["files"]:
            grid.unlink()
    write_record(name, {**fig, "wall_s": round(time.time() - t0, 1)})


def cmd_evaluate(args: list[str]) -> None:
    from diffcache.modules.teacher_eval import evaluate_teacher

    name, kw = args[0], dict(a.split("=", 1) for a in args[1:])
    fig = evaluate_teacher(name, ASSETS, **kw)
    path = RECORDS / f"{name}.json"
    rec = json.loads(path.read_text()) if path.is_file() else {}
    rec.setdefault("evaluation", {}).update(fig)
    rec["files"] = sorted(set(rec.get("files", [])) | {fig["grid"]})
    rec["evaluate_command"] = "python " + " ".join([f"scripts/{Path(sys.argv[0]).name}"] + sys.argv[1:])
    rec["evaluate_commit"] = START_COMMIT  # the sampler that measured it (may be later than the training's)
    rec["quality_bar"] = {"class_accuracy_min": QUALITY_BAR, "measured": fig["class_accuracy"],
                          "passed": fig["class_accuracy"] >= QUALITY_BAR}
    RECORDS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, indent=2))
    print(json.dumps(fig, indent=2))


def cmd_manifest(args: list[str]) -> None:
    entries = {}
    for rec_path in sorted(RECORDS.glob("*.json")):
        rec = json.loads(rec_path.read_text())
        files = {f: {"sha256": sha256(ASSETS / f), "bytes": (ASSETS / f).stat().st_size}
                 for f in rec.get("files", []) if (ASSETS / f).is_file()}
        entries[rec_path.stem] = {**rec, "files": files}
    out = ASSETS / "MANIFEST.json"
    out.write_text(json.dumps({"note": "written by scripts/train_teachers.py manifest; tests/test_assets.py checks it",
                               "entries": entries}, indent=2) + "\n")
    print(f"manifest -> {out} ({sum(len(e['files']) for e in entries.values())} files)")


def cmd_diagnose(args: list[str]) -> None:
    from diffcache.modules.teacher_eval import denoising_profile

    prof = denoising_profile(args[0], ASSETS, **{k: int(v) for k, v in (a.split("=", 1) for a in args[1:])})
    print(f"{args[0]}: x0-MSE of the clipped x0 prediction on held-out digits; class-mean image "
          f"{prof['class_mean_x0_mse']:.4f}, global-mean image {prof['global_mean_x0_mse']:.4f}")
    for t, row in prof["timesteps"].items():
        print(f"  t={t:4d}: right label {row['right']:.4f}  wrong label {row['wrong']:.4f}  null {row['null']:.4f}")


START_COMMIT = git_commit()  # the code a step runs is the code at its start
COMMANDS = {"classifier": cmd_classifier, "teacher": cmd_teacher, "evaluate": cmd_evaluate, "manifest": cmd_manifest,
            "diagnose": cmd_diagnose}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        raise SystemExit(f"usage: {sys.argv[0]} {{{'|'.join(COMMANDS)}}} [args]")
    COMMANDS[sys.argv[1]](sys.argv[2:])
