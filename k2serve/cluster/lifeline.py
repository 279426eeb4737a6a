"""Children that die with their launcher: the router and workers `k2serve up` starts run in sessions of
their own (a Ctrl-C or a SIGTERM to the launcher's process group must not reach them before the
launcher drains them in order), so nothing else would end them when the launcher dies.

Two independent guards, both armed in the child:
- Linux's parent-death signal: `Lifeline.popen_kwargs()` gives a `preexec_fn` that asks the kernel to
  SIGTERM the child when the launcher's spawning thread dies (PR_SET_PDEATHSIG via prctl), and exits
  at once if the launcher is already gone by then;
- a pipe watchdog, for what the signal misses (another OS, a launcher thread that exits first, a
  child that re-parents): the child inherits the read end of a pipe whose write end only the launcher
  holds. `arm_from_env()`, called first thing in every `k2serve` process, starts a thread that blocks
  on it; end of file means the launcher is gone: the child SIGTERMs itself (it drains and stops as
  on any SIGTERM) and exits hard if it still runs `grace_s` later.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

FD_ENV = "K2SERVE_LIFELINE_FD"  # the read end's number in the child
GRACE_ENV = "K2SERVE_LIFELINE_GRACE_S"
DEFAULT_GRACE_S = 5.0
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` (it runs in the child between fork and exec) that asks Linux to SIGTERM the child
    when the parent's thread that forked it dies, and exits the child if that parent died already;
    None where the call does not exist."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork: the child only makes the call
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the launcher died before the call: nobody would signal us
            os._exit(1)

    return preexec


class Lifeline:
    """The launcher's end: one pipe for all its children. Pass `popen_kwargs()` to each
    `subprocess.Popen`; the children see end of file when this process exits (however it dies) or
    `close()` is called. `grace_s`: how long a child may take to stop after SIGTERMing itself."""

    def __init__(self, grace_s: float = DEFAULT_GRACE_S) -> None:
        self._read, self._write = os.pipe()  # both close-on-exec: only pass_fds reaches a child
        self.grace_s = grace_s

    def popen_kwargs(self, env: dict[str, str]) -> dict[str, Any]:
        """`subprocess.Popen` arguments for a child tied to this launcher: its own session, the
        parent-death signal (only when spawned from the main thread: Linux sends it when the spawning
        thread ends, which a short-lived thread would do while the launcher lives on), the pipe's
        read end and `env` with the variables `arm_from_env` reads."""
        main = threading.current_thread() is threading.main_thread()
        return {
            "start_new_session": True,
            "preexec_fn": die_with_parent() if main else None,
            "pass_fds": (self._read,),
            "env": env | {FD_ENV: str(self._read), GRACE_ENV: str(self.grace_s)},
        }

    def close(self) -> None:
        """Cut the line: every child still running SIGTERMs itself. Idempotent."""
        for fd in (self._write, self._read):
            if fd >= 0:
                os.close(fd)
        self._read = self._write = -1


def arm_from_env() -> threading.Thread | None:
    """In a child started with `Lifeline.popen_kwargs`: watch the pipe on a daemon thread (returned);
    elsewhere (no FD_ENV) do nothing and return None. The variables are removed from the environment so
    this process's own children do not watch its launcher's pipe."""
    fd_text = os.environ.pop(FD_ENV, None)
    grace_s = float(os.environ.pop(GRACE_ENV, DEFAULT_GRACE_S))
    if fd_text is None:
        return None
    fd = int(fd_text)
    os.set_inheritable(fd, False)
    thread = threading.Thread(target=_watch, args=(fd, grace_s), name="k2serve-lifeline", daemon=True)
    thread.start()
    return thread


def _watch(fd: int, grace_s: float) -> None:
    """Block until the launcher's end closes, then stop this process: SIGTERM, and a hard exit after
    `grace_s` seconds if the SIGTERM did not end it."""
    while True:
        try:
            if not os.read(fd, 1):  # end of file: no process holds the write end any more
                break
        except InterruptedError:
            continue
        except OSError:
            break
    print(f"k2serve (pid {os.getpid()}): its launcher is gone; stopping", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)
    print(
        f"k2serve (pid {os.getpid()}): still running {grace_s:.0f} s later; exiting",
        file=sys.stderr,
        flush=True,
    )
    os._exit(1)
