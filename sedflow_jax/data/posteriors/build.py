"""Build the shipped default posteriors, their build records and validation cards.

    python sedflow_jax/data/posteriors/build.py --model sdss_ugriz
    python sedflow_jax/data/posteriors/build.py --model galex_sdss
    python sedflow_jax/data/posteriors/build.py --model sdss_ugriz --quick --dest /tmp/q  # smoke

Each model is one folder ``sedflow_jax/data/posteriors/<name>/`` holding a saved
:class:`~sedflow_jax.sbi.posterior.AmortizedPosterior` (``posterior.json``, ``checkpoint.json``,
``flow-*.msgpack``: weights as msgpack + JSON, no pickle) and, written by this script:

* ``build.json``: the exact command, seed, simulation size, the training set's manifest hash
  (``config_sha256``), package and library versions, the flow / training configs, the per-epoch
  losses, the stopping epoch and why training stopped, and the sha256 and size of every weight /
  JSON file of the posterior (``tests/test_default_posteriors.py`` checks them);
* ``loss.png`` (the training curve, from ``train_posterior``);
* ``card.md`` + ``card.json``: the validation card (:func:`write_card`): SBC p-values and
  68 / 95 % coverage per coordinate on fresh mocks drawn like the training set, without masks
  and with random band masks; the real SDSS catalog run (log M* against Taylor et al. 2011's
  colour masses; for ``galex_sdss`` the GALEX-detected rows' log SFR, blue vs red); sizes and
  timings.

Steps: simulate the training set (prior -> photometry -> the shipped noise tables with their
calibration floors, ``default_noise_model(bands, calibration_floor=True)``) into ``--work``,
train a mask-aware logit-space flow (``train_posterior``; ``--max-minutes`` caps the training
wall clock, recorded), copy the posterior here, validate. The simulation resumes / reuses a
complete training set of the same configuration in ``--work``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
if str(REPO) not in sys.path:  # allow running from a checkout without installing
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from sedflow_jax.eval import diagnostics as D  # noqa: E402
from sedflow_jax.eval.validation import validate_posterior  # noqa: E402
from sedflow_jax.io import catalog as C  # noqa: E402
from sedflow_jax.io.mocks import mock_catalog, mock_truths  # noqa: E402
from sedflow_jax.nn import flow as F  # noqa: E402
from sedflow_jax.nn import train as T  # noqa: E402
from sedflow_jax.sbi import inference as INF  # noqa: E402
from sedflow_jax.sbi import masks as M  # noqa: E402
from sedflow_jax.sbi.posterior import AmortizedPosterior  # noqa: E402
from sedflow_jax.sbi.training import train_posterior  # noqa: E402
from sedflow_jax.sed.model import load_model  # noqa: E402
from sedflow_jax.sed.params import SAMPLING_NAMES  # noqa: E402
from sedflow_jax.sed.units import (GALEX_A_OVER_EBV, GALEX_ZP, SFD_AR_OVER_EBV,  # noqa: E402
                                   GALEX_BANDS as GALEX, SDSS_BANDS as SDSS)
from sedflow_jax.sim import prior as P  # noqa: E402
from sedflow_jax.sim.layout import to_conditioning  # noqa: E402
from sedflow_jax.sim.noise import default_noise_model  # noqa: E402
from sedflow_jax.sim.simulate import simulate  # noqa: E402
from sedflow_jax.util import atomic_write_json, sha256_file, utc_now, versions  # noqa: E402
from sedflow_jax.version import __version__  # noqa: E402


#: the shipped models: bands, simulation size and seed, dropout (random + band groups)
MODELS = {
    "sdss_ugriz": dict(bands=SDSS, n_sim=1_000_000, seed=1, band_dropout=0.5, min_bands=2,
                       group_drop=None),
    "galex_sdss": dict(bands=GALEX + SDSS, n_sim=600_000, seed=2, band_dropout=0.5, min_bands=2,
                       group_drop={"galex": (GALEX, 0.6)}),
}
#: caveats printed on the cards (what the numbers do not show)
NOTES = {
    "sdss_ugriz": "SDSS ugriz with the calibration floors of `default_noise_model(..., "
                  "calibration_floor=True)`: catalogs with floors in their errors (NSA) lie "
                  "inside the training support. Missing bands are assumed missing at random.",
    "galex_sdss": "The training set keeps only galaxies whose noiseless GALEX fluxes lie inside "
                  "the fitted GALEX noise table's range (the ~750 GALEX-detected galaxies of the "
                  "SDSS catalog), so 17 % of the simulations are kept and the model's implied "
                  "prior is the UV-detectable population, also for rows fit without GALEX; "
                  "in real catalogs GALEX is missing mostly because galaxies are too faint in the "
                  "UV, not at random. Compare the no-GALEX rows' masses with `sdss_ugriz`'s card; "
                  "prefer `sdss_ugriz` for rows without GALEX.",
}
QUICK = dict(n_sim=8_192, n_blocks=2, hidden=32, max_epochs=2, n_mock=60, n_samples=50,
             n_real=60, n_real_samples=100, n_derived=10)
FULL = dict(n_blocks=5, hidden=128, max_epochs=100, n_mock=1000, n_samples=300, n_real=3000,
            n_real_samples=500, n_derived=50)
POSTERIOR_FILES = ("posterior.json", "checkpoint.json")


def _real_sdss_module():
    """examples/real_sdss.py (the Taylor+11 masses and rest-frame colours), loaded by path."""
    path = REPO / "examples" / "real_sdss.py"
    spec = importlib.util.spec_from_file_location("_sedflow_real_sdss", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


RS = _real_sdss_module()


# ---------------------------------------------------------------------------------------------
# simulate + train
# ---------------------------------------------------------------------------------------------
def simulate_training_set(name, spec, work, n_sim):
    """The model's training set in ``work/<name>/trainset`` (reused when complete)."""
    bands = spec["bands"]
    prior = P.provabgs_prior()
    model = load_model(filters=list(bands), z_max=prior.zmax)
    noise = default_noise_model(bands, calibration_floor=True)
    folder = Path(work) / name / "trainset"
    t0 = time.perf_counter()
    simulate(spec["seed"], n_sim, model, prior, noise, out=folder, progress=False)
    man = json.loads((folder / "manifest.json").read_text())
    return folder, man, time.perf_counter() - t0


