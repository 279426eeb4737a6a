"""`k2serve serve` as a real process: API key from the environment, and SIGTERM drains (503 for new
requests while the in-flight stream finishes) before a clean exit."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.timeout(180)
KEY = "env-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    env = {**os.environ, "K2SERVE_HOME": str(tmp_path), "K2SERVE_API_KEY": KEY, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "k2serve.cli",
        "serve",
        "--preset",
        "tiny",
        "--port",
        str(port),
        "--max-model-len",
        "512",
        "--kv-cache-mb",
        "16",
        "--served-model-name",
        "tiny",
    ]
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "server did not come up"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        log.close()


def test_sigterm_drains_then_exits_cleanly(server: tuple[str, subprocess.Popen[bytes]]) -> None:
    url, proc = server
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401
    models = httpx.get(f"{url}/v1/models", headers=auth, timeout=10).json()
    assert [m["id"] for m in models["data"]] == ["tiny"]

    lines: list[str] = []
    started = threading.Event()
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 400,
        "ignore_eos": True,
        "stream": True,
    }

    def stream() -> None:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=auth, timeout=60) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    started.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(30)
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    status = 0
    while status != 503 and time.monotonic() < deadline:
        r = httpx.post(
            f"{url}/v1/chat/completions",
            json={**body, "stream": False, "max_tokens": 2},
            headers=auth,
            timeout=10,
        )
        status = r.status_code
        assert status in (200, 503)
    assert status == 503 and r.json()["error"]["code"] == "draining"
    reader.join(60)
    assert not reader.is_alive()
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert lines[-1] == "data: [DONE]"
    assert events[-1]["choices"][0]["finish_reason"] == "length"  # the in-flight stream ran to the end
    assert proc.wait(timeout=60) == 0
