"""Where the trained `demo` checkpoint ships (k2serve/model/demo/, package data) and how it is copied.

`k2serve init-model DIR --preset demo` copies it; `--preset demo` on serve / up / the workers uses it in
place (it is read-only there). `k2serve train-demo` (k2serve.model.demo_train) makes it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

DEMO_PRESET = "demo"
# The files a demo checkpoint directory holds (train_loss.csv: the loss per training step).
DEMO_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "tiktoken.model",
    "tokenizer_config.json",
    "train_loss.csv",
)


def demo_model_dir() -> Path:
    """The shipped demo checkpoint; FileNotFoundError naming what is missing when it is incomplete."""
    root = Path(__file__).resolve().parent / "demo"
    missing = [f for f in DEMO_FILES if not (root / f).exists()]
    if missing:
        raise FileNotFoundError(
            f"the demo checkpoint in {root} lacks {', '.join(missing)} (an install without package data? "
            "`k2serve train-demo --out DIR` makes one)"
        )
    return root


def copy_demo_model(out_dir: str | Path) -> Path:
    """Copy the shipped demo checkpoint into `out_dir` (created); returns it."""
    src = demo_model_dir()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in DEMO_FILES:
        shutil.copyfile(src / name, out / name)
    return out