def _deadline(minutes):
    """A ``fit`` callback stopping training once ``minutes`` of wall clock have passed."""
    t_end = time.time() + 60.0 * float(minutes)
    state = {"hit": False}

    def cb(epoch, train_loss, val_loss):
        print(f"  epoch {epoch}: train {train_loss:.4f} val {val_loss:.4f}", flush=True)
        state["hit"] = time.time() > t_end
        return state["hit"]

    return cb, state


def train(name, spec, folder, work, size, max_minutes):
    """Train the mask-aware logit flow; returns (posterior, TrainResult, model dir, info)."""
    seed = spec["seed"]
    fc = F.FlowConfig.small(11, 3 * len(spec["bands"]) + 1, seed=seed).replace(
        n_blocks=size["n_blocks"], hidden=size["hidden"])
    tc = T.TrainConfig(seed=seed, batch_size=1024, learning_rate=1e-3, patience=5,
                       max_epochs=size["max_epochs"], progress=False)
    mdir = Path(work) / name / "model"
    if mdir.exists():
        shutil.rmtree(mdir)
    cb, state = _deadline(max_minutes)
    t0 = time.perf_counter()
    post, res = train_posterior(str(folder), mdir, flow_config=fc, train_config=tc, seed=seed,
                                band_dropout=spec["band_dropout"], min_bands=spec["min_bands"],
                                theta_space="logit", group_drop=spec["group_drop"], callback=cb)
    t_train = time.perf_counter() - t0
    reason = ("wall-clock cap" if state["hit"] else "patience" if res.stopped_early
              else "max_epochs")
    info = {"flow_config": fc.to_dict(), "train_config": tc.to_dict(), "seconds": t_train,
            "epochs_run": int(res.epochs), "best_epoch": int(res.best_epoch),
            "best_val_loss": float(res.best_val_loss), "stop_reason": reason,
            "max_minutes": float(max_minutes), "n_train": int(res.n_train),
            "n_val": int(res.n_val),
            "history": {k: [float(v) for v in vals] for k, vals in res.history.items()}}
    return post, res, mdir, info


