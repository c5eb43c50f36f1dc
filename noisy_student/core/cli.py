"""Shared plumbing for the entry points: the stages of dvc.yaml, predict and recipes."""

from __future__ import annotations

import argparse
import atexit
import errno
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

from noisy_student.core.errors import PipelineError
from noisy_student.core.settings import PARAMS_FILE, Settings, load_settings


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description.strip().splitlines()[0])
    p.add_argument("--params", default=str(PARAMS_FILE), help="params file (default: params.yaml)")
    return p


def run(main: Callable[[argparse.Namespace, Settings], None], args: argparse.Namespace) -> None:
    """Load settings, run one stage, and turn a PipelineError into one line and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    # a kill (CI timeout, `kill`) unwinds like Ctrl-C, so context managers close MLflow runs
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        settings = load_settings(args.params)
        main(args, settings)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:  # the machine's side: a read-only folder, a full disk, ...
        print(f"error: {os_error(exc)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# Each stage is a process of its own (dvc repro starts one per stage). The interpreter's teardown,
# which frees torch's, timm's and MLflow's modules one by one, takes 1-2 s of each such process
# and does nothing a finished stage needs. Tests that run an entry point inside their own process
# (tests/helpers/entry.py) turn it off.
SKIP_TEARDOWN = True


def main_process(main: Callable[[], None]) -> None:
    """Run an entry point as its process's ``__main__``; once it returns, end the process the way
    the interpreter would (non-daemon threads joined, at-exit handlers run: MLflow ends its runs,
    logging flushes), without the teardown."""
    main()
    if not SKIP_TEARDOWN:
        return
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def os_error(exc: OSError) -> str:
    """One line naming the path and what the system said, with what to do where it is clear."""
    where = exc.filename if exc.filename is not None else "(no path)"
    hints = {
        errno.EACCES: "make the folder writable, or run from a copy of the project",
        errno.EPERM: "make the folder writable, or run from a copy of the project",
        errno.EROFS: "the file system is read-only: run from a writable copy of the project",
        errno.ENOSPC: "the disk is full: free space (dvc gc cleans DVC's cache)",
    }
    hint = hints.get(exc.errno)
    return f"{where}: {exc.strerror or exc}" + (f" ({hint})" if hint else "")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
