"""SEDflow posteriors for real SDSS galaxies, with band masks and training-support checks.

    python examples/real_sdss.py --n-galaxies 200 --out real_sdss_out          # a quick look
    python examples/real_sdss.py --model my_masked_model --n-galaxies all       # the full run
    python examples/real_sdss.py --model sdss_ugriz --n-galaxies all            # shipped model

Reads the repo's real catalog (``examples/data/sdss_main_10k.fits``: 10,000 SDSS Main-sample
galaxies, NYU-VAGC via kcorrect, BSD-3), keeps 0.01 < z < 0.2 (9,264 rows), corrects MODELFLUX for
Galactic extinction (EXTINCTION), builds the band mask (NaN, ivar <= 0, sentinels, flux <= 0, an
optional S/N floor), checks every band against the training set's (mag, sigma) support (bands
outside it are masked), samples the posterior of every usable galaxy, and writes:

* ``posteriors.fits`` (per-galaxy medians / 16 / 84 %, flags, masks) and ``report.json`` (counts,
  support fractions, acceptance, timings);
* ``support.png``: the catalog's (mag, sigma_mag) against the training set's support, per band;
* ``mass_sfr.png``: SEDflow's stellar mass against Taylor et al. (2011)'s colour-based
  mass-to-light relation, and SFR against stellar mass (the star-forming sequence).

``--model`` is a trained model folder or the name of a shipped default posterior (``sdss_ugriz``,
see ``sedflow_jax/data/posteriors/``: trained with the SDSS noise model and its calibration
floors, with a validation card). Without ``--model`` a small mask-aware model is trained first
(``--train-rows`` simulations): good enough to look at, not a calibrated production model.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

CATALOG = Path(__file__).resolve().parent / "data" / "sdss_main_10k.fits"
SDSS = ("sdss_u", "sdss_g", "sdss_r", "sdss_i", "sdss_z")
READ_KW = dict(vector_flux="MODELFLUX", vector_ivar="MODELFLUX_IVAR", extinction="EXTINCTION",
               z_col="Z")
#: Chabrier -> Kroupa stellar masses: M_Kroupa / M_Chabrier = 0.66 / 0.61 (Madau & Dickinson 2014)
CHABRIER_TO_KROUPA_DEX = float(np.log10(0.66 / 0.61))


def load_catalog(n_galaxies=None, seed: int = 0, path=CATALOG):
    """The real catalog's rows with 0.01 < Z < 0.2 (all, or a random subset of n_galaxies)."""
    from astropy.table import Table

    t = Table.read(path)
    z = np.asarray(t["Z"], float)
    t = t[(z > 0.01) & (z < 0.2)]
    if n_galaxies is not None and n_galaxies < len(t):
        rows = np.sort(np.random.default_rng(seed).choice(len(t), n_galaxies, replace=False))
        t = t[rows]
    return t


def train_masked_model(out, *, train_rows=1_000_000, seed=0, max_epochs=130, patience=12,
                       n_blocks=5, hidden=128, band_dropout=0.5, theta_space="logit",
                       progress=False):
    """Simulate ``train_rows`` galaxies and train a mask-aware flow into ``out`` (in logit
    coordinates: every draw lies inside the prior box)."""
    import sedflow_jax as sj
    from sedflow_jax.nn import flow as F
    from sedflow_jax.nn import train as T
    from sedflow_jax.nn import checkpoint as CK
    from sedflow_jax.nn import data as TD

    out = Path(out)
    sj.simulate(seed, train_rows, out=out / "trainset", progress=progress)
    fc = F.FlowConfig.small(11, 16, seed=seed).replace(n_blocks=n_blocks, hidden=hidden)
    tc = T.TrainConfig(seed=seed, batch_size=512, learning_rate=1e-3, patience=patience,
                       max_epochs=max_epochs, progress=progress)
    post, res = sj.train_posterior(str(out / "trainset"), out / "model", flow_config=fc,
                                   train_config=tc, seed=seed, band_dropout=band_dropout,
                                   theta_space=theta_space)
    return post, res


