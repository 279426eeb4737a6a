"""`k2serve up` as a user and a load script run it: it prints "ready" only once the router is ready (a
request sent at once succeeds); SIGKILLed, it leaves no process of its cluster behind (router, workers,
embedded Redis: they die with it); SIGTERM to its process group stops a 2P2D cluster well within
Kubernetes' 30 s grace."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import SMALL_KV

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(400),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]
STARTUP_S = 240.0
GRACE_S = 30.0  # Kubernetes' default terminationGracePeriodSeconds


@dataclass
class Up:
    popen: subprocess.Popen[str]
    lines: list[str]  # its output up to and including the "ready:" line
    url: str  # the router's HTTP base URL
    pids: dict[str, int]  # every process of its cluster, by name (from its status table)


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie nobody reaped yet counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_gone(pids: dict[str, int], timeout: float) -> float:
    """Seconds until none of `pids` runs; AssertionError naming the survivors after `timeout`."""
    t0 = time.monotonic()
    while any(alive(pid) for pid in pids.values()):
        left = {name: pid for name, pid in pids.items() if alive(pid)}
        assert time.monotonic() - t0 < timeout, f"still running {timeout:.0f} s later: {left}"
        time.sleep(0.1)
    return time.monotonic() - t0


@contextmanager
def k2serve_up(tiny_ckpt: Path, workdir: Path, prefill: int, decode: int) -> Iterator[Up]:
    """`k2serve up` in a session of its own; yields once it printed "ready". Anything of it still
    running on the way out is SIGKILLed (the test failed)."""
    args = ["up", "--model", str(tiny_ckpt), "--dtype", "float32", "--port", "0", "--grpc-port", "0"]
    args += ["--prefill", str(prefill), "--decode", str(decode), "--workdir", str(workdir), *SMALL_KV]
    popen = subprocess.Popen(
        [sys.executable, "-m", "k2serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ) | {"PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )
    out: queue.Queue[str] = queue.Queue()
    assert popen.stdout is not None
    stdout = popen.stdout
    threading.Thread(target=lambda: [out.put(line) for line in stdout], daemon=True).start()
    lines: list[str] = []
    pids: dict[str, int] = {}
    try:
        deadline = time.monotonic() + STARTUP_S
        while not (lines and lines[-1].startswith("ready:")):
            assert popen.poll() is None or not out.empty(), f"up exited {popen.returncode}:\n{''.join(lines)}"
            try:
                lines.append(out.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue.Empty:
                raise AssertionError(f"no 'ready' in {STARTUP_S:.0f} s:\n{''.join(lines)}") from None
        for line in lines:  # the status table: "name  pid  running  log"
            if m := re.match(r"(\S+)\s+(\d+)\s", line):
                pids[m.group(1)] = int(m.group(2))
        url = re.search(r"(https?://\S+)/v1", lines[-1])
        assert url is not None, lines[-1]
        yield Up(popen, lines, url.group(1), pids)
    finally:
        for pid in [popen.pid, *pids.values()]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        popen.wait()


def test_up_is_ready_when_it_says_so_and_a_sigkill_leaves_nothing(tiny_ckpt: Path, tmp_path: Path) -> None:
    with k2serve_up(tiny_ckpt, tmp_path, 1, 1) as up:
        assert set(up.pids) == {"router", "prefill-0", "decode-0", "redis"}, up.lines
        ready = httpx.get(f"{up.url}/health/ready")  # the moment "ready" was printed
        assert ready.status_code == 200, ready.text
        body = {"prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0}
        r = httpx.post(f"{up.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        up.popen.send_signal(signal.SIGKILL)
        up.popen.wait()
        took = wait_gone(up.pids, 15.0)
        print(f"\nk2serve up SIGKILLed: its {len(up.pids)} processes gone {took:.2f} s later")


def test_sigterm_to_up_stops_a_2p2d_cluster_within_the_grace_period(tiny_ckpt: Path, tmp_path: Path) -> None:
    with k2serve_up(tiny_ckpt, tmp_path, 2, 2) as up:
        assert len(up.pids) == 6, up.lines  # router, 2 prefill, 2 decode, redis
        t0 = time.monotonic()
        os.killpg(up.popen.pid, signal.SIGTERM)  # as a load script or kubelet stops it
        up.popen.wait(timeout=GRACE_S)
        took = time.monotonic() - t0 + wait_gone(up.pids, 1.0)
        assert up.popen.returncode == 0
        assert took < GRACE_S, took
        print(f"\nk2serve up (2P2D) stopped on SIGTERM in {took:.2f} s")


def cluster_processes(workdir: Path) -> dict[str, int]:
    """Running processes whose command line names `workdir` (every process of an `up --workdir` cluster
    does: its ready file or its Redis configuration lives there), by pid."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(workdir) in cmdline and alive(int(entry.name)):
            found[cmdline[:120]] = int(entry.name)
    return found


def test_sigterm_while_up_is_starting_stops_what_it_started(tiny_ckpt: Path, tmp_path: Path) -> None:
    """A load script that gives up on a slow start: `up` must not finish starting first (up to its
    180 s startup timeout) nor leave the processes it had started."""
    args = ["up", "--model", str(tiny_ckpt), "--dtype", "float32", "--port", "0", "--grpc-port", "0"]
    args += ["--workdir", str(tmp_path), *SMALL_KV]
    up = subprocess.Popen(
        [sys.executable, "-m", "k2serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ) | {"PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + STARTUP_S
        while not (tmp_path / "logs" / "decode-0.log").exists():  # the router runs, workers start
            assert up.poll() is None and time.monotonic() < deadline, up.returncode
            time.sleep(0.05)
        started = cluster_processes(tmp_path)
        assert len(started) >= 3, started  # redis, router, the workers being spawned
        t0 = time.monotonic()
        os.killpg(up.pid, signal.SIGTERM)
        out, _ = up.communicate(timeout=GRACE_S)
        took = time.monotonic() - t0
        assert up.returncode == 0 and "stopped before the cluster was ready" in out, out
        assert "ready:" not in out, out
        wait_gone(started, 2.0)
        assert cluster_processes(tmp_path) == {}
        print(f"\nk2serve up stopped {took:.2f} s after a SIGTERM while starting")
    finally:
        for pid in cluster_processes(tmp_path).values():
            os.kill(pid, signal.SIGKILL)
        if up.poll() is None:
            up.kill()
            up.wait()
