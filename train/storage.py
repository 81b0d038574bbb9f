"""A full disk under a run: one line instead of the storage layer's tracebacks.

When the disk (or quota) of ``train.run_dir`` fills up, Orbax's background save threads fail with
TensorStore's ``RESOURCE_EXHAUSTED: Error writing ... No space left on device`` (or a plain ``OSError``
ENOSPC), log it with a traceback from every thread involved, and raise it again at the next save or wait.
:func:`disk_full` recognises that failure anywhere in an exception's chain; :class:`DiskFull` is the user
error the loop raises instead (which step, which directory, the step a rerun resumes from), and
:class:`QuietStorageFailures` keeps the threads' logged tracebacks of such a failure off the terminal.
A checkpoint is written to a temporary directory and renamed when complete, so the last good one is
never touched; the next run's checkpoint manager removes the half-written one.
"""
from __future__ import annotations

import errno
import logging
import sys
import threading
from pathlib import Path

from qkv.errors import UserError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded", "os_error_code='28'", "os_error_code='122'")
# Logged by the storage threads as consequences of the first failure (their event loops already closed).
AFTERMATH_TEXT = ("Event loop is closed", "Python is likely shutting down", "Handler Commit operations",
                  "Save Finalize thread")


class DiskFull(UserError):
    """The disk of the run directory is full: nothing was lost, the rerun resumes from the last good step."""


def _chain(err: BaseException | None):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def disk_full(err: BaseException | None) -> bool:
    """Whether ``err`` (or an exception it was raised from) is a write that failed for lack of space."""
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            return True
        if any(text in str(e) for text in NO_SPACE_TEXT):
            return True
    return False


def disk_full_error(run_dir: Path, step: int | None, last_good: int | None, at_step: int) -> DiskFull:
    where = (f"the checkpoint of step {step} could not be written to {Path(run_dir) / 'checkpoints'}"
             if step is not None else f"writing the files of {run_dir} failed at step {at_step}")
    resume = (f"it resumes from step {last_good}, the last complete checkpoint" if last_good is not None
              else "it starts again from step 0 (no checkpoint was complete)")
    return DiskFull(f"the disk is full (no space left on device): {where}; free space there (or choose another "
                    f"train.run_dir) and run the same command again: {resume}")


def _noise(text: str) -> bool:
    return any(t in text for t in NO_SPACE_TEXT + AFTERMATH_TEXT)


def _aftermath(value: BaseException | None) -> bool:
    """A storage thread's report that its event loop is already closed: the consequence of a failed write,
    which can be printed before the failure itself has been seen (the threads race the main thread)."""
    return value is not None and any(t in str(e) for e in _chain(value) for t in AFTERMATH_TEXT)


class _Filter(logging.Filter):
    def __init__(self, quiet: "QuietStorageFailures"):
        super().__init__()
        self.quiet = quiet

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += " " + " ".join(str(e) for e in _chain(record.exc_info[1]))
        if any(t in text for t in NO_SPACE_TEXT):
            self.quiet.seen = True
        return not (self.quiet.seen and _noise(text))


class QuietStorageFailures:
    """While active, once a write has failed for lack of space: drop the log records (absl from Orbax, asyncio)
    and the unhandled-exception reports of the storage threads that repeat it or follow from it. Every other
    record and report passes. The hooks for reports printed at interpreter exit stay installed after a failure
    (the process is about to end with the one-line error)."""

    LOGGERS = ("absl", "asyncio")

    def __init__(self):
        self.seen = False
        self._filter = _Filter(self)

    def __enter__(self) -> "QuietStorageFailures":
        for name in self.LOGGERS:
            logging.getLogger(name).addFilter(self._filter)
        self._hooks = (sys.excepthook, threading.excepthook, sys.unraisablehook)
        outer_except, outer_thread, outer_unraisable = self._hooks

        def excepthook(kind, value, tb):
            if not (_aftermath(value) or self.seen and _noise(" ".join(str(e) for e in _chain(value)))):
                outer_except(kind, value, tb)

        def thread_hook(args):
            if not (_aftermath(args.exc_value) or self.seen and args.exc_value is not None
                    and _noise(" ".join(map(str, _chain(args.exc_value))))):
                outer_thread(args)

        def unraisable_hook(args):
            if not (_aftermath(args.exc_value) or self.seen and args.exc_value is not None
                    and _noise(" ".join(map(str, _chain(args.exc_value))))):
                outer_unraisable(args)

        sys.excepthook, threading.excepthook, sys.unraisablehook = excepthook, thread_hook, unraisable_hook
        return self

    def __exit__(self, *exc) -> None:
        if exc[1] is not None and disk_full(exc[1]):
            self.seen = True
        if not self.seen:  # nothing failed: put everything back
            for name in self.LOGGERS:
                logging.getLogger(name).removeFilter(self._filter)
            sys.excepthook, threading.excepthook, sys.unraisablehook = self._hooks
