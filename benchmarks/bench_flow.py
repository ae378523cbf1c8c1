"""Benchmark: sedflow_jax MAF vs sbi/nflows (PyTorch, CPU) on the same architecture.

Measures, in one process and interleaved (machines are noisy):
  1. one training step (forward, backward, global-norm clipping at 5, Adam) at batch 512;
  2. drawing 10^4 posterior samples for one context x.

Architecture (default): MAF with 10 blocks of MADE(2 hidden layers x 500 units, tanh, no batch
norm, context into the first hidden layer) + random permutations, theta 11-d, context 11-d,
z-scoring of theta and x: sbi's ``build_maf`` (v0.27, nflows v0.14), and
``FlowConfig(n_blocks=10, hidden=500, output_context=False)`` here (identical parameter count).

The peer is optional: install it with
    .venv/bin/pip install torch==2.13.0 && .venv/bin/pip install sbi==0.27.0
Without torch/sbi the script says so and times only sedflow_jax.

Usage:  python benchmarks/bench_flow.py [--steps 20] [--sample-reps 3] [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _median_ms(ts):
    return 1e3 * float(np.median(ts)), 1e3 * float(np.min(ts))


def build_jax(args, theta, x):
    import jax
    from flax import nnx

    from sedflow_jax.nn import flow as F
    from sedflow_jax.nn import train as T
    from sedflow_jax.nn import checkpoint as CK
    from sedflow_jax.nn import data as TD

    cfg = F.FlowConfig(d_theta=args.d_theta, d_context=args.d_context, n_blocks=args.blocks,
                       hidden=args.hidden, n_hidden_layers=2, activation="tanh",
                       batch_norm=False, permutation="random", output_context=False)
    flow = F.init_flow(jax.random.PRNGKey(0), cfg, theta, x)
    graphdef, params, rest = nnx.split(flow, nnx.Param, ...)
    tx = T._make_tx(T.TrainConfig(learning_rate=5e-4, clip_norm=5.0))
    opt_state = tx.init(params)
    train_step, _ = T._make_fns(graphdef, tx)  # the exact step fit() runs
    state = {"params": params, "rest": rest, "opt": opt_state}

    def step(tb, xb):
        p, r, o, loss = train_step(state["params"], state["rest"], state["opt"], tb, xb)
        loss.block_until_ready()
        state.update(params=p, rest=r, opt=o)
        return float(loss)

    def sample(key_int, x0, n):
        return np.asarray(F.sample(nnx.merge(graphdef, state["params"], state["rest"]),
                                   jax.random.PRNGKey(key_int), x0, n, sampler=args.sampler))

    return step, sample, F.num_parameters(flow)


def build_sbi(args, theta, x):
    try:
        import torch
        from sbi.neural_nets.net_builders.flow import build_maf
    except ImportError as e:
        print(f"[peer skipped] sbi/torch not importable ({e}). Install with:\n"
              f"  .venv/bin/pip install torch==2.13.0 && .venv/bin/pip install sbi==0.27.0")
        return None
    import sbi

    torch.manual_seed(0)
    tt, tx_ = torch.tensor(theta), torch.tensor(x)
    net = build_maf(tt, tx_, hidden_features=args.hidden, num_transforms=args.blocks,
                    num_blocks=2, use_batch_norm=False)
    opt = torch.optim.Adam(net.parameters(), lr=5e-4)

    def step(tb, xb):
        opt.zero_grad()
        loss = net.loss(torch.from_numpy(tb), torch.from_numpy(xb)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm=5.0)
        opt.step()
        return float(loss.detach())

    def sample(key_int, x0, n):
        torch.manual_seed(key_int)
        with torch.no_grad():
            return net.sample((n,), condition=torch.from_numpy(x0[None])).numpy()

    n_params = sum(p.numel() for p in net.parameters())
    info = f"sbi {sbi.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    return step, sample, n_params, info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=500)
    ap.add_argument("--d-theta", type=int, default=11)
    ap.add_argument("--d-context", type=int, default=11)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20, help="timed train steps per framework")
    ap.add_argument("--rounds", type=int, default=4, help="alternating blocks of steps")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--n-samples", type=int, default=10_000)
    ap.add_argument("--sample-reps", type=int, default=3)
    ap.add_argument("--sampler", default="prefix", choices=["prefix", "loop"])
    ap.add_argument("--no-peer", action="store_true", help="time sedflow_jax only")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = ap.parse_args(argv)
    if args.quick:
        args.blocks, args.hidden, args.steps, args.n_samples, args.sample_reps = 2, 64, 4, 500, 1
        args.rounds = 2

    import jax

    rng = np.random.default_rng(0)
    n_data = max(4 * args.batch, 4096)
    theta = rng.normal(size=(n_data, args.d_theta)).astype(np.float32)
    x = (theta @ rng.normal(size=(args.d_theta, args.d_context)) * 0.3
         + rng.normal(size=(n_data, args.d_context))).astype(np.float32)
    batches = [(theta[i:i + args.batch], x[i:i + args.batch])
               for i in range(0, n_data - args.batch + 1, args.batch)]

    print(f"MAF {args.blocks} blocks x 2 x {args.hidden} (tanh), theta {args.d_theta}, context "
          f"{args.d_context}, batch {args.batch}; {os.cpu_count()} CPUs; jax {jax.__version__} "
          f"({jax.default_backend()})")
    t0 = time.perf_counter()
    ours = build_jax(args, theta, x)
    peer = None if args.no_peer else build_sbi(args, theta, x)
    peer_txt = f", sbi {peer[2]:,} ({peer[3]})" if peer else ""
    print(f"parameters: sedflow_jax {ours[2]:,}{peer_txt}")

    frameworks = {"sedflow_jax": ours}
    if peer:
        frameworks["sbi/nflows"] = peer
    # warm-up (includes jit compilation for ours)
    for name, fw in frameworks.items():
        t = time.perf_counter()
        for i in range(args.warmup):
            fw[0](*batches[i % len(batches)])
        print(f"warm-up {name}: {time.perf_counter() - t:.2f} s for {args.warmup} steps "
              f"(incl. compilation)")
    # Rounds of per-framework blocks (not step-by-step interleaving: the thread pools of XLA and
    # of PyTorch's OpenMP spin after work and slow each other down when alternated per step).
    times = {name: [] for name in frameworks}
    per_round = max(1, args.steps // args.rounds)
    for r in range(args.rounds):
        for name, fw in frameworks.items():
            time.sleep(0.5)
            fw[0](*batches[0])  # re-warm after the switch, not timed
            for i in range(per_round):
                b = batches[(r * per_round + i) % len(batches)]
                t = time.perf_counter()
                fw[0](*b)
                times[name].append(time.perf_counter() - t)
    print("\ntrain step (median / min over %d steps in %d rounds):"
          % (per_round * args.rounds, args.rounds))
    for name, ts in times.items():
        med, mn = _median_ms(ts)
        print(f"  {name:12s} {med:8.1f} ms   (min {mn:.1f} ms)")
    if peer:
        r_med = np.median(times["sbi/nflows"]) / np.median(times["sedflow_jax"])
        r_min = np.min(times["sbi/nflows"]) / np.min(times["sedflow_jax"])
        print(f"  speed-up sedflow_jax vs sbi: {r_med:.2f}x (median), {r_min:.2f}x (min)  "
              f"[goal >= 2x]")

    x0 = x[0]
    t = time.perf_counter()
    s = ours[1](0, x0, args.n_samples)
    print(f"\nsampling {args.n_samples} draws for one x ({args.sampler} sampler): first call "
          f"(incl. compilation) {time.perf_counter() - t:.2f} s; finite={np.isfinite(s).all()}")
    stimes = {name: [] for name in frameworks}
    for r in range(args.sample_reps):
        for name, fw in frameworks.items():
            time.sleep(0.5)
            t = time.perf_counter()
            fw[1](r + 1, x0, args.n_samples)
            stimes[name].append(time.perf_counter() - t)
    for name, ts in stimes.items():
        med, mn = _median_ms(ts)
        print(f"  {name:12s} {med / 1e3:8.3f} s    (min {mn / 1e3:.3f} s)")
    if peer:
        r_med = np.median(stimes["sbi/nflows"]) / np.median(stimes["sedflow_jax"])
        print(f"  speed-up sedflow_jax vs sbi: {r_med:.2f}x (median)  [goal >= 3x]")
    print(f"\ntotal benchmark time {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
