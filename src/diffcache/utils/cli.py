"""Entry-point helpers: input mistakes end with one clear line, not a stack trace."""
from __future__ import annotations

import contextlib
import logging
import os
import sys

USER_ERRORS = (ValueError, FileNotFoundError, KeyError, TypeError)


@contextlib.contextmanager
def user_errors():
    """Turn configuration / input errors into ``error: <message>`` and exit status 2.

    Set ``DIFFCACHE_DEBUG=1`` to get the full traceback instead.
    """
    try:
        yield
    except USER_ERRORS as e:
        if os.environ.get("DIFFCACHE_DEBUG"):
            raise
        logging.getLogger("diffcache").debug("user error", exc_info=True)
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}\n(set DIFFCACHE_DEBUG=1 for the full traceback)", file=sys.stderr)
        sys.exit(2)
