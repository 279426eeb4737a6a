"""Peak resident memory of loading a checkpoint, against the checkpoint's own bytes.

Run: `python -m k2serve.bench.load_memory --model DIR` (or `--preset small --quant int4` to write one).
The load runs in a fresh process; the figure is (peak RSS during the load - RSS after imports), so
the interpreter and torch themselves (torch._dynamo included, which torch's meta-device context imports
lazily) are not counted, divided by the bytes of the safetensors shards.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, sys, torch
import torch._dynamo  # torch's meta-device context imports it lazily: a fixed per-process cost, not the load's
from k2serve.model.loader import load_model

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
base = status("VmRSS:")
model = load_model(sys.argv[1], getattr(torch, sys.argv[2]))
peak = status("VmHWM:")
held = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
print(json.dumps({"rss_after_imports": base, "peak_rss": peak, "model_bytes": held}))
"""


def measure(model_dir: Path, dtype: str = "bfloat16") -> dict[str, float]:
    out = subprocess.run(  # noqa: S603 - this interpreter running our own child script
        [sys.executable, "-c", _CHILD, str(model_dir), dtype], check=True, capture_output=True, text=True
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    ckpt = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    r["checkpoint_bytes"] = ckpt
    r["load_peak_bytes"] = r["peak_rss"] - r["rss_after_imports"]
    r["ratio"] = r["load_peak_bytes"] / ckpt
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="k2serve bench load-memory", description=__doc__)
    ap.add_argument("--model")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--quant", default="int4", choices=("none", "int4", "fp8"))
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args(argv)
    if args.model:
        model_dir = Path(args.model)
    else:
        from k2serve.model.checkpoint import write_checkpoint

        model_dir = write_checkpoint(Path(tempfile.mkdtemp()) / "ckpt", args.preset, quant=args.quant)
    r = measure(model_dir, args.dtype)
    mib = 1 << 20
    print(f"checkpoint {model_dir}: {r['checkpoint_bytes'] / mib:.1f} MiB of safetensors")
    print(f"model held in memory: {r['model_bytes'] / mib:.1f} MiB")
    print(
        f"peak RSS during load (above imports): {r['load_peak_bytes'] / mib:.1f} MiB "
        f"= {r['ratio']:.3f}x the checkpoint (target <= 1.3x)"
    )
    print(f"reproduce: python -m k2serve.bench.load_memory --model {model_dir} --dtype {args.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
