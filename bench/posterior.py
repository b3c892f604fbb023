"""Batched ensemble training vs training the same members one by one.

For each label count: E members with the BAL-PM reference head (D -> 2048 -> 256 -> 1,
tanh) are trained (a) all at once with stacked parameters and batched matmuls
(`train_ensemble`) and (b) one after another with the same seeds
(`train_members_sequentially`), for the same number of epochs, early stopping off
(no held-out slice inside training). Both final ensembles are scored on the same
separate validation set (BT negative log-likelihood of the ensemble mean).

Minibatch: 128 pairs per member by default (the service default,
`EnsembleConfig.batch_size`), i.e. 256 rows (A and B sides) per member per step.

Usage:
    python bench/posterior.py [--sizes 1000,10000] [--dim 1024] [--ensemble 5] [--epochs 2]
                              [--batch-size 128] [--device auto]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from balpm_server.posterior import (
    EnsembleConfig,
    evaluate,
    predict_probs,
    train_ensemble,
    train_members_sequentially,
)
from balpm_server.posterior.ensemble import resolve_device


def synthetic(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs labelled by a hidden linear reward with logistic (BT) label noise."""
    w_D = np.random.default_rng(0).normal(size=d) / np.sqrt(d) * 3.0  # same reward everywhere
    rng = np.random.default_rng(seed)
    a_N_D = rng.normal(size=(n, d)).astype(np.float32)
    b_N_D = rng.normal(size=(n, d)).astype(np.float32)
    p_N = 1 / (1 + np.exp(-((a_N_D - b_N_D) @ w_D)))
    return a_N_D, b_N_D, (rng.random(n) < p_N).astype(np.float64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--ensemble", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--val", type=int, default=2000, help="separate validation pairs")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {device} ({name}); torch {torch.__version__}; "
          f"intra-op threads: {torch.get_num_threads()}")
    print(f"E={args.ensemble}, D={args.dim}, head {args.dim}-2048-256-1 tanh, "
          f"batch {args.batch_size} pairs/member, epochs {args.epochs}, early stopping off"
          + (", bf16 autocast" if device.type == "cuda" else ", float32"))

    def config(epochs: int) -> EnsembleConfig:
        return EnsembleConfig(ensemble_size=args.ensemble, epochs=epochs,
                              batch_size=args.batch_size, val_fraction=0.0,
                              device=args.device)

    # Warm-up (lazy imports, allocator, kernel selection) outside the timings.
    wa, wb, wt = synthetic(2 * args.batch_size, args.dim, seed=99)
    train_ensemble(wa, wb, wt, config(1), seed=0)
    train_members_sequentially(wa, wb, wt, config(1), seed=0)

    va, vb, vt = synthetic(args.val, args.dim, seed=1)
    header = (f"{'labels':>7} {'batched_s':>10} {'sequential_s':>13} {'speedup':>8} "
              f"{'val_loss_batched':>17} {'val_loss_sequential':>20}")
    print(header)
    print("-" * len(header))
    for n in (int(s) for s in args.sizes.split(",")):
        a, b, t = synthetic(n, args.dim, seed=2)
        cfg = config(args.epochs)
        start = time.perf_counter()
        batched = train_ensemble(a, b, t, cfg, seed=0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_batched = time.perf_counter() - start
        start = time.perf_counter()
        seq = train_members_sequentially(a, b, t, cfg, seed=0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_seq = time.perf_counter() - start
        loss_b = -evaluate(predict_probs(batched.state, va, vb), vt).log_likelihood
        loss_s = -evaluate(predict_probs(seq.state, va, vb), vt).log_likelihood
        print(f"{n:>7} {t_batched:>10.2f} {t_seq:>13.2f} {t_seq / t_batched:>7.1f}x "
              f"{loss_b:>17.4f} {loss_s:>20.4f}", flush=True)


if __name__ == "__main__":
    main()
