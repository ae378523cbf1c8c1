"""Scaling of simulate and streaming inference with the number of (virtual) devices.

    python benchmarks/bench_scaling.py [--devices 1 2 4] [--n-sim 65536] [--n-infer 4096]
                                       [--n-samples 200] [--json scaling.json]

For each device count k a fresh subprocess is started with
``XLA_FLAGS=--xla_force_host_platform_device_count=k`` (the device count is fixed when jax is
imported) and times, after a warm-up that compiles everything:

* **simulate**: :func:`sedflow_jax.simulation.simulate` in memory, SDSS ugriz, default prior and
  noise, ``block`` rows per compiled call split over a ``make_mesh(k)`` mesh
  (``simulate(mesh=...)``); galaxies/s of the loop.
* **infer**: :func:`sedflow_jax.parallel.infer_catalog_streaming` of a FITS catalog (SDSS ugriz
  fluxes, ivars, z) into HDF5, ``--n-samples`` posterior draws per galaxy from a
  ``FlowConfig.small`` MAF (5 blocks x 128 units; untrained, centred in the prior box so that
  the prior-support rejection runs as in practice), split over the mesh; galaxies/s end to end
  (reading, sampling, rejection, summaries, writing, assembling).

k = 1 also runs without a mesh (the default code path) for reference. On CPUs the virtual
devices share the machine's cores: the speed-up is bounded by the number of *physical* cores
(and by XLA's own intra-op threading, which a single device already uses). On a multi-GPU node
use real devices (``make_mesh()`` over ``jax.local_devices()``) instead.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _worker(args) -> dict:
    import jax
    import numpy as np

    from sedflow_jax.nn import flow as F
    from sedflow_jax import parallel as par
    from sedflow_jax.sbi import sampling as SMP
    from sedflow_jax.sbi import streaming as ST
    from sedflow_jax.sim import simulate as SIM
    from sedflow_jax.sim import prior as P
    from sedflow_jax.sim import simulate as S
    from sedflow_jax.sim import readers as SR
    from sedflow_jax.sim import layout
    from sedflow_jax.sed.model import load_model
    from sedflow_jax.sbi.posterior import AmortizedPosterior

    k = len(jax.devices())
    out = {"devices": k, "platform": jax.devices()[0].platform, "cpu_count": os.cpu_count(),
           "jax": jax.__version__}
    model = load_model(z_max=0.2)
    meshes = [("mesh", par.make_mesh(k))] + ([("no mesh", None)] if k == 1 else [])
    rows = []
    for label, mesh in meshes:
        r = {"mode": label}
        # -- simulate ---------------------------------------------------------------------
        S.simulate(0, args.block, model, block=args.block, progress=False, mesh=mesh)  # compile
        t0 = time.perf_counter()
        res = S.simulate(1, args.n_sim, model, block=args.block, chunk=args.n_sim,
                         progress=False, mesh=mesh, include_flux=True)
        r["simulate_s"] = time.perf_counter() - t0
        r["simulate_gal_s"] = args.n_sim / r["simulate_s"]
        # -- streaming inference ------------------------------------------------------------
        prior = P.provabgs_prior()
        lo, hi = (np.asarray(a, np.float64) for a in P.sampling_bounds(prior))
        x = res.x[res.keep]
        stats = F.ZScoreStats.from_moments((lo + hi) / 2, ((hi - lo) / 5) ** 2, x.mean(0),
                                           x.var(0, ddof=1))
        flow = F.init_flow(jax.random.PRNGKey(0), F.FlowConfig.small(11, x.shape[1]),
                           stats=stats)
        post = AmortizedPosterior(flow=flow, prior=prior, bands=tuple(model.filter_names),
                                  x_lo=x.min(0), x_hi=x.max(0))
        from astropy.table import Table

        keep = np.flatnonzero(res.keep)
        idx = keep[np.arange(args.n_infer) % keep.size]
        t = Table()
        t["id"] = np.arange(args.n_infer)
        for j, b in enumerate(model.filter_names):
            t[f"flux_{b}"] = res.flux[idx, j].astype(np.float64)
            t[f"flux_ivar_{b}"] = 1.0 / res.sigma[idx, j].astype(np.float64) ** 2
        t["z"] = res.z[idx].astype(np.float64)
        with tempfile.TemporaryDirectory() as tmp:
            cat = os.path.join(tmp, "cat.fits")
            t.write(cat)
            kw = dict(n_samples=args.n_samples, key=0, chunk_rows=args.chunk_rows,
                      keep_columns=["id"], progress=False, mesh=mesh)
            ST.infer_catalog_streaming(post, t[: args.chunk_rows],
                                        os.path.join(tmp, "warm.h5"), **kw)  # compile
            t0 = time.perf_counter()
            ST.infer_catalog_streaming(post, cat, os.path.join(tmp, "out.h5"), **kw)
            r["infer_s"] = time.perf_counter() - t0
        r["infer_gal_s"] = args.n_infer / r["infer_s"]
        rows.append(r)
    out["rows"] = rows
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--n-sim", type=int, default=65536, help="rows simulated per timing")
    ap.add_argument("--block", type=int, default=4096, help="simulation block (multiple of "
                    "every device count)")
    ap.add_argument("--n-infer", type=int, default=4096, help="catalog rows inferred")
    ap.add_argument("--n-samples", type=int, default=200, help="posterior draws per galaxy")
    ap.add_argument("--chunk-rows", type=int, default=1024, help="catalog rows per chunk")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._worker:
        print("RESULT " + json.dumps(_worker(args)), flush=True)
        return

    results = []
    for k in args.devices:
        env = dict(os.environ)
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            f" --xla_force_host_platform_device_count={k}").strip()
        env.setdefault("JAX_PLATFORMS", "cpu")
        cmd = [sys.executable, __file__, "--_worker", "--n-sim", str(args.n_sim), "--block",
               str(args.block), "--n-infer", str(args.n_infer), "--n-samples",
               str(args.n_samples), "--chunk-rows", str(args.chunk_rows)]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode != 0 or not line:
            print(f"{k} devices: failed\n{p.stderr[-3000:]}", file=sys.stderr)
            continue
        results.append(json.loads(line[-1][len("RESULT "):]))

    if not results:
        sys.exit(1)
    print(f"platform {results[0]['platform']}, os.cpu_count() = {results[0]['cpu_count']}, "
          f"jax {results[0]['jax']}; simulate n={args.n_sim} (block {args.block}), infer "
          f"n={args.n_infer} x {args.n_samples} draws (chunks of {args.chunk_rows})")
    base = next((r for r in results[0]["rows"] if r["mode"] == "mesh"), None)
    print(f"{'devices':>8} {'mode':>8} {'simulate gal/s':>15} {'speed-up':>9} "
          f"{'infer gal/s':>12} {'speed-up':>9}")
    for res in results:
        for r in res["rows"]:
            su = r["simulate_gal_s"] / base["simulate_gal_s"] if base else float("nan")
            iu = r["infer_gal_s"] / base["infer_gal_s"] if base else float("nan")
            print(f"{res['devices']:>8} {r['mode']:>8} {r['simulate_gal_s']:>15,.0f} "
                  f"{su:>8.2f}x {r['infer_gal_s']:>12,.1f} {iu:>8.2f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
