"""Benchmark: exact posteriors by importance sampling the flow (sedflow_jax.sbi.importance).

    python benchmarks/bench_importance.py --model sedflow_jax/data/posteriors/sdss_ugriz --n 32

On ``--n`` mock galaxies drawn like the training set (prior -> photometry -> noise, the training
cuts) and ``--n`` real SDSS galaxies of ``examples/data/sdss_main_10k.fits`` (MODELFLUX /
MODELFLUX_IVAR, Galactic extinction corrected, 0 < z <= the prior's zmax), reports per set: the
fraction of galaxies reaching ESS >= target with k-hat < 0.7, the median efficiency (ESS / N) of
the flow alone (its own draws weighted against it) and of the final (defensive) proposal, the
median number of draws, galaxies/s (after a warm-up call that compiles), and the median 68 %
width of log M* of the exact (importance-resampled) vs the flow's posterior. Prints one JSON
document (also written to ``--out``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _width68(a):
    lo, hi = np.nanpercentile(a, [16, 84], axis=-1)
    return hi - lo


def _why(r: str) -> str:
    if "k-hat" in r and "ESS" in r:
        return "k-hat and ESS"
    if "k-hat" in r:
        return "k-hat only"
    if "ESS" in r:
        return "ESS only"
    return r or "ok"


def _exact_kwargs(a) -> dict:
    """The sample_exact options of the command line."""
    return dict(n_initial=a.n_initial, n_max=a.n_max, target_ess=a.target_ess, n_out=a.n_out,
                defensive=None if a.defensive == "none" else
                (True if a.defensive == "default" else
                 tuple(map(float, a.defensive.split(",")))),
                widen=a.widen, adapt=a.adapt)


def _run(post, model, flux, sigma, z, mask, a, label):
    from sedflow_jax.sbi import importance as I
    from sedflow_jax.sim.layout import to_conditioning

    t = time.perf_counter()
    res = I.sample_exact(post, a.seed, model, flux, sigma, z, mask=mask, **_exact_kwargs(a))
    dt = time.perf_counter() - t
    fit = ~np.isin(res.reason, ["no usable band"]) & np.isfinite(res.ess)
    good = (res.ess >= a.target_ess) & (res.pareto_k < 0.7)
    x = to_conditioning(flux, sigma, z)
    fl = post.sample_batched(a.seed + 1, np.nan_to_num(x), a.n_out,
                             mask=mask & (flux > 0) if post.mask_aware else None)
    w_exact, w_flow = _width68(res.s[..., 0]), _width68(fl.s[..., 0])
    return {
        "set": label, "n_galaxies": int(len(z)), "n_fitted": int(fit.sum()),
        "fraction_ess_and_khat_ok": float(good.mean()),
        "median_efficiency_flow_alone": float(np.nanmedian(res.efficiency_flow)),
        "median_efficiency_final_proposal": float(np.nanmedian(res.efficiency)),
        "median_pareto_k": float(np.nanmedian(res.pareto_k)),
        "fraction_khat_below_0.7": float(np.mean(res.pareto_k < 0.7)),
        "median_n_draws": float(np.median(res.n_draws)),
        "max_n_draws": int(np.max(res.n_draws)),
        "seconds": dt, "galaxies_per_s": len(z) / dt,
        "median_width68_logM_exact": float(np.nanmedian(w_exact)),
        "median_width68_logM_flow": float(np.nanmedian(w_flow)),
        "median_ratio_width_exact_over_flow": float(np.nanmedian(w_exact / w_flow)),
        "reasons": {r: int(c) for r, c in zip(*np.unique([_why(r) for r in res.reason],
                                                          return_counts=True))},
    }


def _training_noise(post, model_dir):
    """The training set's noise model (build.json records it), default_noise_model otherwise."""
    import sedflow_jax as sj

    info = Path(model_dir) / "build.json"
    floor = info.exists() and "calibration_floor=True" in json.dumps(json.loads(
        info.read_text()).get("training_set", {}))
    return sj.default_noise_model(post.bands, calibration_floor=floor), floor


def _mocks(post, model, n, seed, noise, truths=False):
    import sedflow_jax as sj
    from sedflow_jax.io.mocks import mock_truths

    cat = sj.mock_catalog(seed, n, model=model, prior=post.prior, noise=noise)
    flux = np.column_stack([np.asarray(cat[f"flux_{b}"], float) for b in post.bands])
    ivar = np.column_stack([np.asarray(cat[f"flux_ivar_{b}"], float) for b in post.bands])
    out = (flux, 1.0 / np.sqrt(ivar), np.asarray(cat["z"], float), np.ones(flux.shape, bool))
    return out + (mock_truths(cat)[1],) if truths else out


