"""One galaxy, two ways: the amortized SEDflow posterior against NUTS on the same model.

    python examples/fit_single_galaxy.py --model sedflow_model --out single_galaxy
    python examples/fit_single_galaxy.py --out single_galaxy          # trains a quick flow first

A mock galaxy (true parameters drawn from the PROVABGS prior, z = 0.1 by default, noisy SDSS
ugriz photometry from the package's noise model) is fitted by the flow (10^4 draws) and by NUTS
started from the flow's draws. Prints both timings, the posterior medians against the truth and
the C2ST accuracy between the two sample sets (0.5 = indistinguishable), and writes a corner plot
(flow vs NUTS, truth marked), the best-fit SED over the photometry with the filter curves, and
``summary.json``. Without --model the quick flow is for a look only: it is not calibrated.
"""
import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np

import sedflow_jax as sj
from sedflow_jax.io import mocks
from sedflow_jax.sim import layout
from sedflow_jax.eval import diagnostics as D
from sedflow_jax import mcmc as M
from sedflow_jax.sim import prior as P
from sedflow_jax.sbi.posterior import AmortizedPosterior


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="trained SEDflow model folder")
    ap.add_argument("--out", default="single_galaxy")
    ap.add_argument("--seed", type=int, default=0, help="which mock galaxy")
    ap.add_argument("--z", type=float, default=0.1)
    ap.add_argument("--n-samples", type=int, default=10_000, help="flow draws")
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--draws", type=int, default=500)
    ap.add_argument("--max-tree-depth", type=int, default=8)
    ap.add_argument("--tiny-train", type=int, default=100_000, help="rows for the quick flow")
    ap.add_argument("--epochs", type=int, default=15)
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    if a.model is None:
        from sedflow_jax.nn import flow as F
        from sedflow_jax.nn import train as T

        sj.simulate(0, a.tiny_train, out=out / "trainset", progress=False)
        fc = F.FlowConfig.small(11, 11).replace(n_blocks=3, hidden=64)
        tc = T.TrainConfig(max_epochs=a.epochs, patience=3, batch_size=1024,
                           learning_rate=1e-3, progress=False)
        post, _ = sj.train_posterior(out / "trainset", out / "model", flow_config=fc,
                                     train_config=tc)
    else:
        post = AmortizedPosterior.load(a.model)
    model = sj.load_model(filters=list(post.bands), z_max=post.prior.zmax)

    # the mock galaxy: truth from the prior, noisy photometry from the noise model
    key = jax.random.key(a.seed)
    s_true, _, flux, sigma = mocks.mock_galaxy(model, a.z, jax.random.fold_in(key, 0),
                                           jax.random.fold_in(key, 1))

    # the flow: 10^4 draws (timed after a warm-up call, as a user would see it per galaxy)
    x = layout.to_conditioning(flux[None], sigma[None], np.array([a.z]))
    post.sample_batched(jax.random.fold_in(key, 2), x, a.n_samples)
    t0 = time.perf_counter()
    fs = post.sample_batched(jax.random.fold_in(key, 3), x, a.n_samples)
    t_flow = time.perf_counter() - t0
    flow_s, flow_theta = fs.draws(0)

    # NUTS on the same model and prior (SEDflow's log-uniform gamma), started from flow draws
    res = M.run_nuts(jax.random.fold_in(key, 4), model, flux, sigma, a.z,
                     num_chains=a.chains, num_warmup=a.warmup, num_samples=a.draws,
                     max_tree_depth=a.max_tree_depth,
                     init=flow_s if len(flow_s) else "optimize")
    res.save(out / "nuts.npz")
    try:
        res.to_netcdf(out / "nuts.nc")
    except ImportError:
        pass

    n_cmp = min(len(flow_s), res.flat_samples.shape[0])
    acc = (D.c2st(flow_s[:n_cmp], res.flat_samples[:n_cmp], 0, classifier="quadratic")
           if n_cmp >= 20 else float("nan"))
    names = list(P.SAMPLING_NAMES)
    D.plot_corner({"SEDflow (flow)": flow_s, "NUTS": res.flat_samples}, names, s_true,
                  out / "corner.png")
    D.plot_sed_fit(model, flow_theta, a.z, flux, sigma, out / "sed.png")

    med_flow = np.median(flow_s, 0) if len(flow_s) else np.full(11, np.nan)
    med_nuts = np.median(res.flat_samples, 0)
    summary = {
        "sedflow_jax_version": sj.__version__, "z": a.z, "seed": a.seed,
        "truth": dict(zip(names, s_true.tolist())),
        "flow": {"median": dict(zip(names, med_flow.tolist())), "time_s": t_flow,
                 "n_samples": a.n_samples, "acceptance": float(fs.acceptance[0])},
        "nuts": {"median": dict(zip(names, med_nuts.tolist())), "wall_s": res.wall_time,
                 "rhat_max": float(np.nanmax(res.rhat)),
                 "ess_bulk_min": float(np.nanmin(res.ess_bulk)),
                 "divergences": res.num_divergences, "chains": a.chains, "draws": a.draws},
        "c2st_flow_vs_nuts": acc,
        "speedup_flow_vs_nuts": res.wall_time / t_flow,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"{'parameter':>14} {'truth':>8} {'flow':>8} {'NUTS':>8}")
    for i, n in enumerate(names):
        print(f"{n:>14} {s_true[i]:8.3f} {med_flow[i]:8.3f} {med_nuts[i]:8.3f}")
    print(f"flow: {a.n_samples} draws in {t_flow:.2f} s; NUTS: {a.chains} x {a.draws} draws in "
          f"{res.wall_time:.1f} s (R-hat max {np.nanmax(res.rhat):.3f}, "
          f"{res.num_divergences} divergences); C2ST flow vs NUTS = {acc:.2f}")
    print(f"wrote {out}/corner.png, {out}/sed.png, {out}/summary.json")
    return summary


if __name__ == "__main__":
    main()