def install(mdir, dest):
    """Copy the saved posterior (no training state) into ``dest``: {file: sha256, bytes}."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for f in dest.iterdir():
        if f.is_file() and f.suffix != ".py":
            f.unlink()
    files = {}
    ck = json.loads((Path(mdir) / "checkpoint.json").read_text())
    for f in list(POSTERIOR_FILES) + list(ck["files"].values()) + ["loss.png"]:
        shutil.copy2(Path(mdir) / f, dest / f)
        files[f] = {"sha256": sha256_file(dest / f), "bytes": (dest / f).stat().st_size}
    return files


# ---------------------------------------------------------------------------------------------
# validation card
# ---------------------------------------------------------------------------------------------
def card_masks(spec, n, seed):
    """Masks of the card's 'random masks' case: the training dropout (with its band groups)."""
    rng = np.random.default_rng(seed)
    nb = len(spec["bands"])
    if spec["group_drop"]:
        groups = M.normalize_group_drop(spec["group_drop"], spec["bands"])
        return M.group_band_mask(rng, n, nb, spec["band_dropout"], spec["min_bands"], groups)
    return M.random_band_mask(rng, n, nb, spec["band_dropout"], spec["min_bands"])


def calibration(post, truth, x, mask, n_samples, key):
    """SBC (chi2 / KS p per coordinate), coverage at 68 / 95 %, log M* width, for x + mask."""
    t0 = time.perf_counter()
    s = post.sample_batched(key, x, n_samples, mask=mask)
    dt = time.perf_counter() - t0
    full = s.n_accepted == n_samples
    ranks = D.sbc_ranks(truth[full], s.s[full])
    sbc = D.sbc_uniformity(ranks, n_samples)
    levels, cov = D.coverage(truth[full], s.s[full])
    q = np.nanpercentile(s.s[full, :, 0], [16, 50, 84], axis=1)
    names = list(SAMPLING_NAMES)
    return {
        "n_used": int(full.sum()), "n_samples": int(n_samples),
        "sbc_chi2_p": {k: float(sbc["chi2_pvalue"][i]) for i, k in enumerate(names)},
        "sbc_ks_p": {k: float(sbc["ks_pvalue"][i]) for i, k in enumerate(names)},
        "coverage_68": {k: float(np.interp(0.68, levels, cov[:, i])) for i, k in enumerate(names)},
        "coverage_95": {k: float(np.interp(0.95, levels, cov[:, i])) for i, k in enumerate(names)},
        "logM_mean_width68": float(np.mean(q[2] - q[0])),
        "logM_median_corr": float(np.corrcoef(q[1], truth[full, 0])[0, 1]),
        "n_bands_used_mean": float(np.mean(mask.sum(1))) if mask is not None else None,
        "sampling_s": dt, "galaxies_per_s": float(x.shape[0] / dt),
    }


def mock_cases(post, spec, size, seed):
    """Calibration on fresh floor-noise mocks: no masks (validate_posterior), random masks (the
    training dropout), and for GALEX models every GALEX band masked."""
    bands = spec["bands"]
    model = load_model(filters=list(bands), z_max=post.prior.zmax)
    noise = default_noise_model(bands, calibration_floor=True)
    cat = mock_catalog(seed, size["n_mock"], model=model, prior=post.prior, noise=noise,
                       max_tries=60)
    ph = C.read_photometry(cat, bands)
    x = to_conditioning(ph.flux, ph.sigma, ph.z)
    _, truth = mock_truths(cat)
    v = validate_posterior(post, seed + 1, n_samples=size["n_samples"], model=model, catalog=cat)
    out = {"validate_posterior": {k: v.summary[k] for k in (
               "n_used", "n_samples", "sbc", "coverage_68", "coverage_95", "all_passed",
               "timing_s")},
           "no_mask": calibration(post, truth, x, None, size["n_samples"],
                                  jax.random.key(seed + 2))}
    mask = card_masks(spec, x.shape[0], seed + 3)
    out["random_masks"] = calibration(post, truth, x, mask, size["n_samples"],
                                      jax.random.key(seed + 4))
    if spec["group_drop"]:
        m2 = np.ones_like(mask)
        m2[:, [bands.index(b) for b in GALEX]] = False
        out["no_galex"] = calibration(post, truth, x, m2, size["n_samples"],
                                      jax.random.key(seed + 5))
    return out


