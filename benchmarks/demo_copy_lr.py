"""Can the demo architecture learn to copy at a given learning rate? (BENCHMARKS.md, "Demo model".)

A pure copy task on `train_demo`'s own model and training forward: each row is 5 random number
tokens, a separator, 12 random number tokens, the separator, the same 12 again; the loss is on the
repeat only (ln 1000 = 6.9 nats is a uniform guess over the 1,000 token ids used). AdamW (betas 0.9 /
0.95, weight decay 0.01), linear warm-up over 50 steps, gradient clipping at 1, one torch thread.

    python benchmarks/demo_copy_lr.py --lr 3e-3 --steps 600   # stays at ~6.9
    python benchmarks/demo_copy_lr.py --lr 1e-3 --steps 600   # falls below 0.01
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from k2serve.config import ModelConfig
from k2serve.model.demo_train import build_model, demo_config, train_forward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=12, help="tokens to copy")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    model = build_model(ModelConfig.from_dict(demo_config()), args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    b, n, sep = args.batch, args.length, 3100  # 3100: a special token id of the demo vocabulary
    t0 = time.perf_counter()
    for step in range(args.steps):
        x = torch.randint(300, 1300, (b, n))
        s = torch.full((b, 1), sep)
        ids = torch.cat([torch.randint(300, 1300, (b, 5)), s, x, s, x], 1)
        at = torch.zeros_like(ids, dtype=torch.bool)
        at[:, 6 + n : 6 + 2 * n] = True  # position t predicts t + 1: the repeat's tokens
        targets = ids[:, 1:][at[:, :-1]]
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / 50)
        loss = F.cross_entropy(train_forward(model, ids, at), targets)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step}: copy loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
