"""Entry-point helpers: input mistakes end with one clear line, not a stack trace.

Only errors that describe the *input* are caught: ``ValueError`` (bad settings, wrong files),
``FileNotFoundError``, ``PermissionError`` (a directory that cannot be written), ``FloatingPointError``
(a diverged run), and a Hydra ``InstantiationException`` whose cause is one of those or a config key the
class does not take. ``TypeError`` / ``KeyError`` elsewhere are programming bugs and keep their traceback.
A run that fails leaves its output folder marked: ``FAILED`` holds the error line. In a sweep (``-m``) an
input error ends only its own job, so the other jobs still run; the sweep table lists the failure and
the sweep exits with status 2 (:class:`~diffcache.utils.sweep.SweepSummary` records it with
:func:`exit_later`; the entry point's :func:`run_main` exits with it).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, FloatingPointError)
_CONFIG_TYPE_ERRORS = ("unexpected keyword argument", "unknown ToCa options", "missing 1 required")


_LATER: list[int] = []


def exit_later(code: int) -> None:
    """A Hydra callback's verdict on the whole run (a sweep with failed jobs): the status :func:`run_main`
    exits with once Hydra has returned, so the exit stays in the entry point."""
    _LATER.append(int(code))


class Rejected(BaseException):
    """An input the run must not start with, found by the preflight callback before Hydra writes anything into
    the run folder. A ``BaseException`` so that Hydra's own handler (which catches ``Exception``, prints a
    trimmed traceback and exits 1) lets it through to :func:`run_main`, which prints it and exits 2."""


def _exit_with_input_error(msg: str) -> None:
    """The one line an input error ends with, the debug hint, and exit status 2."""
    print(f"error: {msg}\n(set DIFFCACHE_DEBUG=1 for the full traceback)", file=sys.stderr)
    sys.exit(2)


def run_main(main) -> None:
    """Call an entry point's ``@hydra.main`` function, then exit with the status a callback left, if any: 2 for
    a :class:`Rejected` input or a sweep with failed jobs."""
    _LATER.clear()
    try:
        main()
    except Rejected as e:
        _exit_with_input_error(str(e))
    if _LATER:
        sys.exit(max(_LATER))


def user_error(e: BaseException) -> BaseException | None:
    """The input error ``e`` stands for, or None if it is a bug (keep the traceback)."""
    from hydra.errors import InstantiationException

    if isinstance(e, InstantiationException) and e.__cause__ is not None:
        cause = e.__cause__
        if isinstance(cause, TypeError) and any(s in str(cause) for s in _CONFIG_TYPE_ERRORS):
            return cause
        return user_error(cause)
    return e if isinstance(e, USER_ERRORS) else None


def mark_failed(output_dir, message: str) -> None:
    """Write ``FAILED`` (the error line) into a run folder, so a failed run never looks like a finished one."""
    try:
        if output_dir and Path(output_dir).is_dir():
            (Path(output_dir) / "FAILED").write_text(message.rstrip() + "\n")
    except OSError:
        pass


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # noqa: BLE001
        return False


def _output_dir() -> str | None:
    from hydra.core.hydra_config import HydraConfig

    try:
        return HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None
    except Exception:  # noqa: BLE001 - no run folder known (a composed config in a test, an early failure)
        return None


@contextlib.contextmanager
def user_errors():
    """Turn configuration / input errors into ``error: <message>`` and exit status 2.

    Set ``DIFFCACHE_DEBUG=1`` to get the full traceback instead.
    """
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised unless it is an input error
        err = user_error(e)
        mark_failed(_output_dir(), f"{type(err or e).__name__}: {err or e}")
        if err is None or os.environ.get("DIFFCACHE_DEBUG"):
            raise
        logging.getLogger("diffcache").debug("user error", exc_info=True)
        msg = str(err).replace("\n", " ")
        if _in_sweep():  # this job is over; the sweep goes on and reports it at the end
            print(f"error: {msg}", file=sys.stderr)
            return
        _exit_with_input_error(msg)
    except KeyboardInterrupt:
        mark_failed(_output_dir(), "KeyboardInterrupt")
        raise
