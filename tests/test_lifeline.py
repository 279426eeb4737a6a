"""k2serve.cluster.lifeline: a child started through a Lifeline dies with its launcher, even when the
launcher is SIGKILLed; by the parent-death signal, by the pipe watchdog alone (spawned from a thread,
where the signal is not armed), and by the watchdog's hard exit when the child ignores SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

# The launcher: spawns one child through a Lifeline (from the main thread or from a thread that ends at
# once), prints the child's pid and waits to be killed. CHILD is the child's Python source.
LAUNCHER = """
import os, sys, threading, time
from k2serve.cluster.lifeline import Lifeline
line = Lifeline(grace_s=1.0)
mode, child = sys.argv[1], sys.argv[2]
pids = []
def spawn():
    import subprocess
    p = subprocess.Popen([sys.executable, "-c", child], **line.popen_kwargs(dict(os.environ)))
    pids.append(p.pid)
if mode == "main":
    spawn()
else:
    t = threading.Thread(target=spawn)
    t.start()
    t.join()
print(pids[0], flush=True)
time.sleep(120)
"""
ARMED_CHILD = (
    "from k2serve.cluster.lifeline import arm_from_env; arm_from_env(); import time; time.sleep(120)"
)
STUBBORN_CHILD = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
    "from k2serve.cluster.lifeline import arm_from_env; arm_from_env(); time.sleep(120)"
)
UNARMED_CHILD = "import time; time.sleep(120)"  # no watchdog: only the parent-death signal ends it


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for a reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def seconds_until_gone(pid: int, timeout: float) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if not alive(pid):
            return time.monotonic() - t0
        time.sleep(0.05)
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize(
    ("mode", "child", "within_s"),
    [
        ("main", UNARMED_CHILD, 5.0),  # the parent-death signal
        ("thread", ARMED_CHILD, 5.0),  # the watchdog: EOF -> SIGTERM
        ("thread", STUBBORN_CHILD, 6.0),  # the watchdog: SIGTERM ignored -> hard exit after 1 s grace
    ],
    ids=["pdeathsig", "watchdog", "watchdog-hard-exit"],
)
def test_a_child_dies_with_its_sigkilled_launcher(mode: str, child: str, within_s: float) -> None:
    launcher = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(LAUNCHER), mode, child],
        stdout=subprocess.PIPE,
        env=dict(os.environ),
        start_new_session=True,
    )
    assert launcher.stdout is not None
    pid = int(launcher.stdout.readline())
    try:
        time.sleep(1.0)  # the child is up (and armed)
        assert alive(pid), "the child did not start"
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        took = seconds_until_gone(pid, within_s)
        assert took is not None, f"child {pid} outlived its launcher by {within_s} s"
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


def test_without_a_lifeline_nothing_is_armed() -> None:
    from k2serve.cluster.lifeline import FD_ENV, arm_from_env

    assert FD_ENV not in os.environ
    assert arm_from_env() is None
