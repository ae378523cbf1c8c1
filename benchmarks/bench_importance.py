"""Benchmark: exact posteriors by importance sampling the flow (sedflow_jax.sbi.importance).

    python benchmarks/bench_importance.py --model sedflow_jax/data/posteriors/sdss_ugriz --n 32

Four sets of ``--n`` galaxies: ``mock`` drawn like the training set (prior -> photometry ->
noise, the training cuts; sigma as drawn); ``mock_sdss_like`` drawn as an SDSS catalog is made
(the fitted MODELFLUX sigma without floor, plus SDSS's calibration error drawn into the flux and
added back to sigma in quadrature, as ``infer`` does by default); ``real_sdss``: real SDSS
galaxies of ``examples/data/sdss_main_10k.fits`` (MODELFLUX / MODELFLUX_IVAR, Galactic
extinction corrected, 0 < z <= the prior's zmax) read as ``infer`` reads them (calibration error
added, ``--calibration-error auto``); ``real_sdss_statistical_sigma_only``: the same galaxies
with MODELFLUX_IVAR's sigma as given (``--calibration-error none``). Reports per set: the
fraction of galaxies reaching ESS >= target with k-hat < 0.7, the median efficiency (ESS / N) of
the flow alone (its own draws weighted against it) and of the final (defensive) proposal, the
median number of draws, galaxies/s (after a warm-up call that compiles), and the median 68 %
width of log M* of the exact (importance-resampled) vs the flow's posterior (per galaxy as a
figure with ``--figure``). Prints one JSON document (also written to ``--out``).
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


#: the galaxy sets, in the order they are run and reported
SETS = ("mock", "mock_sdss_like", "real_sdss", "real_sdss_statistical_sigma_only")


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
        "_widths": (w_exact, w_flow, good),  # for --figure (not written to the JSON)
    }


def width_figure(results, path) -> None:
    """The exact (importance-resampled) 68 % width of log M* against the flow's, per galaxy and
    set (filled: trustworthy; open: flagged), with the 1:1 line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = [r for r in results if "_widths" in r]
    fig, axes = plt.subplots(1, len(sets), figsize=(3.4 * len(sets), 3.4), sharex=True,
                             sharey=True, squeeze=False)
    for ax, r in zip(axes[0], sets):
        we, wf, ok = r["_widths"]
        ax.scatter(wf[ok], we[ok], s=8, c="C0", label=f"trustworthy ({ok.mean():.0%})")
        ax.scatter(wf[~ok], we[~ok], s=10, facecolors="none", edgecolors="C3", label="flagged")
        ax.plot([0, 1.2], [0, 1.2], "k--", lw=0.8)
        ax.set_xlim(0, 1.0)
        ax.set_ylim(0, 1.0)
        ax.set_title(r["set"].replace("_", " "), fontsize=9)
        ax.set_xlabel("flow: 68 % width of log M* [dex]")
        ax.legend(fontsize=7, loc="upper left")
    axes[0][0].set_ylabel("exact (IS): 68 % width of log M* [dex]")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


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


def _real(post, n, path, calibration_error="auto"):
    """The first n usable real SDSS rows, read as `infer` reads them (its default
    --calibration-error auto adds SDSS's calibration error to MODELFLUX_IVAR's sigma)."""
    from astropy.table import Table

    from sedflow_jax.io.catalog import read_photometry

    t = Table.read(path)
    ph = read_photometry(t, post.bands, vector_flux="MODELFLUX", vector_ivar="MODELFLUX_IVAR",
                         extinction="EXTINCTION", z_col="Z", mask_bands=post.mask_aware,
                         z_range=(post.prior.zmin, post.prior.zmax),
                         calibration_error=calibration_error)
    rows = np.flatnonzero(ph.flag == 0)[:n]
    return ph.flux[rows], ph.sigma[rows], ph.z[rows], ph.mask[rows]


