"""One way to write a file that a killed run may leave behind: whole or not at all."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def write_atomically(path: str | Path, write: Callable[[Path], object], suffix: str = "") -> Path:
    """``write(tmp)``, then rename ``tmp`` onto ``path`` (atomic on one filesystem), so a reader or a resumed
    run never sees a half-written file. ``tmp`` sits beside ``path`` and carries the process id, so ranks or
    processes writing the same path never share it; ``suffix`` ends its name for writers that insist on one
    (``np.savez`` appends ``.npz`` otherwise)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}{suffix}")
    write(tmp)
    os.replace(tmp, path)
    return path
