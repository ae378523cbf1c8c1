"""Side-by-side calibration of the flow, NUTS and ESS on the same mock galaxies.

For each of ``--n-galaxies`` mocks (``--mocks training``, the default: theta and z from the
PROVABGS prior, SDSS ugriz noise from the shipped noise model, kept by the training set's noise
cuts, i.e. galaxies like those the flow was trained on -- :func:`sedflow_jax.mock_catalog`;
``--mocks fixed-z``: z = ``--z`` and no cuts, so faint mocks with the clamped, unrealistically
small noise of the model's faint end are included) draws posterior samples with the trained flow (``--flow DIR``), with
NUTS and with the ensemble slice sampler (both on the full 11-dim posterior, log-uniform gamma as
the flow, started from the flow's draws), and records per method: the rank of the truth among
the draws (SBC-style), whether the truth falls in the central 68 % / 95 % intervals, the 68 %
width of log M*, R-hat / ESS and the wall time. Results are appended to ``--json`` after every
galaxy (a killed run keeps what it has); ``--time-cap-s`` stops starting new galaxies.

    python benchmarks/calibration_flow_vs_mcmc.py --flow run1/model --n-galaxies 20 \\
        --json calib.json
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flow", required=True)
    ap.add_argument("--n-galaxies", type=int, default=20)
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--z", type=float, default=0.1)
    ap.add_argument("--flow-n", type=int, default=2000)
    ap.add_argument("--nuts-chains", type=int, default=2)
    ap.add_argument("--nuts-warmup", type=int, default=200)
    ap.add_argument("--nuts-draws", type=int, default=200)
    ap.add_argument("--max-tree-depth", type=int, default=6)
    ap.add_argument("--cpu-devices", type=int, default=None,
                    help="JAX CPU devices (default: one per NUTS chain, so the chains run in "
                         "parallel; 1 = one after another)")
    ap.add_argument("--walkers", type=int, default=30)
    ap.add_argument("--ess-warmup", type=int, default=300)
    ap.add_argument("--ess-draws", type=int, default=700)
    ap.add_argument("--mocks", choices=["training", "fixed-z"], default="training",
                    help="training: prior draws (z too) kept by the noise cuts, as the flow's "
                         "training set; fixed-z: z = --z, no cuts")
    ap.add_argument("--time-cap-s", type=float, default=3600.0)
    ap.add_argument("--json", default="calibration_flow_vs_mcmc.json")
    a = ap.parse_args(argv)

    import sedflow_jax as sj
    from sedflow_jax.io import catalog as C
    from sedflow_jax.io import mocks
    from sedflow_jax.sim import layout
    from sedflow_jax import mcmc as M
    from sedflow_jax.sim import prior as P
    from sedflow_jax.sbi.posterior import AmortizedPosterior

    n_dev = M.set_cpu_devices(a.cpu_devices or a.nuts_chains)  # before JAX runs anything
    how = {"parallel": "in parallel"}.get(M.default_chain_method("nuts", a.nuts_chains),
                                          "one after another")
    print(f"{n_dev} JAX device(s): NUTS chains {how}")
    post = AmortizedPosterior.load(a.flow)
    model = sj.load_model(filters=list(post.bands), z_max=post.prior.zmax)
    names = list(P.SAMPLING_NAMES)
    if a.mocks == "training":
        import jax.numpy as jnp

        cat = mocks.mock_catalog(a.seed, a.n_galaxies, model=model)
        theta_all = np.stack([np.asarray(cat[n], np.float64) for n in sj.PARAM_NAMES], 1)
        s_all = np.asarray(P.to_sampling(jnp.asarray(theta_all, jnp.float32)), np.float64)
        ph = C.read_photometry(cat, model.filter_names)
        flux_all, sigma_all, z_all = ph.flux, ph.sigma, ph.z
    rows = []
    t_start = time.perf_counter()
    for g in range(a.n_galaxies):
        if time.perf_counter() - t_start > a.time_cap_s:
            print(f"time cap reached after {g} galaxies")
            break
        key = jax.random.key(a.seed + g)
        if a.mocks == "training":
            s, flux, sigma, z = s_all[g], flux_all[g], sigma_all[g], float(z_all[g])
        else:
            s, _, flux, sigma = mocks.mock_galaxy(model, a.z, jax.random.fold_in(key, 0),
                                              jax.random.fold_in(key, 1))
            z = a.z
        x = layout.to_conditioning(flux[None], sigma[None], np.array([z]))
        t0 = time.perf_counter()
        fs = post.sample_batched(jax.random.fold_in(key, 2), x, a.flow_n)
        t_flow = time.perf_counter() - t0
        flow_s = fs.draws(0)[0]
        res = {"flow": (flow_s, t_flow, None)}
        init = flow_s if len(flow_s) >= a.walkers else "optimize"
        r = M.run_nuts(jax.random.fold_in(key, 3), model, flux, sigma, z,
                       num_chains=a.nuts_chains, num_warmup=a.nuts_warmup,
                       num_samples=a.nuts_draws, max_tree_depth=a.max_tree_depth, init=init)
        res["nuts"] = (r.flat_samples, r.wall_time, r)
        e = M.run_ess(jax.random.fold_in(key, 4), model, flux, sigma, z,
                      num_chains=a.walkers, num_warmup=a.ess_warmup, num_samples=a.ess_draws,
                      init=init)
        res["ess"] = (e.flat_samples, e.wall_time, e)
        row = {"galaxy": g, "z": z, "truth": s.tolist()}
        for k, (x_s, t, rr) in res.items():
            if len(x_s) == 0:
                row[k] = None
                continue
            rank = (x_s < s).mean(0)
            lo68, hi68 = np.percentile(x_s, [16, 84], axis=0)
            lo95, hi95 = np.percentile(x_s, [2.5, 97.5], axis=0)
            row[k] = {"rank": rank.tolist(),
                      "in68": ((s >= lo68) & (s <= hi68)).tolist(),
                      "in95": ((s >= lo95) & (s <= hi95)).tolist(),
                      "width68_logm": float(hi68[0] - lo68[0]), "time_s": t,
                      "rhat_max": None if rr is None else float(np.nanmax(rr.rhat)),
                      "ess_bulk_min": None if rr is None else float(np.nanmin(rr.ess_bulk))}
        rows.append(row)
        with open(a.json, "w") as fh:
            json.dump({"args": vars(a), "names": names, "galaxies": rows}, fh, indent=1)
        print(f"galaxy {g}: flow {t_flow:.2f} s, NUTS {r.wall_time:.0f} s (R-hat max "
              f"{np.nanmax(r.rhat):.2f}), ESS {e.wall_time:.0f} s (R-hat max "
              f"{np.nanmax(e.rhat):.2f})", flush=True)
    report(rows, names)


def report(rows, names):
    from scipy import stats

    n = len(rows)
    print(f"\n{n} mock galaxies; fraction of truths inside the 68 % / 95 % intervals "
          "(nominal 0.68 / 0.95), KS p of the truth's rank, mean 68 % width of log M*:")
    print(f"{'method':>6} {'cov68':>6} {'cov95':>6} {'KS p(logM)':>10} {'min KS p':>9} "
          f"{'w68 logM':>9} {'time/gal':>9}")
    for k in ("flow", "nuts", "ess"):
        rs = [r[k] for r in rows if r.get(k)]
        if not rs:
            continue
        in68 = np.array([r["in68"] for r in rs], float)
        in95 = np.array([r["in95"] for r in rs], float)
        ranks = np.array([r["rank"] for r in rs])
        ks = [stats.kstest(ranks[:, j], "uniform").pvalue for j in range(ranks.shape[1])]
        print(f"{k:>6} {in68.mean():6.2f} {in95.mean():6.2f} {ks[0]:10.3f} {min(ks):9.3f} "
              f"{np.mean([r['width68_logm'] for r in rs]):9.3f} "
              f"{np.mean([r['time_s'] for r in rs]):8.1f}s")


if __name__ == "__main__":
    main()
