"""The type checker over k2serve/ (mypy, configured in pyproject.toml's [tool.mypy]) finds nothing.

CI runs only pytest, so this is where the checker runs in CI. A cold run takes one to two minutes
on two cores (most of it reading torch's stubs); mypy's cache (.mypy_cache, ignored by git) makes
the next run take seconds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_mypy_is_clean_over_k2serve() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )
    assert done.returncode == 0, f"mypy (pyproject.toml [tool.mypy]) reports:\n{done.stdout}{done.stderr}"
