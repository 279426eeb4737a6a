"""`k2serve bench tool-schemas` on a few generated requests: every emitted call validates against its
tool's schema (under tool_choice "auto", the grammar binds once the section opens)."""

from __future__ import annotations

import json

import pytest

from k2serve.bench.tool_schemas import generate_requests, main

pytestmark = pytest.mark.timeout(120)


def test_generated_requests_vary() -> None:
    reqs = generate_requests(40, seed=1)
    text = json.dumps(reqs)
    assert {r["tool_choice"] for r in reqs} == {"auto", "required"}
    for needle in ('"enum"', '"array"', '"object"', '"strict": true', '"required": []'):
        assert needle in text, needle


def test_every_emitted_call_validates(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--requests", "12", "--seed", "3", "--max-steps", "1500"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["calls"] > 0 and report["valid_calls"] == report["calls"] and report["errors"] == []
