"""Every GPU figure the README quotes, in one prepared run (under 8 minutes on one GPU).

    python benchmarks/gpu_suite.py [--out gpu_suite.json]      # the full suite (a GPU)
    python benchmarks/gpu_suite.py --quick                       # smoke run, < 1 min on a CPU

Measures, each after a warm-up call (compilation excluded, reported separately):
  1. photometry throughput, ``jit(vmap(model.photometry_fn()))`` on device arrays, batches
     10^5, 10^6, 10^7 (SDSS ugriz, z <= 0.2);
  2. ``simulate`` of 1.13 M galaxies in memory (prior -> photometry -> noise -> x);
  3. one training step (forward, backward, clipping, Adam) of the ``paper`` flow (15 x 500,
     batch 512) and of the default flows (5 x 128, batch 512 and 1024);
  4. catalog sampling: 33,884 galaxies x 10^4 draws (the size of SEDflow's NSA run) with
     row-keyed draws (``sedflow_jax.sbi.sampling.sample_rows``), logit coordinates;
  5. importance sampling (``sedflow_jax.sbi.importance``) when the package has it: galaxies/s.
The device, JAX version and every figure are printed as a table and written to ``--out``
(JSON). Numbers come from the same process, so ratios between lines are meaningful.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sedflow_jax as sj  # noqa: E402
from sedflow_jax.nn import flow as F  # noqa: E402
from sedflow_jax.nn import train as T  # noqa: E402
from sedflow_jax.sbi.posterior import AmortizedPosterior  # noqa: E402
from sedflow_jax.sbi.sampling import sample_rows  # noqa: E402
from sedflow_jax.sed.units import SDSS_BANDS  # noqa: E402
from sedflow_jax.sim import prior as P  # noqa: E402

FULL = dict(phot_batches=(100_000, 1_000_000, 10_000_000), n_simulate=1_130_000,
            train_steps=20, train_presets=("paper", "small512", "small1024"), toy_flow=(5, 128),
            n_catalog=33_884, n_draws=10_000, is_galaxies=256,
            is_draws=dict(n_initial=512, n_max=2048, group=None))
#: every stage once at small sizes (a CPU smoke test: compilation dominates). The flows are the
#: examples' quick 3 x 64 flow with their shapes (batch 512; 32 galaxies x 200 draws), so a test
#: session's compilation cache already holds these programs
QUICK = dict(phot_batches=(1_024,), n_simulate=4_096, train_steps=2,
             train_presets=("quick512",), toy_flow=(3, 64), n_catalog=32, n_draws=200,
             is_galaxies=4, is_draws=dict(n_initial=64, n_max=128, group=8))


def timed(fn, reps: int = 1):
    """(first-call seconds incl. compilation, best of ``reps`` later calls)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    best = np.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return first, best


def bench_photometry(model, batches, rows):
    f = jax.jit(jax.vmap(model.photometry_fn()))
    key = jax.random.key(0)
    for n in batches:
        s = P.sample_sampling(key, P.provabgs_prior(), n)
        theta = P.from_sampling(s)
        z = jax.random.uniform(key, (n,), minval=0.01, maxval=0.2)
        first, best = timed(lambda: f(theta, z), reps=2)
        rows.append((f"photometry jit(vmap), batch {n:.0e}", n / best, "galaxies/s",
                     f"compile+first {first:.1f} s"))


def bench_simulate(model, n, rows):
    sj.simulate(0, min(n, 8_192), model, progress=False)  # warm-up: compiles the block kernel
    t0 = time.perf_counter()
    r = sj.simulate(1, n, model, progress=False)
    dt = time.perf_counter() - t0
    rows.append((f"simulate {n:,} galaxies (in memory)", n / dt, "galaxies/s",
                 f"{dt:.1f} s, kept {r.n_kept:,}"))


def flow_config(preset: str):
    if preset == "paper":
        return F.FlowConfig.paper(11, 11), 512
    if preset.startswith("quick"):  # the examples' quick flow
        return F.FlowConfig.small(11, 11).replace(n_blocks=3, hidden=64), \
            int(preset.removeprefix("quick"))
    return F.FlowConfig.small(11, 11), int(preset.removeprefix("small"))


def bench_train_step(preset: str, steps: int, rows):
    from flax import nnx

    fc, batch = flow_config(preset)
    rng = np.random.default_rng(0)
    theta = rng.normal(size=(batch, 11)).astype(np.float32)
    x = rng.normal(size=(batch, 11)).astype(np.float32)
    flow = F.init_flow(jax.random.key(0), fc, theta, x)
    graphdef, params, rest = nnx.split(flow, nnx.Param, ...)
    tx = T._make_tx(T.TrainConfig())
    step, _ = T._make_fns(graphdef, tx)
    state = [params, rest, tx.init(params)]

    def one():
        state[0], state[1], state[2], loss = step(state[0], state[1], state[2], theta, x)
        return loss

    first, _ = timed(one, reps=0)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = one()
    jax.block_until_ready(loss)
    ms = 1e3 * (time.perf_counter() - t0) / steps
    rows.append((f"train step, {fc.n_blocks} x {fc.hidden} flow, batch {batch}", ms, "ms/step",
                 f"compile+first {first:.1f} s"))


