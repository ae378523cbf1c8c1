"""Benchmark: MCMC per galaxy (NUTS, ensemble slice sampling) vs the amortized flow.

For each mock galaxy (theta from the PROVABGS prior, SDSS ugriz noise from the shipped noise
model, z = 0.1 by default):

1. NUTS, 4 chains (in parallel on 4 CPU devices, ``--cpu-devices``), 1000 warmup: the number of post-warmup draws per chain follows
   ``--nuts-schedule`` (default 1000 then 4000) until R-hat < 1.01 and bulk and tail ESS > 400 for
   every one of the 11 sampling-space coordinates, or the schedule / ``--nuts-cap-s`` runs out.
   Each attempt is a fresh run (warmup included); the time reported is that of the attempt.
2. ESS (NumPyro ensemble slice sampler = the zeus algorithm of PROVABGS): 30 walkers x 10,000
   steps (2,000 warmup + 8,000 kept), as SEDflow's PROVABGS comparison.
3. The flow peer, if a trained model is given (``--flow DIR``, an ``AmortizedPosterior``
   directory): 10^4 posterior draws for the same galaxy, timed warm; C2ST vs the ESS posterior.
   Without one the script says that the flow peer is skipped.

The CPU split into 4 JAX devices (``--cpu-devices``, default 4) that runs the NUTS chains in
parallel makes the single-device ESS run ~30 % slower: time ESS alone with
``--skip-nuts --cpu-devices 1``.

All runs start like PROVABGS (MAP fit, then a 1e-3 x prior-std ball); each run's compile time is
included in its time, as a user would see it (NumPyro retraces its sampling loop on every run,
and parallel NUTS chains embed the galaxy's data in the program, so every run compiles: ~7-10 s
of each NUTS figure; ``init`` is the MAP fit).
Speed is also given as min(bulk ESS) per second, the fair per-sample comparison.

Usage:  python benchmarks/bench_mcmc.py [--n-galaxies 1] [--quick] [--flow DIR] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _fmt(r):
    return (f"wall {r.wall_time:7.1f} s (init {r.init_time:5.1f}, sample {r.sample_time:7.1f}) | "
            f"R-hat max {np.nanmax(r.rhat):.3f} | ESS bulk min {np.nanmin(r.ess_bulk):7.0f} "
            f"tail min {np.nanmin(r.ess_tail):7.0f} | div {r.num_divergences}")


def mock_galaxy(model, seed, z):
    from sedflow_jax.io.mocks import mock_galaxy as mock

    g = mock(model, z, seed, 10_000 + seed)
    return g.s, g.flux, g.sigma


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-galaxies", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--z", type=float, default=0.1)
    ap.add_argument("--nuts-warmup", type=int, default=1000)
    ap.add_argument("--nuts-schedule", type=int, nargs="+", default=[1000, 4000],
                    help="post-warmup draws per chain tried in turn until converged")
    ap.add_argument("--nuts-cap-s", type=float, default=1800.0,
                    help="stop trying longer NUTS runs once this much time is spent")
    ap.add_argument("--max-tree-depth", type=int, default=10)
    ap.add_argument("--cpu-devices", type=int, default=None,
                    help="split the CPU into this many JAX devices: NUTS runs its 4 chains in "
                         "parallel when >= 4 (1 = one chain after another; default 4, or 1 "
                         "with --skip-nuts)")
    ap.add_argument("--walkers", type=int, default=30)
    ap.add_argument("--ess-warmup", type=int, default=2000)
    ap.add_argument("--ess-samples", type=int, default=8000)
    ap.add_argument("--ess-space", default="unconstrained", choices=["unconstrained", "constrained"])
    ap.add_argument("--flow", default=None, help="trained AmortizedPosterior directory")
    ap.add_argument("--flow-n", type=int, default=10_000)
    ap.add_argument("--skip-nuts", action="store_true")
    ap.add_argument("--skip-ess", action="store_true")
    ap.add_argument("--quick", action="store_true",
                    help="tiny settings to check the script runs (numbers meaningless)")
    ap.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = ap.parse_args()
    if args.quick:
        args.nuts_warmup, args.nuts_schedule, args.max_tree_depth = 100, [100], 6
        args.ess_warmup, args.ess_samples, args.walkers = 100, 200, 22

    import jax

    import sedflow_jax as sj
    from sedflow_jax.sim import layout
    from sedflow_jax.eval import diagnostics as D
    from sedflow_jax import mcmc as M

    if args.cpu_devices is None:
        args.cpu_devices = 1 if args.skip_nuts else 4
    n_dev = M.set_cpu_devices(args.cpu_devices)  # before JAX runs anything
    how = {"parallel": "in parallel"}.get(M.default_chain_method("nuts", 4), "one after another")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPU cores, "
          f"{n_dev} JAX device(s): NUTS chains {how} (shared machine: timings are noisy)")
    model = sj.load_model(z_max=max(0.2, args.z))
    flow_post = None
    if args.flow:
        from sedflow_jax.sbi.posterior import AmortizedPosterior

        flow_post = AmortizedPosterior.load(args.flow)
        print(f"flow peer: {args.flow}")
    else:
        print("flow peer skipped: no trained model given (pass --flow DIR of a trained "
              "AmortizedPosterior)")

    report = []
    for g in range(args.n_galaxies):
        seed = args.seed + g
        s_true, flux, sigma = mock_galaxy(model, seed, args.z)
        print(f"\n=== galaxy {g} (seed {seed}, z = {args.z}): true s = {np.round(s_true, 3)}")
        print(f"    flux [nMgy] = {np.round(flux, 2)}, S/N = {np.round(flux / sigma, 1)}")
        rec = dict(galaxy=g, seed=seed, z=args.z, s_true=s_true.tolist())
        # ---------------- NUTS
        if not args.skip_nuts:
            spent, attempts, r_nuts = 0.0, [], None
            for n_samp in args.nuts_schedule:
                if spent > args.nuts_cap_s:
                    break
                r = M.run_nuts(jax.random.key(seed), model, flux, sigma, args.z, num_chains=4,
                               num_warmup=args.nuts_warmup, num_samples=n_samp,
                               max_tree_depth=args.max_tree_depth)
                spent += r.wall_time
                ok = r.converged(1.01, 400)
                attempts.append(dict(num_samples=n_samp, wall_time=r.wall_time,
                                     sample_time=r.sample_time, init_time=r.init_time,
                                     rhat_max=float(np.nanmax(r.rhat)),
                                     ess_bulk_min=float(np.nanmin(r.ess_bulk)),
                                     ess_tail_min=float(np.nanmin(r.ess_tail)),
                                     divergences=int(r.num_divergences),
                                     mean_num_steps=r.info["mean_num_steps"],
                                     chain_method=r.info["chain_method"], converged=ok))
                print(f"NUTS 4 x ({args.nuts_warmup} + {n_samp}): {_fmt(r)} | mean tree "
                      f"{r.info['mean_num_steps']:.0f} steps | converged: {ok}")
                r_nuts = r
                if ok:
                    break
            rec["nuts"] = dict(attempts=attempts, converged=attempts[-1]["converged"],
                               time_to_converged=attempts[-1]["wall_time"]
                               if attempts[-1]["converged"] else None,
                               cumulative_time=spent,
                               ess_bulk_min_per_s=attempts[-1]["ess_bulk_min"]
                               / attempts[-1]["wall_time"])
        # ---------------- ESS
        r_ess = None
        if not args.skip_ess:
            r_ess = M.run_ess(jax.random.key(seed + 1), model, flux, sigma, args.z,
                              num_chains=args.walkers, num_warmup=args.ess_warmup,
                              num_samples=args.ess_samples, space=args.ess_space)
            print(f"ESS ({args.ess_space}) {args.walkers} walkers x ({args.ess_warmup} + {args.ess_samples}): "
                  f"{_fmt(r_ess)} | converged: {r_ess.converged()}")
            rec["ess"] = dict(wall_time=r_ess.wall_time, sample_time=r_ess.sample_time,
                              init_time=r_ess.init_time, rhat_max=float(np.nanmax(r_ess.rhat)),
                              ess_bulk_min=float(np.nanmin(r_ess.ess_bulk)),
                              ess_tail_min=float(np.nanmin(r_ess.ess_tail)),
                              converged=r_ess.converged(),
                              ess_bulk_min_per_s=float(np.nanmin(r_ess.ess_bulk)) / r_ess.wall_time)
            if not args.skip_nuts and r_nuts is not None:
                acc = D.c2st(r_nuts.flat_samples, r_ess.flat_samples, 0)
                rec["c2st_nuts_vs_ess"] = acc
                print(f"C2ST(NUTS, ESS) = {acc:.3f}")
        # ---------------- flow peer
        if flow_post is not None:
            x = layout.to_conditioning(flux[None], sigma[None], np.array([args.z]))[0]
            flow_post.sample(jax.random.key(0), x, args.flow_n)  # compile
            t0 = time.perf_counter()
            fs = flow_post.sample(jax.random.key(seed + 2), x, args.flow_n)
            t_flow = time.perf_counter() - t0
            rec["flow"] = dict(time=t_flow, n=args.flow_n, acceptance=float(fs.acceptance))
            print(f"flow: {args.flow_n} draws in {t_flow:.3f} s (acceptance {float(fs.acceptance):.3f})")
            if r_ess is not None:
                acc = D.c2st(fs.s[np.isfinite(fs.s).all(1)], r_ess.flat_samples, 0)
                rec["flow"]["c2st_vs_ess"] = acc
                print(f"C2ST(flow, ESS) = {acc:.3f}; ESS/flow time ratio "
                      f"{r_ess.wall_time / t_flow:.0f}x")
            if "nuts" in rec:
                print(f"NUTS/flow time ratio {rec['nuts']['attempts'][-1]['wall_time'] / t_flow:.0f}x")
        if "nuts" in rec and "ess" in rec:
            n_t = rec["nuts"]["attempts"][-1]["wall_time"]
            print(f"speed: ESS run / NUTS run wall time = {rec['ess']['wall_time'] / n_t:.2f}; "
                  f"min bulk ESS per second: NUTS {rec['nuts']['ess_bulk_min_per_s']:.2f}, "
                  f"ESS {rec['ess']['ess_bulk_min_per_s']:.2f}")
        report.append(rec)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=float)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