def flat_table(t):
    """The real catalog as flux_<band> / flux_ivar_<band> [nanomaggies], extinction corrected,
    GALEX from FLUX_AUTO [counts/s] as make_noise_table.py does; undetected: flux = ivar = 0."""
    from astropy.table import Table

    ext = np.asarray(t["EXTINCTION"], float)
    out = Table({"z": np.asarray(t["Z"], float)})
    for i, b in enumerate(SDSS):
        f = 10 ** (0.4 * ext[:, i])
        out[f"flux_{b}"] = np.asarray(t["MODELFLUX"], float)[:, i] * f
        out[f"flux_ivar_{b}"] = np.asarray(t["MODELFLUX_IVAR"], float)[:, i] / f ** 2
    ebv = ext[:, 2] / SFD_AR_OVER_EBV
    for b, col, zp, a in zip(GALEX, ("FUV", "NUV"), GALEX_ZP, GALEX_A_OVER_EBV):
        scale = 10 ** (0.4 * (22.5 - zp)) * 10 ** (0.4 * a * ebv)
        fl = np.asarray(t[f"{col}_FLUX_AUTO"], float)
        er = np.asarray(t[f"{col}_FLUXERR_AUTO"], float)
        ok = np.isfinite(fl) & np.isfinite(er) & (fl > 0) & (er > 0)
        out[f"flux_{b}"] = np.where(ok, fl * scale, 0.0)
        out[f"flux_ivar_{b}"] = np.where(ok, 1.0 / np.where(ok, er * scale, 1.0) ** 2, 0.0)
    return out


def _mass_stats(lm, lm_t, sel=None):
    ok = np.isfinite(lm) & np.isfinite(lm_t) & (True if sel is None else sel)
    d = lm[ok] - lm_t[ok]
    if d.size == 0:
        return {"n": 0}
    off = float(np.median(d))
    return {"n": int(ok.sum()), "median_offset_dex": off,
            "robust_scatter_dex": float(1.4826 * np.median(np.abs(d - off)))}


def real_catalog(post, spec, size, seed=0):
    """The real SDSS catalog (0.01 < z < 0.2; a random ``n_real`` subset): log M* medians vs
    Taylor+11 colour masses (Kroupa), and for GALEX models the GALEX rows' SFRs."""
    bands = spec["bands"]
    t = RS.load_catalog(size["n_real"], seed)
    model = load_model(filters=list(bands), z_max=post.prior.zmax)
    table = flat_table(t)
    res = INF.infer_catalog(post, table, key=seed, n_samples=size["n_real_samples"],
                            n_derived=size["n_derived"], model=model)
    ph, fit, tab = res.photometry, res.rows, res.table
    isd = [bands.index(b) for b in SDSS]
    with np.errstate(all="ignore"):
        mag = 22.5 - 2.5 * np.log10(ph.flux[fit][:, isd])
    sdss_model = load_model(filters=list(SDSS), z_max=post.prior.zmax)
    gi, abs_i = RS.rest_frame_gi(sdss_model, res.samples.theta, ph.z[fit], mag)
    lm_t = np.full(len(tab), np.nan)
    lm_t[fit] = RS.taylor2011_logmass(gi, abs_i)
    gi_all = np.full(len(tab), np.nan)
    gi_all[fit] = gi
    lm = np.asarray(tab["logmstar_surviving_p50"], float)
    all_used = ph.mask.all(1)
    rep = res.report
    out = {"catalog": "examples/data/sdss_main_10k.fits, 0.01 < z < 0.2",
           "n_rows": int(len(tab)), "n_fit": int(len(fit)),
           "report": {k: rep[k] for k in ("n_rows_fit_with_masked_bands", "n_rows_not_fit",
                                          "acceptance_mean", "time_sample_s",
                                          "galaxies_per_s_sampling") if k in rep},
           "n_samples": size["n_real_samples"], "n_derived": size["n_derived"],
           "mass_vs_taylor11": _mass_stats(lm, lm_t),
           "mass_vs_taylor11_all_bands_used": _mass_stats(lm, lm_t, all_used),
           "imf": "Kroupa (Taylor+11 Chabrier + 0.034 dex)"}
    if "galex_fuv" in bands:
        out["mass_vs_taylor11_no_galex_rows"] = _mass_stats(
            lm, lm_t, ~ph.mask[:, [bands.index(b) for b in GALEX]].any(1))
        out["galex_rows"] = galex_rows(post, table, ph, tab, gi_all, bands, size, seed)
    return out


