"""User mistakes versus failures: what the command line prints as one line, exit code 2.

A user mistake is a wrong config value, table, address, model URI, resume id or output path.
raydir raises them as :class:`UserError`, or as ``ValueError`` / ``TypeError`` /
``FileNotFoundError`` / ``ConnectionError`` from its own code (the innermost frame of the
traceback is in the ``raydir`` package), also when they come back wrapped by a Ray task or a
Ray Train worker. Anything else (an error inside torch, numpy, Ray or MLflow) is a failure and
keeps its traceback.
"""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE_DIR = str(Path(__file__).resolve().parent)

USER_TYPES = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
              PermissionError, ConnectionError)


class UserError(ValueError):
    """A mistake in what the user gave: the message names it, what was expected and the fix."""


def _raised_by_raydir(exc: BaseException, remote_text: str = "") -> bool:
    tb, last = exc.__traceback__, None
    while tb is not None:
        last, tb = tb.tb_frame.f_code.co_filename, tb.tb_next
    if last is None:  # a traceback lost on its way back from a Ray process: see its text
        text = getattr(exc, "traceback_str", "") or remote_text
        files = re.findall(r'File "([^"]+)"', text)
        return bool(files) and str(Path(files[-1]).resolve()).startswith(PACKAGE_DIR)
    return str(Path(last).resolve()).startswith(PACKAGE_DIR)


def _unwrap(exc: BaseException) -> BaseException:
    """The original exception behind Ray's wrappers (a task error, a worker group error)."""
    for _ in range(10):
        inner = getattr(exc, "cause", None)  # ray.exceptions.RayTaskError
        failures = getattr(exc, "worker_failures", None)  # Ray Train's WorkerGroupError
        if isinstance(failures, dict) and failures:
            inner = next(iter(failures.values()))
        if inner is None and type(exc).__module__.startswith("ray.") and exc.__cause__ is not None:
            inner = exc.__cause__
        if not isinstance(inner, BaseException) or inner is exc:
            return exc
        exc = inner
    return exc


def user_message(exc: BaseException) -> str | None:
    """One line describing ``exc`` when it is a user mistake, else None."""
    inner = _unwrap(exc)
    remote = getattr(exc, "traceback_str", "") or ""  # Ray's text of the remote traceback
    if isinstance(inner, UserError) or (isinstance(inner, USER_TYPES) and _raised_by_raydir(inner, remote)):
        text = str(inner) if not isinstance(inner, KeyError) else str(inner.args[0])
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if any(line.startswith("Traceback") for line in lines):  # Ray's text of a remote error
            lines = lines[-1:]
        return " ".join(lines) or type(inner).__name__
    return None
