"""Benchmark: flow, importance sampling, ESS and NUTS side by side on the same galaxies.

    python benchmarks/bench_side_by_side.py --n-mock 3 --n-real 3

For each galaxy (``--n-mock`` mocks drawn as an SDSS catalog is made, ``--n-real`` real SDSS
galaxies of ``examples/data/sdss_main_10k.fits``; both with SDSS's calibration error in sigma,
as ``infer`` reads catalogs by default) and the shipped ``sdss_ugriz`` posterior:

* the **reference**: importance sampling (:func:`sedflow_jax.sbi.importance.sample_exact`) with
  target ESS ``--ref-ess`` (1,000) and N <= 128,000, trusted when k-hat < 0.7 and ESS >= 1,000
  (issue 16's reference posterior);
* **flow**: 4,000 amortized draws; **IS**: ``sample_exact`` with its defaults (target ESS 500,
  another seed); **ESS**: ensemble slice sampling, ``--ess-walkers`` x (``--ess-warmup`` +
  ``--ess-steps``) started at the flow's draws; **NUTS**: ``--nuts-chains`` x (``--nuts-warmup``
  + ``--nuts-draws``) from the MAP (PROVABGS's start), dense mass matrix;

and per method: wall time (after a warm-up galaxy that compiles everything), effective draws
(IS: Kish ESS of the smoothed weights; MCMC: the smallest bulk ESS over the 11 coordinates),
time per effective draw, R-hat (MCMC), the 68 % width of log M* and C2ST accuracy against the
reference draws (11-dim sampling space, quadratic classifier, 0.5 = indistinguishable). The
summary gives the median speed-up of IS over ESS and NUTS at equal effective draws. One JSON
document is printed (and written to ``--out``).

``--n-faint`` adds faint training-like mocks (r-band S/N <= ``--faint-snr-max``, 30), where MCMC
does converge: there IS is also compared with NUTS itself (C2ST of the IS draws against NUTS's,
``c2st_vs_converged_nuts``, on galaxies whose NUTS run converged: R-hat < 1.01 and bulk ESS >=
400 in every coordinate), the cross-check of the reference that issue 16 asks for; use long
runs there, e.g. ``--nuts-chains 4 --nuts-warmup 1000 --nuts-draws 4000``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _width68(x) -> float:
    lo, hi = np.nanpercentile(np.asarray(x, float), [16, 84])
    return float(hi - lo)


def _record(draws, seconds, n_eff, ref, rhat=None) -> dict:
    from sedflow_jax.eval.diagnostics import c2st

    draws = np.asarray(draws, float).reshape(-1, 11)
    out = {"seconds": seconds, "effective_draws": float(n_eff),
           "seconds_per_effective_draw": seconds / max(float(n_eff), 1e-9),
           "width68_logM": _width68(draws[:, 0])}
    if rhat is not None:
        out["rhat_max"] = float(np.nanmax(rhat))
    if ref is not None:
        out["c2st_vs_reference"] = float(c2st(draws, ref, 0, classifier="quadratic",
                                              max_samples=2000))
    return out


def _one_galaxy(post, model, f, s, z, m, a, seed) -> dict:
    from sedflow_jax import mcmc as M
    from sedflow_jax.sbi import importance as I
    from sedflow_jax.sim.layout import to_conditioning

    t = time.perf_counter()
    ref = I.sample_exact(post, seed, model, f, s, z, mask=m, target_ess=a.ref_ess,
                         n_max=128000, n_out=2000)
    rec = {"reference": {"seconds": time.perf_counter() - t, "ess": float(ref.ess),
                         "pareto_k": float(ref.pareto_k), "n_draws": int(ref.n_draws),
                         "trusted": bool(ref.ess >= 1000 and ref.pareto_k < 0.7),
                         "width68_logM": _width68(ref.s[:, 0])}}
    ref_s = ref.s if rec["reference"]["trusted"] else None
    t = time.perf_counter()
    fl = post.sample_batched(seed + 1, to_conditioning(f[None], s[None], np.atleast_1d(z)),
                             4000, mask=(m & (f > 0))[None] if post.mask_aware else None)
    fl_s = np.asarray(fl.s)[0]
    rec["flow"] = _record(fl_s, time.perf_counter() - t, len(fl_s), ref_s)
    t = time.perf_counter()
    r = I.sample_exact(post, seed + 2, model, f, s, z, mask=m)
    rec["importance"] = _record(r.s, time.perf_counter() - t, r.ess, ref_s)
    rec["importance"].update(flag=bool(r.flag), pareto_k=float(r.pareto_k),
                             n_draws=int(r.n_draws))
    t = time.perf_counter()
    e = M.run_ess(seed + 3, model, f, s, z, mask=m, num_chains=a.ess_walkers,
                  num_warmup=a.ess_warmup, num_samples=a.ess_steps,
                  init=fl_s[:a.ess_walkers], prior=post.prior)
    rec["ess"] = _record(e.flat_samples, time.perf_counter() - t, np.nanmin(e.ess_bulk), ref_s,
                         e.rhat)
    t = time.perf_counter()
    n = M.run_nuts(seed + 4, model, f, s, z, mask=m, num_chains=a.nuts_chains,
                   num_warmup=a.nuts_warmup, num_samples=a.nuts_draws, prior=post.prior)
    rec["nuts"] = _record(n.flat_samples, time.perf_counter() - t, np.nanmin(n.ess_bulk),
                          ref_s, n.rhat)
    _versus_converged_nuts(rec, n, {"importance": r.s, "reference": ref.s, "flow": fl_s})
    return rec


#: a NUTS run converged (fit to be a reference) when every coordinate has R-hat below this and
#: a bulk ESS of at least NUTS_MIN_ESS
NUTS_MAX_RHAT, NUTS_MIN_ESS = 1.01, 400.0


def _versus_converged_nuts(rec, nuts, draws) -> None:
    """C2ST of each method's draws against a converged NUTS run's (11-dim sampling space,
    quadratic classifier, NUTS thinned to ~2,000 draws), stored as ``c2st_vs_converged_nuts``;
    nothing when NUTS did not converge."""
    from sedflow_jax.eval.diagnostics import c2st

    ok = bool(np.nanmax(nuts.rhat) < NUTS_MAX_RHAT and np.nanmin(nuts.ess_bulk) >= NUTS_MIN_ESS)
    rec["nuts"]["converged"] = ok
    if not ok:
        return
    x = nuts.flat_samples
    x = x[:: max(1, len(x) // 2000)]
    for method, d in draws.items():
        rec[method]["c2st_vs_converged_nuts"] = float(c2st(
            np.asarray(d, float).reshape(-1, 11), x, 0, classifier="quadratic",
            max_samples=2000))


def _median(recs, method, key):
    v = [r[method][key] for r in recs if key in r[method] and np.isfinite(r[method][key])]
    return float(np.median(v)) if v else float("nan")


def _summary(recs) -> dict:
    out = {"n_galaxies": len(recs),
           "n_reference_trusted": int(sum(r["reference"]["trusted"] for r in recs))}
    for m in ("flow", "importance", "ess", "nuts"):
        out[m] = {k: _median(recs, m, k) for k in ("seconds", "effective_draws",
                                                    "seconds_per_effective_draw",
                                                    "width68_logM", "c2st_vs_reference",
                                                    "c2st_vs_converged_nuts", "rhat_max")}
    out["n_nuts_converged"] = int(sum(r["nuts"].get("converged", False) for r in recs))
    out["reference"] = {"c2st_vs_converged_nuts": _median(recs, "reference",
                                                          "c2st_vs_converged_nuts")}
    for m in ("ess", "nuts"):
        ratios = [r[m]["seconds_per_effective_draw"] / r["importance"]["seconds_per_effective_draw"]
                  for r in recs]
        out[f"speedup_importance_over_{m}_at_equal_effective_draws"] = float(np.median(ratios))
    return out


def _faint_mocks(post, model, n, snr_max, seed):
    """The first ``n`` training-like mocks with r-band S/N <= ``snr_max``: drawn with the
    training set's noise (the fitted sigma(flux) and, for half the rows, a calibration floor of
    up to 0.05 mag), so low S/N here means a large floor, inside the flow's training support;
    wide posteriors, which NUTS explores in affordable time."""
    import sedflow_jax as sj
    from bench_importance import _mocks

    noise = sj.default_noise_model(post.bands, calibration_floor=True)
    f, s, z, m = _mocks(post, model, 40 * n, seed, noise)
    r = list(post.bands).index("sdss_r")
    rows = np.flatnonzero(f[:, r] / s[:, r] <= snr_max)[:n]
    if len(rows) < n:
        raise SystemExit(f"only {len(rows)} of {40 * n} mocks have r-band S/N <= {snr_max}")
    return f[rows], s[rows], z[rows], m[rows]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-mock", type=int, default=3)
    ap.add_argument("--n-real", type=int, default=3)
    ap.add_argument("--n-faint", type=int, default=0,
                    help="faint training-like mocks, where NUTS converges (cross-check)")
    ap.add_argument("--faint-snr-max", type=float, default=30.0)
    ap.add_argument("--ref-ess", type=float, default=1000.0)
    ap.add_argument("--ess-walkers", type=int, default=30)
    ap.add_argument("--ess-warmup", type=int, default=1000)
    ap.add_argument("--ess-steps", type=int, default=2000)
    ap.add_argument("--nuts-chains", type=int, default=2)
    ap.add_argument("--nuts-warmup", type=int, default=200)
    ap.add_argument("--nuts-draws", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--catalog", default=str(ROOT / "examples" / "data" / "sdss_main_10k.fits"))
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    import jax

    import sedflow_jax as sj
    from bench_importance import _real, _sdss_like_mocks, emit_json
    from sedflow_jax.sbi.defaults import load_posterior

    post = load_posterior("sdss_ugriz")
    model = sj.load_model(filters=list(post.bands), z_max=post.prior.zmax)
    sets = {"mock_sdss_like": _sdss_like_mocks(post, model, a.n_mock + 1, a.seed + 200),
            "real_sdss": _real(post, a.n_real, a.catalog)}
    if a.n_faint:
        sets["mock_faint"] = _faint_mocks(post, model, a.n_faint, a.faint_snr_max, a.seed + 400)
    warm = argparse.Namespace(**{**vars(a), "ess_warmup": 10, "ess_steps": 10, "nuts_warmup": 5,
                                 "nuts_draws": 5, "ref_ess": 10.0})
    t = time.perf_counter()
    _one_galaxy(post, model, *(v[-1] for v in sets["mock_sdss_like"]), warm, a.seed + 99)
    out = {"backend": jax.default_backend(), "config": vars(a),
           "warmup_seconds": time.perf_counter() - t, "galaxies": []}
    for label, (f, s, z, m) in sets.items():
        k = {"mock_sdss_like": a.n_mock, "real_sdss": a.n_real}.get(label, a.n_faint)
        for i in range(k):
            rec = _one_galaxy(post, model, f[i], s[i], z[i], m[i], a, a.seed + 10 * i)
            rec.update(set=label, index=i, snr_r=float(f[i, 2] / s[i, 2]))
            out["galaxies"].append(rec)
            print(f"{label} {i}: " + ", ".join(
                f"{meth} {rec[meth].get('c2st_vs_reference', float('nan')):.2f} "
                f"{rec[meth]['seconds']:.1f}s" for meth in ("flow", "importance", "ess", "nuts")),
                file=sys.stderr)
    out["summary"] = _summary(out["galaxies"])
    emit_json(out, a.out)


if __name__ == "__main__":
    main()