def toy_posterior(bands=SDSS_BANDS, flow=(5, 128)):
    """A logit posterior with random weights, default size (5 x 128; ``flow`` = (blocks,
    hidden)): timing only."""
    nb = len(bands)
    fc = F.FlowConfig.small(11, 2 * nb + 1).replace(n_blocks=flow[0], hidden=flow[1])
    lo = np.r_[np.full(nb, 14.0), np.full(nb, 1e-3), 0.0]
    hi = np.r_[np.full(nb, 22.0), np.full(nb, 0.3), 0.2]
    rng = np.random.default_rng(0)
    flow = F.init_flow(jax.random.key(0), fc, rng.normal(size=(256, 11)).astype(np.float32),
                       rng.uniform(lo, hi, (256, 2 * nb + 1)).astype(np.float32))
    return AmortizedPosterior(flow=flow, prior=P.provabgs_prior(), bands=tuple(bands),
                              x_lo=lo, x_hi=hi, meta={"theta_space": "logit"})


def bench_catalog_sampling(post, n_gal, n_draws, rows):
    rng = np.random.default_rng(1)
    nb = len(post.bands)
    xs = np.c_[rng.uniform(15, 19, (n_gal, nb)), rng.uniform(0.005, 0.05, (n_gal, nb)),
               rng.uniform(0.02, 0.2, n_gal)].astype(np.float32)
    t0 = time.perf_counter()
    sample_rows(post, 0, xs, np.arange(n_gal), n_draws)  # warm-up: the same shapes compile
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    s = sample_rows(post, 1, xs, np.arange(n_gal), n_draws)
    dt = time.perf_counter() - t0
    rows.append((f"catalog sampling, {n_gal:,} galaxies x {n_draws:,} draws", n_gal / dt,
                 "galaxies/s", f"{dt:.1f} s; {n_gal * n_draws / dt:.3g} draws/s; compile+first {first:.1f} s; "
                 f"acceptance {float(np.mean(s.acceptance)):.2f}"))


def bench_importance(model, post, n_gal, rows, n_initial=512, n_max=2048, group=None):
    try:
        from sedflow_jax.sbi import importance
    except ImportError:
        rows.append(("importance sampling", float("nan"), "galaxies/s", "not in this version"))
        return
    cat = sj.mock_catalog(3, n_gal, model=model)
    ph = sj.read_photometry(cat, post.bands)
    t0 = time.perf_counter()
    res = importance.sample_exact(post, 0, model, ph.flux, ph.sigma, ph.z, n_initial=n_initial,
                                  n_max=n_max, target_ess=100, group=group)
    dt = time.perf_counter() - t0
    rows.append((f"importance sampling, {n_gal} mock galaxies (toy flow)", n_gal / dt,
                 "galaxies/s", f"{dt:.1f} s incl. compilation; median efficiency "
                 f"{float(np.nanmedian(np.asarray(res.efficiency))):.3g}"))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run on a CPU")
    ap.add_argument("--out", default=None, help="write the figures here (JSON)")
    ap.add_argument("--skip", nargs="*", default=[],
                    choices=["photometry", "simulate", "train", "sampling", "importance"])
    a = ap.parse_args(argv)
    cfg = QUICK if a.quick else FULL
    dev = jax.devices()[0]
    head = {"device": getattr(dev, "device_kind", str(dev)), "backend": jax.default_backend(),
            "n_devices": jax.device_count(), "jax": jax.__version__,
            "sedflow_jax": sj.__version__, "python": platform.python_version(),
            "quick": bool(a.quick)}
    print(" ".join(f"{k}={v}" for k, v in head.items()), flush=True)
    rows: list = []
    model = sj.load_model(z_max=0.2)
    post = toy_posterior(flow=cfg["toy_flow"])
    steps = [("photometry", lambda: bench_photometry(model, cfg["phot_batches"], rows)),
             ("simulate", lambda: bench_simulate(model, cfg["n_simulate"], rows)),
             ("train", lambda: [bench_train_step(p, cfg["train_steps"], rows)
                                for p in cfg["train_presets"]]),
             ("sampling", lambda: bench_catalog_sampling(post, cfg["n_catalog"], cfg["n_draws"],
                                                         rows)),
             ("importance", lambda: bench_importance(model, post, cfg["is_galaxies"], rows,
                                                     **cfg["is_draws"]))]
    t_all = time.perf_counter()
    for name, run in steps:
        if name not in a.skip:
            run()
            what, value, unit, note = rows[-1]
            print(f"  {what}: {value:.4g} {unit} ({note})", flush=True)
    out = {**head, "total_s": time.perf_counter() - t_all,
           "figures": [{"what": w, "value": float(v), "unit": u, "note": n}
                       for w, v, u, n in rows]}
    print(f"total {out['total_s']:.1f} s")
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
