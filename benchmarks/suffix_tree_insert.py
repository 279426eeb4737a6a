"""Per-token insert cost of the suffix trie (k2serve/engine/spec_decode.py:SuffixTree), this checkout's
against another git revision's, at tree depths 10 and 24 (vLLM's default).

Work: 12 agent-like prompts of ~1,000 tokens (100-token blocks, half of them repeats of 8 recurring
blocks, vocabulary 3,000), each built into its own tree; the trees stay alive for the whole round
(as a serving engine's live and parked trees do), so the cyclic garbage collector's walks over them
count, and the process holds the demo model's engine first (a serving process's heap). Rounds
alternate which implementation goes first; prints the median (min..max) CPU microseconds per inserted
token over the rounds, and checks that both build the same trie (node and occurrence counts).

    python benchmarks/suffix_tree_insert.py [--old-ref fb5ccf9] [--rounds 5]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from k2serve.engine import spec_decode

ROOT = Path(__file__).resolve().parent.parent


def load_revision(ref: str) -> ModuleType:
    """k2serve/engine/spec_decode.py as of git revision `ref`, imported as its own module."""
    source = subprocess.run(  # noqa: S603 (fixed argv; the revision is the caller's own argument)
        ["git", "show", f"{ref}:k2serve/engine/spec_decode.py"],  # noqa: S607 (git from PATH)
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "spec_decode_old.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("spec_decode_old", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)  # noqa: S311 (benchmark data)
    blocks = [[rng.randrange(3000) for _ in range(100)] for _ in range(8)]
    out = []
    for _ in range(12):
        seq: list[int] = []
        for _ in range(10):
            fresh = [rng.randrange(3000) for _ in range(100)]
            seq += rng.choice(blocks) if rng.random() < 0.5 else fresh
        out.append(seq)
    return out


def build(module: Any, depth: int, seqs: list[list[int]]) -> tuple[float, int, int]:
    """(seconds, nodes, root count) to build one tree per sequence, all kept alive until the end."""
    keep = []
    t0 = time.process_time()  # CPU time: the host is shared, wall time swings with others' load
    for s in seqs:
        tree = module.SuffixTree(depth)
        tree.extend(0, s)
        keep.append(tree)
    seconds = time.process_time() - t0
    return seconds, sum(t.num_nodes for t in keep), sum(t.length(0) for t in keep)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old-ref", default="fb5ccf9", help="git revision of the implementation to compare")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--model", default=str(ROOT / "k2serve/model/demo"), help="loaded first ('' for none)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    engine = None
    if args.model:
        from k2serve.engine.config import EngineConfig
        from k2serve.engine.llm_engine import LLMEngine

        engine = LLMEngine.from_pretrained(Path(args.model), torch.float32, EngineConfig(num_kv_blocks=256))
    impls = {"old": load_revision(args.old_ref), "new": spec_decode}
    seqs = prompts(0)
    tokens = sum(map(len, seqs))
    us: dict[tuple[str, int], list[float]] = {}
    for rnd in range(args.rounds):
        order = ["old", "new"] if rnd % 2 == 0 else ["new", "old"]
        for depth in (10, 24):
            sizes = set()
            for name in order:
                seconds, nodes, count = build(impls[name], depth, seqs)
                us.setdefault((name, depth), []).append(seconds / tokens * 1e6)
                sizes.add((nodes, count))
                gc.collect()
            if len(sizes) != 1:
                raise SystemExit(f"depth {depth}: the two implementations built different tries: {sizes}")
    print(
        f"{tokens} tokens a round in 12 trees, {args.rounds} rounds; old = {args.old_ref}, new = this checkout"
    )
    print("impl  depth  us per inserted token: median (min..max)")
    for (name, depth), values in sorted(us.items()):
        print(f"{name:4}  {depth:5}  {statistics.median(values):.2f} ({min(values):.2f}..{max(values):.2f})")
    del engine
    return 0


if __name__ == "__main__":
    sys.exit(main())
