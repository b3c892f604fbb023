"""Batched ensemble training vs training the same members one by one.

For each label count: E members with the BAL-PM reference head (D -> 2048 -> 256 -> 1,
tanh) are trained (a) all at once with stacked parameters and batched matmuls
(`train_ensemble`) and (b) one after another with the same seeds
(`train_members_sequentially`), for the same number of epochs, early stopping off
(no held-out slice inside training). Both final ensembles are scored on the same
separate validation set (BT negative log-likelihood of the ensemble mean).

Minibatch: 128 pairs per member by default (the service default,
`EnsembleConfig.batch_size`), i.e. 256 rows (A and B sides) per member per step.

Ceiling: the table also prints the arithmetic rate each run achieved (analytic FLOPs of
forward + backward over the time), `gemm_s`, the time the run's matrix products take
on their own at the same shapes (one member step timed in isolation x steps), and
`ceiling` = sequential time / gemm_s: the most any implementation that trains each
member on its own minibatches (as the issue requires) could gain over the sequential
run, since it still has to do those products.

Usage:
    python bench/posterior.py [--sizes 1000,10000] [--dim 1024] [--ensemble 5] [--epochs 2]
                              [--batch-size 128] [--device auto]
"""

from __future__ import annotations

import argparse
import itertools
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


def train_flops(n_pairs: int, d: int, hidden: tuple[int, ...], members: int, epochs: int) -> float:
    """Analytic FLOPs of training: forward, weight gradients, and input gradients below layer 1."""
    dims = (d, *hidden, 1)
    fwd = sum(a * b for a, b in itertools.pairwise(dims))  # MACs per row
    grad_w = fwd
    grad_x = sum(a * b for a, b in itertools.pairwise(dims[1:]))  # features need no gradient
    return 2.0 * (fwd + grad_w + grad_x) * 2 * n_pairs * members * epochs  # 2 rows (A, B) per pair


def gemm_only_step_s(batch_pairs: int, d: int, hidden: tuple[int, ...], device: torch.device) -> float:
    """Seconds one member's training step spends in its matrix products alone.

    The products of forward and backward at the training's own shapes (2 x batch rows):
    X W per layer, X^T G for every weight gradient, G W^T below the top layer except
    into the frozen features. Any implementation that trains each member on its own
    minibatches does these products; this is their time with nothing else around them
    (in bf16 on CUDA, like the training's autocast).
    """
    dims = (d, *hidden, 1)
    m = 2 * batch_pairs
    xs = [torch.randn(m, a, device=device) for a in dims[:-1]]
    ws = [torch.randn(a, b, device=device) for a, b in itertools.pairwise(dims)]
    gs = [torch.randn(m, b, device=device) for b in dims[1:]]

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):  # as training does
            products()

    def products() -> None:
        for x, w in zip(xs, ws, strict=True):
            x @ w
        for x, g in zip(xs, gs, strict=True):
            x.T @ g
        for g, w in zip(gs[1:], ws[1:], strict=True):
            g @ w.T

    for _ in range(3):
        step()
    reps = 30
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


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
    hidden = config(args.epochs).hidden_sizes
    step_s = gemm_only_step_s(args.batch_size, args.dim, hidden, device)
    print(f"matrix products of one member step at these shapes, alone: {step_s * 1e3:.2f} ms")
    header = (f"{'labels':>7} {'batched_s':>10} {'sequential_s':>13} {'speedup':>8} "
              f"{'val_loss_batched':>17} {'val_loss_sequential':>20} {'GFLOP/s_b':>10} {'GFLOP/s_s':>10} "
              f"{'gemm_s':>7} {'ceiling':>8}")
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
        flops = train_flops(n, args.dim, hidden, args.ensemble, args.epochs)
        rate_b, rate_s = flops / t_batched / 1e9, flops / t_seq / 1e9
        steps = args.epochs * args.ensemble * -(-n // args.batch_size)
        gemm_s = steps * step_s  # the floor of any implementation doing these products
        print(f"{n:>7} {t_batched:>10.2f} {t_seq:>13.2f} {t_seq / t_batched:>7.1f}x "
              f"{loss_b:>17.4f} {loss_s:>20.4f} {rate_b:>10.0f} {rate_s:>10.0f} {gemm_s:>7.2f} "
              f"{t_seq / gemm_s:>7.1f}x", flush=True)


if __name__ == "__main__":
    main()