def _sfr_split(sfr, lm, gi, rows):
    """Median log SFR(100 Myr) and log sSFR of the bluer / redder half of ``rows`` (g - i)."""
    cut = float(np.nanmedian(gi[rows]))
    res = {"gi_split": cut}
    for name, sel in (("blue", rows & (gi < cut)), ("red", rows & (gi >= cut))):
        ok = sel & np.isfinite(sfr) & np.isfinite(lm)
        res[name] = {"n": int(ok.sum()),
                     "median_log_sfr_100myr": float(np.median(sfr[ok])) if ok.any() else None,
                     "median_log_ssfr_100myr": float(np.median(sfr[ok] - lm[ok]))
                     if ok.any() else None}
    return res


def galex_rows(post, table, ph, tab, gi, bands, size, seed):
    """Rows with both GALEX bands: SFR of blue vs red galaxies, with GALEX and with GALEX masked
    (the same rows refit from ugriz alone)."""
    ig = [bands.index(b) for b in GALEX]
    rows = ph.mask[:, ig].all(1) & np.isfinite(gi)
    sfr = np.asarray(tab["log_sfr_100myr_p50"], float)
    lm = np.asarray(tab["logmstar_surviving_p50"], float)
    out = {"n_rows_with_fuv_and_nuv": int(rows.sum()),
           "n_rows_with_nuv": int(ph.mask[:, bands.index("galex_nuv")].sum()),
           "with_galex": _sfr_split(sfr, lm, gi, rows)}
    sub = table[rows]
    for b in GALEX:
        sub[f"flux_{b}"] = 0.0
        sub[f"flux_ivar_{b}"] = 0.0
    if len(sub):
        r2 = INF.infer_catalog(post, sub, key=seed, n_samples=size["n_real_samples"],
                               n_derived=size["n_derived"],
                               model=load_model(filters=list(bands), z_max=post.prior.zmax))
        sfr2 = np.full(len(tab), np.nan)
        lm2 = np.full(len(tab), np.nan)
        sfr2[rows] = np.asarray(r2.table["log_sfr_100myr_p50"], float)
        lm2[rows] = np.asarray(r2.table["logmstar_surviving_p50"], float)
        out["galex_masked"] = _sfr_split(sfr2, lm2, gi, rows)
    return out


def timings(post, dest, spec):
    """Load time (AmortizedPosterior.load, best of 3) and sampling speed (1000 galaxies x 1000
    draws, after one warm-up call), on this machine."""
    t_load = []
    for _ in range(3):
        t0 = time.perf_counter()
        AmortizedPosterior.load(dest)
        t_load.append(time.perf_counter() - t0)
    bands = spec["bands"]
    model = load_model(filters=list(bands), z_max=post.prior.zmax)
    cat = mock_catalog(99, 1000, model=model, prior=post.prior,
                       noise=default_noise_model(bands, calibration_floor=True), max_tries=60)
    ph = C.read_photometry(cat, bands)
    x = to_conditioning(ph.flux, ph.sigma, ph.z)
    post.sample_batched(jax.random.key(0), x[:64], 1000)
    t0 = time.perf_counter()
    post.sample_batched(jax.random.key(1), x, 1000)
    dt = time.perf_counter() - t0
    return {"load_s_best_of_3": min(t_load), "load_s_first": t_load[0],
            "sample_1000x1000_s": dt, "galaxies_per_s_at_1000_draws": 1000 / dt,
            "machine": f"{jax.devices()[0].platform}, {len(jax.devices())} device(s)"}


def write_card(name, dest, size):
    """card.json + card.md beside the model in ``dest``."""
    spec = MODELS[name]
    dest = Path(dest)
    post = AmortizedPosterior.load(dest)
    build_rec = json.loads((dest / "build.json").read_text())
    t0 = time.perf_counter()
    card = {"name": name, "command": " ".join(["python"] + sys.argv), "created": utc_now(),
            "package_version": __version__, "bands": list(spec["bands"]),
            "n_mock": size["n_mock"],
            "mocks": mock_cases(post, spec, size, seed=2026),
            "real_catalog": real_catalog(post, spec, size),
            "timings": timings(post, dest, spec),
            "size_bytes": build_rec["total_bytes"],
            "training": {k: build_rec["training"][k] for k in
                         ("best_epoch", "epochs_run", "stop_reason", "best_val_loss",
                          "seconds", "n_train", "n_val")},
            "training_set": build_rec["training_set"]}
    card["seconds"] = time.perf_counter() - t0
    atomic_write_json(dest / "card.json", card, indent=1)
    (dest / "card.md").write_text(card_markdown(card))
    print((dest / "card.md").read_text())
    return card


