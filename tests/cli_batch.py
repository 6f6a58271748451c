"""Run several command lines of one entry script in ONE Python process (the real ``@hydra.main``, Hydra
callbacks and ``user_errors``, as ``python train.py ...`` runs them), to pay the torch / Lightning import
once instead of once per case. Each case reports its exit status and its stdout + stderr."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hydra_utils import ROOT, with_tiny

_DRIVER = r"""
import contextlib, io, json, runpy, sys, os
from hydra.core.global_hydra import GlobalHydra
script, cases = sys.argv[1], json.loads(sys.argv[2])
results = []
for argv in cases:
    GlobalHydra.instance().clear()
    buf = io.StringIO()
    code = 0
    sys.argv = [script, *argv]
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException as e:  # a traceback that escaped: record it as such
            import traceback
            traceback.print_exc(file=buf)
            code = 99
    results.append({"argv": argv, "code": code, "out": buf.getvalue()})
print("@@RESULTS@@" + json.dumps(results))
"""


def run_many(script: str, cases: list[list[str]], cwd: Path, env: dict | None = None, timeout: int = 400) -> list[dict]:
    base = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "PROJECT_ROOT": str(cwd),
            "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    base.pop("HYDRA_FULL_ERROR", None)
    base.pop("DIFFCACHE_DEBUG", None)
    cases = [with_tiny(script, c) for c in cases]
    res = subprocess.run([sys.executable, "-c", _DRIVER, str(ROOT / script), json.dumps(cases)], cwd=cwd,
                         env={**base, **(env or {})}, capture_output=True, text=True, timeout=timeout)
    marker = res.stdout.rfind("@@RESULTS@@")
    assert marker >= 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(res.stdout[marker + len("@@RESULTS@@"):])


def one_error_line(r: dict, *needles: str) -> str:
    """The case failed with exit 2 and one ``error:`` line containing every needle; no traceback."""
    out = r["out"]
    assert r["code"] == 2, f"{r['argv']}: exit {r['code']}\n{out[-3000:]}"
    assert "Traceback" not in out, f"{r['argv']}:\n{out[-3000:]}"
    lines = [ln for ln in out.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, f"{r['argv']}:\n{out[-3000:]}"
    for n in needles:
        assert n in lines[0], f"{r['argv']}: {n!r} not in {lines[0]!r}"
    return lines[0]
