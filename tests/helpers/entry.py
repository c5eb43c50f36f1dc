"""`python -m <module> <args>`, run in the test's own process.

A new interpreter spends seconds importing torch and timm again (params validation asks timm for
each model name); in this process they are loaded already. The module runs as ``__main__`` with
``sys.argv`` set, the way ``python -m`` runs it, and its exit is turned into the status the
interpreter would give, printing a message the way the interpreter does. The root logger starts
without handlers, as in a fresh interpreter, so an entry point's ``logging.basicConfig`` writes to
stderr as it would there. What the entry point changes in the process (the SIGTERM handler, the
root logger) is put back afterwards. The process is not ended after the entry point returns
(``cli.SKIP_TEARDOWN`` is off while it runs).
"""

from __future__ import annotations

import logging
import runpy
import signal
import sys
import warnings
from unittest import mock

from noisy_student.core import cli


def run_main(module: str, args: list[str]) -> int:
    """The exit status of ``python -m module *args``; its output goes to this process's
    ``sys.stdout`` and ``sys.stderr`` (read them with pytest's ``capsys``)."""
    sigterm = signal.getsignal(signal.SIGTERM)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    root.handlers[:] = []  # pytest's capturing handlers: basicConfig would do nothing beside them
    try:
        with (
            mock.patch.object(sys, "argv", [module, *args]),
            mock.patch.object(cli, "SKIP_TEARDOWN", False),
            warnings.catch_warnings(),
        ):
            # the test imported the module already: runpy runs a fresh copy as __main__ and warns
            warnings.filterwarnings("ignore", "'.*' found in sys.modules", RuntimeWarning)
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)  # sys.exit("message"): the interpreter prints it, status 1
        return 1
    finally:
        signal.signal(signal.SIGTERM, sigterm)
        root.handlers[:] = handlers
        root.setLevel(level)
    return 0
