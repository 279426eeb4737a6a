"""`k2serve serve` as a real process: API key from the environment, and SIGTERM drains (503 for new
requests while the in-flight stream finishes) before a clean exit."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import serve_popen

pytestmark = pytest.mark.timeout(180)
KEY = "env-secret"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    with serve_popen(tmp_path, KEY) as served:
        yield served


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