def _fmt(v, f=".3f"):
    return "n/a" if v is None else format(v, f)


def card_markdown(card) -> str:  # long: one table row per case and coordinate
    """The card as Markdown."""
    tr, ts = card["training"], card["training_set"]
    lines = [f"# Validation card: `{card['name']}`", "",
             f"Bands {', '.join(card['bands'])}; package {card['package_version']}; "
             f"written {card['created']} by `{card['command']}`.", "",
             f"Training set: {ts['n_kept']:,} kept of {ts['n_simulated']:,} simulated "
             f"(config_sha256 `{ts['config_sha256'][:16]}...`), {ts['noise']}, {ts['prior']}. "
             f"Training: best epoch {tr['best_epoch']} of {tr['epochs_run']} "
             f"(stopped by {tr['stop_reason']}), best validation loss "
             f"{tr['best_val_loss']:.4f}, {tr['seconds'] / 60:.1f} min.", "",
             f"## Calibration on {card['n_mock']} fresh mocks (floor noise model)", "",
             "SBC: chi-square / KS p-values of the rank histograms per sampling coordinate; "
             "coverage: fraction of truths inside the central 68 / 95 % intervals.", ""]
    cases = [(k, v) for k, v in card["mocks"].items() if k != "validate_posterior"]
    names = list(cases[0][1]["sbc_chi2_p"])
    head = "| coordinate | " + " | ".join(f"{k}: SBC chi2 p / KS p | cov68 / cov95"
                                         for k, _ in cases) + " |"
    lines += [head, "|---" * (1 + 2 * len(cases)) + "|"]
    for n in names:
        cells = []
        for _, v in cases:
            cells.append(f"{v['sbc_chi2_p'][n]:.3g} / {v['sbc_ks_p'][n]:.3g}")
            cells.append(f"{v['coverage_68'][n]:.3f} / {v['coverage_95'][n]:.3f}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "| case | n | mean bands used | log M* 68 % width | corr(median, truth) |",
              "|---|---|---|---|---|"]
    for k, v in cases:
        lines.append(f"| {k} | {v['n_used']} | {_fmt(v['n_bands_used_mean'], '.2f')} | "
                     f"{v['logM_mean_width68']:.3f} | {v['logM_median_corr']:.3f} |")
    nm = card["mocks"]["validate_posterior"]
    lines += ["", f"`validate_posterior` (the same mocks, no masks, its own draws): all 11 "
              f"coordinates uniform (chi2 and KS p >= 0.01): **{nm['all_passed']}**; log M* "
              f"coverage 68 % {nm['coverage_68']['logmstar']:.3f}, 95 % "
              f"{nm['coverage_95']['logmstar']:.3f}.", ""]
    lines += real_markdown(card["real_catalog"])
    tm = card["timings"]
    if NOTES.get(card["name"]):
        lines += ["", "## Caveats", "", NOTES[card["name"]]]
    lines += ["", "## Size and timings", "",
              f"- files: {card['size_bytes'] / 1e6:.2f} MB (weights + JSON)",
              f"- load: {tm['load_s_best_of_3']:.3f} s (first {tm['load_s_first']:.3f} s)",
              f"- sampling: {tm['galaxies_per_s_at_1000_draws']:.1f} galaxies/s at 1000 draws "
              f"({tm['machine']}; 2 shared CPU cores when built)"]
    return "\n".join(lines) + "\n"