def load_model_or_default(name_or_path):
    """A trained model folder, or a shipped default posterior by name (``sdss_ugriz``)."""
    from sedflow_jax.sbi.posterior import AmortizedPosterior

    p = Path(name_or_path)
    if (p / "posterior.json").exists():
        return AmortizedPosterior.load(p)
    shipped = Path(__file__).resolve().parents[1] / "sedflow_jax" / "data" / "posteriors"
    if (shipped / str(name_or_path) / "posterior.json").exists():
        post = AmortizedPosterior.load(shipped / str(name_or_path))
        if tuple(post.bands) != SDSS:
            raise SystemExit(f"{name_or_path}: this example reads SDSS ugriz only; "
                             "see sedflow_jax/data/posteriors/build.py for the GALEX catalog")
        return post
    raise SystemExit(f"no trained model at {name_or_path} and no shipped model of that name")


def rest_frame_gi(model, theta, z, mag_obs, n_draws: int = 16):
    """Rest-frame (g - i) and absolute i magnitude [AB] from observed (dereddened) magnitudes,
    K-corrected with the SEDs of ``n_draws`` posterior draws per galaxy (median K).

    theta (m, n, 12) posterior draws; z (m,); mag_obs (m, 5) ugriz. K_b(z) = m_b(z) - m_b(z0) -
    [DM(z) - DM(z0)] with z0 = 0.001 (rest frame)."""
    from sedflow_jax.sed import cosmology

    m = theta.shape[0]
    k = min(n_draws, theta.shape[1])
    th = theta[:, :k]
    good = np.isfinite(th).all(-1)
    fill = np.array([10.0, 1, 0, 0, 0, 0, 1.0, 1e-3, 1e-3, 0, 0, 0])
    th = np.where(good[..., None], th, fill)
    zz = np.broadcast_to(np.asarray(z, float)[:, None], (m, k))
    z0 = 1e-3
    f_z = np.asarray(model.photometry(th, zz), float)
    f_0 = np.asarray(model.photometry(th, np.full((m, k), z0)), float)
    dm = lambda zv: 5 * np.log10(np.asarray(cosmology.lum_dist_mpc(np.asarray(zv, np.float32)),
                                            float) * 1e5)
    dmz = dm(z)
    kcorr = -2.5 * np.log10(f_z / f_0) - (dmz - dm(z0))[:, None, None]
    kcorr = np.where(good[..., None], kcorr, np.nan)
    kmed = np.nanmedian(kcorr, axis=1)  # (m, 5)
    gi = (mag_obs[:, 1] - mag_obs[:, 3]) - (kmed[:, 1] - kmed[:, 3])
    abs_i = mag_obs[:, 3] - dmz - kmed[:, 3]
    return gi, abs_i


def taylor2011_logmass(gi_rest, abs_i):
    """Taylor et al. (2011, MNRAS 418, 1587) eq. 8: log M*/Msun = 1.15 + 0.70 (g-i) - 0.4 M_i
    (Chabrier IMF), converted to the Kroupa IMF of the shipped BC03 grid (+0.034 dex)."""
    return 1.15 + 0.70 * gi_rest - 0.4 * abs_i + CHABRIER_TO_KROUPA_DEX


def speagle2014_sfs(logm, z=0.1):
    """Speagle et al. (2014) star-forming sequence (Kroupa IMF): log SFR at log M*, redshift z."""
    from sedflow_jax.sed import cosmology

    t = float(cosmology.age_gyr(np.float32(z)))
    return (0.84 - 0.026 * t) * logm - (6.51 - 0.11 * t)


def prior_ssfr_quantiles(model, prior=None, z=0.1, n=20_000, seed=0, q=(16, 50, 84)):
    """Quantiles of the PROVABGS prior's log specific SFR (per surviving mass, [1/yr]) at redshift
    ``z``, over 100 Myr and over 1 Gyr: {'100myr': (3,), '1gyr': (3,)}. The prior's sSFR does not
    depend on M*, so its band in the SFR-M* plane is log SFR = log M* + these values."""
    import jax

    from sedflow_jax.sim import prior as P

    prior = P.provabgs_prior() if prior is None else prior
    th = np.asarray(P.sample(jax.random.key(seed), prior, n))
    d = model.derived(th, np.full(n, z))
    lm = np.asarray(d.logmstar_surviving, float)
    with np.errstate(divide="ignore"):
        return {k: np.percentile(np.log10(np.asarray(v, float)) - lm, q)
                for k, v in (("100myr", d.sfr_100myr), ("1gyr", d.sfr_1gyr))}