def _sdss_like_mocks(post, model, n, seed):
    """Mocks as a real SDSS catalog is made: the fitted MODELFLUX noise (statistical sigma, no
    floor) plus a real calibration error drawn into the flux (N(0, c f), c of
    io.catalog.CALIBRATION_ERROR_MAG); sigma reported statistical only, and the calibration
    added back in quadrature as `infer` does by default."""
    import sedflow_jax as sj
    from sedflow_jax.io.catalog import add_calibration_error, calibration_error_mag
    from sedflow_jax.sed.units import MAG_PER_LN

    f, s, z, m = _mocks(post, model, n, seed, sj.default_noise_model(post.bands))
    c = calibration_error_mag(post.bands, "auto")
    rng = np.random.default_rng(seed)
    f = f + rng.normal(size=f.shape) * (c / MAG_PER_LN) * f
    return f, add_calibration_error(f, s, c), z, m


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a trained posterior folder")
    ap.add_argument("--n", type=int, default=32, help="galaxies per set (mock and real)")
    ap.add_argument("--n-initial", type=int, default=2000)
    ap.add_argument("--n-max", type=int, default=64000)
    ap.add_argument("--target-ess", type=float, default=500.0)
    ap.add_argument("--n-out", type=int, default=1000)
    ap.add_argument("--defensive", default="default",
                    help="'default', 'none' (the flow alone) or fractions 'flow,wide,prior'")
    ap.add_argument("--widen", type=float, default=1.5)
    ap.add_argument("--adapt", type=int, default=None,
                    help="per-galaxy adaptation rounds (default sbi.importance.DEFAULT_ADAPT)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--catalog", default=str(ROOT / "examples" / "data" / "sdss_main_10k.fits"))
    ap.add_argument("--calibration", type=int, default=0,
                    help="also: coverage of the trustworthy importance posteriors on this many "
                         "training-like mocks (e.g. 300)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--sets", default=",".join(SETS),
                    help=f"comma-separated subset of {','.join(SETS)}")
    ap.add_argument("--figure", default=None, help="write the exact-vs-flow width figure here")
    a = ap.parse_args(argv)
    chosen = [k.strip() for k in a.sets.split(",") if k.strip()]
    unknown = sorted(set(chosen) - set(SETS))
    if unknown or not chosen:
        ap.error(f"--sets: unknown {unknown}; choose from {','.join(SETS)}")
    if a.adapt is None:
        from sedflow_jax.sbi.importance import DEFAULT_ADAPT

        a.adapt = DEFAULT_ADAPT

    import jax

    import sedflow_jax as sj
    from sedflow_jax.sbi.posterior import AmortizedPosterior

    post = AmortizedPosterior.load(a.model)
    model = sj.load_model(filters=list(post.bands), z_max=post.prior.zmax)
    noise, floor = _training_noise(post, a.model)
    makers = {"mock": lambda: _mocks(post, model, a.n, a.seed + 100, noise),
              "mock_sdss_like": lambda: _sdss_like_mocks(post, model, a.n, a.seed + 200),
              "real_sdss": lambda: _real(post, a.n, a.catalog),
              "real_sdss_statistical_sigma_only": lambda: _real(post, a.n, a.catalog, None)}
    sets = {k: makers[k]() for k in SETS if k in chosen}
    f, s, z, m = next(iter(sets.values()))
    # the warm-up compiles the one block program (first and adapted rounds alike)
    warm = argparse.Namespace(**{**vars(a), "n_max": 2 * a.n_initial})
    t = time.perf_counter()
    _run(post, model, f[:1], s[:1], z[:1], m[:1], warm, "warm-up")
    compile_s = time.perf_counter() - t
    out = {"model": a.model, "backend": jax.default_backend(), "config": vars(a),
           "warmup_seconds": compile_s, "mock_noise_calibration_floor": floor,
           "results": [_run(post, model, *sets[k], a, k) for k in sets]}
    if a.figure:
        width_figure(out["results"], a.figure)
    for r in out["results"]:
        r.pop("_widths")
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