def real_markdown(r) -> list:
    lines = ["## Real catalog", "",
             f"{r['catalog']}: {r['n_fit']} of {r['n_rows']} rows fit "
             f"({r['n_samples']} draws, {r['n_derived']} for derived quantities). "
             f"log M* posterior median minus Taylor et al. (2011) (g - i) colour mass "
             f"({r['imf']}):", "",
             "| rows | n | median offset [dex] | robust scatter [dex] |", "|---|---|---|---|"]
    for k, label in (("mass_vs_taylor11", "all fit"),
                     ("mass_vs_taylor11_all_bands_used", "every band used"),
                     ("mass_vs_taylor11_no_galex_rows", "no GALEX band used")):
        if k in r and r[k].get("n"):
            v = r[k]
            lines.append(f"| {label} | {v['n']} | "
                         f"{v['median_offset_dex']:+.3f} | {v['robust_scatter_dex']:.3f} |")
    g = r.get("galex_rows")
    if g:
        lines += ["", f"GALEX rows (FUV and NUV detected: {g['n_rows_with_fuv_and_nuv']}; NUV: "
                  f"{g['n_rows_with_nuv']}), split at their median rest-frame g - i "
                  f"({g['with_galex']['gi_split']:.2f}):", "",
                  "| fit | blue: n, median log SFR, log sSFR | red: n, median log SFR, log sSFR |",
                  "|---|---|---|"]
        for k in ("with_galex", "galex_masked"):
            if k in g:
                b, rd = g[k]["blue"], g[k]["red"]
                lines.append(f"| {k} | {b['n']}, {_fmt(b['median_log_sfr_100myr'])}, "
                             f"{_fmt(b['median_log_ssfr_100myr'])} | {rd['n']}, "
                             f"{_fmt(rd['median_log_sfr_100myr'])}, "
                             f"{_fmt(rd['median_log_ssfr_100myr'])} |")
    return lines


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def build(name, dest, work, size, max_minutes, n_sim):
    """Simulate, train, install into ``dest`` and write ``build.json``."""
    spec = MODELS[name]
    folder, man, t_sim = simulate_training_set(name, spec, work, n_sim)
    print(f"{name}: training set {folder}: {man['n_kept']} of {man['n']} rows kept "
          f"({t_sim:.0f} s)", flush=True)
    post, res, mdir, info = train(name, spec, folder, work, size, max_minutes)
    files = install(mdir, dest)
    rec = {
        "name": name, "command": " ".join(["python"] + sys.argv), "created": utc_now(),
        "package_version": __version__, "versions": versions("jax", "flax", "optax", "numpy"),
        "seed": spec["seed"], "bands": list(spec["bands"]),
        "training_set": {"n_simulated": int(man["n"]), "n_kept": int(man["n_kept"]),
                         "config_sha256": man["config_sha256"], "seconds": t_sim,
                         "noise": "default_noise_model(bands, calibration_floor=True)",
                         "prior": "provabgs_prior() (z 0-0.2)"},
        "band_dropout": spec["band_dropout"], "min_bands": spec["min_bands"],
        "group_drop": {k: {"bands": list(b), "p": p} for k, (b, p) in
                       (spec["group_drop"] or {}).items()},
        "theta_space": "logit", "training": info, "files": files,
        "total_bytes": int(sum(f["bytes"] for f in files.values())),
    }
    atomic_write_json(Path(dest) / "build.json", rec, indent=1)
    print(f"{name}: best epoch {info['best_epoch']} of {info['epochs_run']} "
          f"({info['stop_reason']}), val loss {info['best_val_loss']:.4f}, "
          f"{info['seconds']:.0f} s -> {dest}", flush=True)
    return post


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, choices=sorted(MODELS))
    ap.add_argument("--dest", default=None, help="output folder (default: this folder/<model>)")
    ap.add_argument("--work", default="posteriors_work",
                    help="folder for the training set and training checkpoints (not shipped)")
    ap.add_argument("--quick", action="store_true", help="a tiny smoke run (not a real model)")
    ap.add_argument("--max-minutes", type=float, default=20.0,
                    help="training wall-clock cap (checked after each epoch)")
    ap.add_argument("--n-sim", type=int, default=None, help="override the simulation size")
    ap.add_argument("--skip-train", action="store_true", help="only (re)write the card")
    ap.add_argument("--skip-card", action="store_true", help="only simulate, train, install")
    ap.add_argument("--render-card", action="store_true",
                    help="only rewrite card.md from an existing card.json")
    a = ap.parse_args(argv)
    size = dict(FULL, **(QUICK if a.quick else {}))
    n_sim = a.n_sim or (QUICK["n_sim"] if a.quick else MODELS[a.model]["n_sim"])
    dest = Path(a.dest) if a.dest else HERE / a.model
    if a.render_card:
        (dest / "card.md").write_text(card_markdown(json.loads((dest / "card.json").read_text())))
        return
    if not a.skip_train:
        build(a.model, dest, a.work, size, a.max_minutes, n_sim)
    if not a.skip_card:
        write_card(a.model, dest, size)


if __name__ == "__main__":
    main()