def calibration(post, model, a, noise):
    """Coverage of the importance posteriors on ``a.calibration`` training-like mocks: the
    fraction trustworthy, and for those, per sampling coordinate, the fraction of truths inside
    the central 68 / 95 % intervals of the resampled draws (eval.diagnostics.coverage; an exact
    posterior gives 0.68 / 0.95 up to binomial noise; selecting on trustworthiness can bias it a
    little)."""
    from sedflow_jax.eval.diagnostics import coverage
    from sedflow_jax.sbi import importance as I
    from sedflow_jax.sim.prior import SAMPLING_NAMES

    f, s, z, m, truth = _mocks(post, model, a.calibration, a.seed + 300, noise, truths=True)
    t = time.perf_counter()
    res = I.sample_exact(post, a.seed, model, f, s, z, mask=m, **_exact_kwargs(a))
    dt = time.perf_counter() - t
    ok = ~res.flag
    _, cov = coverage(truth[ok], res.s[ok], [0.68, 0.95])
    table = {name: {"coverage68": float(cov[0, j]), "coverage95": float(cov[1, j])}
             for j, name in enumerate(SAMPLING_NAMES)}
    return {"n_mocks": int(a.calibration), "n_trustworthy": int(ok.sum()),
            "fraction_trustworthy": float(ok.mean()), "seconds": dt,
            "galaxies_per_s": a.calibration / dt,
            "median_efficiency": float(np.nanmedian(res.efficiency)),
            "binomial_sd68": float(np.sqrt(0.68 * 0.32 / max(1, ok.sum()))),
            "coverage": table}


def _real(post, n, path, floor_mag=None):
    from astropy.table import Table

    from sedflow_jax.io.catalog import read_photometry

    t = Table.read(path)
    ph = read_photometry(t, post.bands, vector_flux="MODELFLUX", vector_ivar="MODELFLUX_IVAR",
                         extinction="EXTINCTION", z_col="Z", mask_bands=post.mask_aware,
                         z_range=(post.prior.zmin, post.prior.zmax))
    rows = np.flatnonzero(ph.flag == 0)[:n]
    flux, sigma = ph.flux[rows], ph.sigma[rows]
    if floor_mag is not None:  # a calibration floor in quadrature (mag -> relative flux error)
        c = np.broadcast_to(np.asarray(floor_mag, float), (flux.shape[1],))
        sigma = np.sqrt(sigma ** 2 + (c * np.abs(flux) * np.log(10) / 2.5) ** 2)
    return flux, sigma, ph.z[rows], ph.mask[rows]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a trained posterior folder")
    ap.add_argument("--n", type=int, default=32, help="galaxies per set (mock and real)")
    ap.add_argument("--n-initial", type=int, default=2000)
    ap.add_argument("--n-max", type=int, default=32000)
    ap.add_argument("--target-ess", type=float, default=500.0)
    ap.add_argument("--n-out", type=int, default=1000)
    ap.add_argument("--defensive", default="default",
                    help="'default', 'none' (the flow alone) or fractions 'flow,wide,prior'")
    ap.add_argument("--widen", type=float, default=1.5)
    ap.add_argument("--adapt", type=int, default=None,
                    help="per-galaxy adaptation rounds (default sbi.importance.DEFAULT_ADAPT)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--real-floor", default=None,
                    help="also run the real galaxies with a calibration floor added to their "
                         "errors: mags per band, comma-separated (e.g. 0.05,0.02,0.02,0.02,0.03)")
    ap.add_argument("--catalog", default=str(ROOT / "examples" / "data" / "sdss_main_10k.fits"))
    ap.add_argument("--calibration", type=int, default=0,
                    help="also: coverage of the trustworthy importance posteriors on this many "
                         "training-like mocks (e.g. 300)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.adapt is None:
        from sedflow_jax.sbi.importance import DEFAULT_ADAPT

        a.adapt = DEFAULT_ADAPT

    import jax

    import sedflow_jax as sj
    from sedflow_jax.sbi.posterior import AmortizedPosterior

    post = AmortizedPosterior.load(a.model)
    model = sj.load_model(filters=list(post.bands), z_max=post.prior.zmax)
    noise, floor = _training_noise(post, a.model)
    sets = {"mock": _mocks(post, model, a.n, a.seed + 100, noise),
            "real_sdss": _real(post, a.n, a.catalog)}
    if a.real_floor:
        floor_mag = [float(v) for v in a.real_floor.split(",")]
        sets["real_sdss_with_floor"] = _real(post, a.n, a.catalog, floor_mag)
    f, s, z, m = sets["mock"]
    # the warm-up compiles the one block program (first and adapted rounds alike)
    warm = argparse.Namespace(**{**vars(a), "n_max": 2 * a.n_initial})
    t = time.perf_counter()
    _run(post, model, f[:1], s[:1], z[:1], m[:1], warm, "warm-up")
    compile_s = time.perf_counter() - t
    out = {"model": a.model, "backend": jax.default_backend(), "config": vars(a),
           "warmup_seconds": compile_s, "mock_noise_calibration_floor": floor,
           "results": [_run(post, model, *sets[k], a, k) for k in sets]}
    if a.calibration:
        out["calibration"] = calibration(post, model, a, noise)
    emit_json(out, a.out)


def emit_json(doc: dict, path=None) -> None:
    """Print a benchmark's JSON document; also write it to ``path`` when given."""
    text = json.dumps(doc, indent=1)
    print(text)
    if path:
        Path(path).write_text(text + "\n")


if __name__ == "__main__":
    main()