def plot_mass_sfr(table, logm_taylor, path, *, title="", colour=None, prior_ssfr=None):
    """Three panels: SEDflow log M* vs Taylor+11, and log SFR averaged over 100 Myr and over
    1 Gyr (SEDflow's catalog quantity) vs log M* (with the Speagle+14 sequence; points coloured by
    ``colour``, e.g. rest-frame g - i, if given; ``prior_ssfr`` from :func:`prior_ssfr_quantiles`
    adds the prior's 16-50-84 % band, so one sees where the data move galaxies off the prior).
    Returns (median offset, robust scatter) of the mass comparison."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    lm = np.asarray(table["logmstar_surviving_p50"], float)
    ok = np.isfinite(lm) & np.isfinite(logm_taylor)
    d = lm[ok] - logm_taylor[ok]
    off = float(np.median(d))
    scat = float(1.4826 * np.median(np.abs(d - off)))
    fig, ax = plt.subplots(1, 3, figsize=(13.5, 4.0))
    ax[0].scatter(logm_taylor[ok], lm[ok], s=2, c="k", alpha=0.3, lw=0, rasterized=True)
    lim = np.percentile(np.concatenate([lm[ok], logm_taylor[ok]]), [0.5, 99.5]) + [-0.2, 0.2]
    ax[0].plot(lim, lim, "C3-", lw=1, label="1:1")
    ax[0].set_xlim(lim)
    ax[0].set_ylim(lim)
    ax[0].set_xlabel(r"log $M_*$ [M$_\odot$], Taylor+11 $(g-i)$ M/L (Kroupa)")
    ax[0].set_ylabel(r"log $M_*$ [M$_\odot$], SEDflow posterior median")
    ax[0].set_title(f"offset {off:+.2f} dex, scatter {scat:.2f} dex (N={int(ok.sum())})",
                    fontsize=9)
    ax[0].legend(loc="upper left", fontsize=8)
    xs = np.linspace(8.5, 12, 50)
    for a, col, what, pk in ((ax[1], "log_sfr_100myr_p50", "100 Myr", "100myr"),
                             (ax[2], "log_sfr_1gyr_p50", "1 Gyr", "1gyr")):
        sfr = np.asarray(table[col], float)
        ok2 = np.isfinite(lm) & np.isfinite(sfr)
        if colour is None:
            a.scatter(lm[ok2], np.clip(sfr[ok2], -4, None), s=2, c="k", alpha=0.3, lw=0,
                      rasterized=True)
        else:
            c = np.asarray(colour, float)[ok2]
            sc = a.scatter(lm[ok2], np.clip(sfr[ok2], -4, None), s=2, c=c, cmap="coolwarm",
                           vmin=np.nanpercentile(c, 5), vmax=np.nanpercentile(c, 95), lw=0,
                           rasterized=True)
            if a is ax[2]:
                fig.colorbar(sc, ax=a, label="rest-frame g - i")
        a.plot(xs, speagle2014_sfs(xs), "C0-", label="Speagle+14 SFS (z=0.1)")
        if prior_ssfr is not None:
            q = prior_ssfr[pk]
            a.fill_between(xs, xs + q[0], xs + q[2], color="0.5", alpha=0.15, lw=0,
                           label="prior 16-84 % (z=0.1)")
            a.plot(xs, xs + q[1], color="0.4", ls="--", lw=1, label="prior median")
        a.set_xlim(8.5, 12)
        a.set_ylim(-4.2, 2)
        a.set_xlabel(r"log $M_*$ [M$_\odot$]")
        a.set_ylabel(f"log SFR({what}) " + r"[M$_\odot$/yr] (clipped at -4)")
        a.legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return off, scat


def calibration_on_mocks(post, n_mock: int = 300, n: int = 199, seed: int = 2024):
    """SBC p-values (10 bins) and log M* coverage / 68 % width on mock galaxies, without masks
    and with random band masks (p_drop 0.5 and 1). Returns a JSON-ready dict."""
    import jax

    import sedflow_jax as sj
    from sedflow_jax.io import catalog as C
    from sedflow_jax.io import mocks
    from sedflow_jax.sim import layout
    from sedflow_jax.eval import diagnostics as D
    from sedflow_jax.sbi import masks as M
    from sedflow_jax.sbi import inference as INF
    from sedflow_jax.sim import prior as P

    cat = sj.mock_catalog(seed, n_mock, model=sj.load_model(z_max=post.prior.zmax))
    ph = C.read_photometry(cat, post.bands)
    x = layout.to_conditioning(ph.flux, ph.sigma, ph.z)
    truth = np.asarray(P.to_sampling(np.column_stack(
        [np.asarray(cat[k], float) for k in P.PARAM_NAMES]).astype(np.float32)))
    out = {}
    for name, pd in (("no_mask", 0.0), ("random_masks_p0.5", 0.5), ("random_masks_p1", 1.0)):
        mask = M.random_band_mask(np.random.default_rng(7), n_mock, len(post.bands), pd, 2)
        s = post.sample_batched(jax.random.key(5), x, n, mask=mask if post.mask_aware else None)
        full = s.n_accepted == n
        r = D.sbc_uniformity(D.sbc_ranks(truth[full], s.s[full]), n, n_bins=10)
        p = np.minimum(r["chi2_pvalue"], r["ks_pvalue"])
        cov = {}
        for lev in (0.68, 0.95):
            lo, hi = np.nanpercentile(s.s[full, :, 0], [50 - 50 * lev, 50 + 50 * lev], axis=1)
            cov[str(lev)] = float(np.mean((truth[full, 0] > lo) & (truth[full, 0] < hi)))
        q = np.nanpercentile(s.s[full, :, 0], [16, 84], axis=1)
        out[name] = {"n": int(full.sum()), "sbc_p_per_param": np.round(p, 4).tolist(),
                     "logM_coverage": cov, "logM_mean_width68": float(np.mean(q[1] - q[0]))}
        if not post.mask_aware:
            break
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None,
                    help="a trained (mask-aware) SEDflow model folder, or a shipped model's name "
                         "(sdss_ugriz)")
    ap.add_argument("--catalog", default=str(CATALOG))
    ap.add_argument("--n-galaxies", default="200", help="number of galaxies, or 'all'")
    ap.add_argument("--n-samples", type=int, default=1000)
    ap.add_argument("--n-derived", type=int, default=100)
    ap.add_argument("--snr-floor", type=float, default=None)
    ap.add_argument("--noise-policy", default="auto", choices=["auto", "mask", "flag", "ood"])
    ap.add_argument("--train-rows", type=int, default=1_000_000)
    ap.add_argument("--max-epochs", type=int, default=130)
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calibration", type=int, default=0,
                    help="also run SBC / coverage on this many mock galaxies (with random masks)")
    ap.add_argument("--out", default="real_sdss_out")
    a = ap.parse_args(argv)

    import sedflow_jax as sj
    from sedflow_jax.sbi import masks as M
    from sedflow_jax.sbi import inference as INF

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if a.model is None:
        post, _ = train_masked_model(out / "work", train_rows=a.train_rows, seed=a.seed,
                                     max_epochs=a.max_epochs, n_blocks=a.blocks, hidden=a.hidden)
    else:
        post = load_model_or_default(a.model)
    t_model = time.perf_counter() - t0
    n_gal = None if a.n_galaxies == "all" else int(a.n_galaxies)
    cat = load_catalog(n_gal, a.seed, a.catalog)
    model = sj.load_model(filters=list(post.bands), z_max=post.prior.zmax)
    res = INF.infer_catalog(post, cat, key=a.seed, n_samples=a.n_samples, n_derived=a.n_derived,
                          model=model, snr_floor=a.snr_floor, noise_policy=a.noise_policy,
                          **READ_KW)
    rep = dict(res.report)
    rep["time_model_s"] = t_model
    table = res.table
    # figures
    from sedflow_jax.io import catalog as C
    from sedflow_jax.io import mocks
    from sedflow_jax.sim import layout

    ph = res.photometry
    x = layout.to_conditioning(ph.flux, ph.sigma, ph.z)
    if post.support is not None:
        M.plot_support(post.support, x, out / "support.png", mask=ph.mask | (ph.band_flag ==
                                                                             C.BAND_NOISE_OOS))
    fit = res.rows
    with np.errstate(all="ignore"):
        mag = 22.5 - 2.5 * np.log10(ph.flux[fit])
    gi, abs_i = rest_frame_gi(model, res.samples.theta, ph.z[fit], mag)
    lm_t = np.full(len(table), np.nan)
    lm_t[fit] = taylor2011_logmass(gi, abs_i)
    table["logmstar_taylor11"] = lm_t
    gi_all = np.full(len(table), np.nan)
    gi_all[fit] = gi
    table["gi_rest"] = gi_all
    table["abs_mag_i"] = np.full(len(table), np.nan)
    table["abs_mag_i"][fit] = abs_i
    pq = prior_ssfr_quantiles(model, post.prior)
    rep["prior_log_ssfr_16_50_84"] = {k: [float(v) for v in q] for k, q in pq.items()}
    off, scat = plot_mass_sfr(table, lm_t, out / "mass_sfr.png", colour=gi_all, prior_ssfr=pq,
                              title=f"{len(fit)} SDSS galaxies, 0.01 < z < 0.2, "
                                    f"{a.n_samples} samples each")
    rep["mass_vs_taylor11"] = {"median_offset_dex": off, "robust_scatter_dex": scat,
                               "imf": "Kroupa (Taylor+11 Chabrier + 0.034 dex)"}
    lm = np.asarray(table["logmstar_surviving_p50"], float)
    sfr = np.asarray(table["log_sfr_100myr_p50"], float)
    sel = np.isfinite(lm) & np.isfinite(sfr) & (lm > 9.5) & (lm < 11)
    if sel.sum() > 10:  # slope of SFR vs M* for galaxies within 1 dex of the Speagle sequence
        sf = sel & (np.abs(sfr - speagle2014_sfs(lm)) < 1.0)
        if sf.sum() > 10:
            rep["sfs"] = {"n_within_1dex_of_speagle14": int(sf.sum()),
                          "fraction": float(sf.sum() / sel.sum()),
                          "slope": float(np.polyfit(lm[sf], sfr[sf], 1)[0])}
    for col, key in (("log_sfr_100myr_p50", "corr_ssfr_vs_gi_rest"),
                     ("log_sfr_1gyr_p50", "corr_ssfr_1gyr_vs_gi_rest")):
        ssfr = np.asarray(table[col], float) - lm
        gi_ok = np.isfinite(ssfr) & np.isfinite(gi_all)
        if gi_ok.sum() > 10:  # redder galaxies should get lower specific SFRs
            rep[key] = float(np.corrcoef(ssfr[gi_ok], gi_all[gi_ok])[0, 1])
    if a.calibration:
        rep["calibration_on_mocks"] = calibration_on_mocks(post, a.calibration)
    table.meta.pop("report", None)
    table.write(out / "posteriors.fits", overwrite=True)
    (out / "report.json").write_text(json.dumps(rep, indent=2, default=float))
    print(f"{rep['n_rows']} rows: fit {rep['n_rows_fit']} ({rep['n_rows_fit_with_masked_bands']} "
          f"with masked bands), not fit {rep['n_rows_not_fit']}; acceptance mean "
          f"{rep['acceptance_mean']:.3f}; sampling {rep['time_sample_s']:.1f} s "
          f"({rep['galaxies_per_s_sampling']:.2f} galaxies/s at {a.n_samples} samples); "
          f"M* - Taylor+11: {off:+.2f} dex (scatter {scat:.2f}) -> {out}")
    return table, rep


if __name__ == "__main__":
    main()
