"""Posteriors for whole real catalogs: band masks, training-support checks, row flags and
counts, then amortized draws and summaries."""
from __future__ import annotations

import time
from typing import NamedTuple

import jax
import numpy as np

from ..io import catalog as C
from ..sed.model import load_model
from ..sim.layout import to_conditioning
from .masks import support_fractions
from .summary import summarize

__all__ = ["CatalogInference", "NOISE_POLICIES", "scatter_rows", "noise_ood_rows",
           "prepare_catalog", "infer_catalog"]


class CatalogInference(NamedTuple):
    """What :func:`infer_catalog` returns.

    table : astropy Table, one row per catalog row (NaN summaries for rows not fit), with
        ``flag`` (row bits, :mod:`sedflow_jax.catalog`), ``band_flag_<band>`` (band bits),
        ``n_bands_used``, ``fit`` (bool);
    samples : :class:`sedflow_jax.posterior.Samples` of the fitted rows (``rows`` index them);
    rows : (m,) indices of the fitted rows; photometry : the reader's
        :class:`sedflow_jax.catalog.Photometry` (mask updated by the support check);
    report : JSON-ready dict of counts, support fractions, timings and acceptance.
    """

    table: object
    samples: object
    rows: np.ndarray
    photometry: object
    report: dict


#: what to do with a band outside the training support (see :func:`infer_catalog`)
NOISE_POLICIES = ("auto", "mask", "flag", "ood")


def scatter_rows(table, rows, n: int):
    """An astropy Table of ``n`` rows with ``table``'s rows placed at indices ``rows`` (a bool
    (n,) selection or indices) and the others empty: NaN floats, 0 integers, False booleans."""
    from astropy.table import Table

    full = Table()
    for col in table.colnames:
        v = np.asarray(table[col])
        arr = np.full((n,) + v.shape[1:], np.nan if v.dtype.kind == "f" else 0,
                      dtype=v.dtype if v.dtype.kind != "b" else bool)
        arr[rows] = v
        full[col] = arr
    return full


def noise_ood_rows(photometry) -> np.ndarray:
    """(n,) True for rows fit with a band outside the training support (policy 'ood')."""
    return (((photometry.band_flag & C.BAND_NOISE_OOS) > 0) & photometry.mask).any(1)


def prepare_catalog(posterior, catalog, *, snr_floor=None, noise_policy: str = "auto",
                    min_bands=None, **read_kw):
    """Read a catalog for ``posterior``: band masks, support checks, row flags (no sampling).

    Arguments as :func:`infer_catalog`. Returns ``(photometry, x, use, report)``: the
    :class:`~sedflow_jax.catalog.Photometry` with ``mask`` / ``band_flag`` / ``flag`` updated by
    the support check, the conditioning x (n, 2 nb + 1) [mags, sigma_mags, z] (NaN where a
    band cannot be measured), ``use`` (n,) rows to fit (``flag == 0``), and a dict of counts.
    """
    if noise_policy not in NOISE_POLICIES:
        raise ValueError(f"noise_policy must be one of {NOISE_POLICIES}, got {noise_policy!r}")
    aware = posterior.mask_aware
    policy = ("mask" if aware else "ood") if noise_policy == "auto" else noise_policy
    if policy == "mask" and not aware:
        raise ValueError("noise_policy='mask' needs a mask-aware posterior "
                         "(train_posterior(..., band_dropout=p))")
    if min_bands is None:
        min_bands = int(posterior.meta.get("band_mask", {}).get("min_bands", len(posterior.bands)))
    ph = C.read_photometry(catalog, posterior.bands, z_range=(posterior.prior.zmin,
                                                               posterior.prior.zmax),
                           snr_floor=snr_floor, mask_bands=aware, min_bands=min_bands, **read_kw)
    x = to_conditioning(ph.flux, ph.sigma, ph.z)
    mask = ph.mask.copy()
    band_flag = ph.band_flag.copy()
    flag = ph.flag.copy()
    support = posterior.support
    report = {"n_rows": int(len(flag)), "reader_counts": dict(ph.counts),
              "band_counts": {b: dict(v) for b, v in ph.band_counts.items()},
              "noise_policy": policy, "mask_aware": bool(aware), "snr_floor": snr_floor}
    if support is not None:
        ins = support.band_inside(x)
        oos = mask & ~ins & (flag == 0)[:, None]
        report["support_fraction"] = support_fractions(support, x[flag == 0], mask[flag == 0])
        report["n_bands_out_of_support"] = {b: int(oos[:, i].sum())
                                            for i, b in enumerate(posterior.bands)}
        band_flag[oos] |= C.BAND_NOISE_OOS
        if policy == "mask":
            mask &= ~oos
            few = (flag == 0) & (mask.sum(1) < min_bands)
            flag[few] |= C.FLAG_TOO_FEW_BANDS
        elif policy == "flag":
            flag[oos.any(1)] |= C.FLAG_NOISE_OOS
        # policy 'ood': fit, with the row marked ood (see noise_ood_rows)
        report["n_rows_noise_out_of_support"] = int(oos.any(1).sum())
    use = flag == 0
    if not aware:
        # the plain flow needs every band: rows the reader masked are flagged
        flag[use & ~mask.all(1)] |= C.FLAG_TOO_FEW_BANDS
        use = flag == 0
    xs = x[use]
    # box check on the used entries (magnitudes beyond the training range, z)
    ood_box = posterior.out_of_support(xs, mask[use] if aware else None)
    report["n_rows_outside_training_range"] = int(ood_box.sum())
    if policy != "ood":  # 'ood': fit, sample_batched marks them ood
        flag[np.flatnonzero(use)[ood_box]] |= C.FLAG_NOISE_OOS
    use = flag == 0
    rows = np.flatnonzero(use)
    report["n_rows_fit"] = int(rows.size)
    report["n_rows_not_fit"] = int((~use).sum())
    report["n_rows_fit_with_masked_bands"] = int((~mask[use]).any(1).sum())
    report["n_masked_bands_in_fit_rows"] = {b: int((~mask[use, i]).sum())
                                            for i, b in enumerate(posterior.bands)}
    report["row_flag_counts"] = {name: int(np.sum(flag & bit > 0))
                                 for bit, name in C.FLAG_NAMES.items()}
    ph = ph._replace(mask=mask, band_flag=band_flag, flag=flag)
    return ph, x, use, report


def infer_catalog(posterior, catalog, *, key=0, n_samples: int = 1000, n_derived: int = 200,
                  model=None, snr_floor=None, noise_policy: str = "auto", min_bands=None,
                  max_rows: int = 65536, derived: bool = True, **read_kw) -> CatalogInference:
    """Posteriors for every usable row of a real catalog, with band masks and support checks.

    posterior : an :class:`~sedflow_jax.posterior.AmortizedPosterior` (mask-aware or not).
    catalog : astropy Table or path; ``read_kw`` go to :func:`sedflow_jax.catalog.read_photometry`
        (``vector_flux='MODELFLUX'``, ``vector_ivar=...``, ``extinction=...``, ``z_col='Z'``, ...).
    snr_floor : bands with flux * sqrt(ivar) below it are masked (mask-aware) or flag the row.
    noise_policy : what to do with a band whose (mag, sigma_mag) lies outside the training
        support: 'mask' (mask it; the row is flagged if fewer than ``min_bands`` remain),
        'flag' (flag the row ``FLAG_NOISE_OOS``, do not fit it), 'ood' (fit it, mark the row
        ``ood`` and the band ``BAND_NOISE_OOS``: an extrapolation, counted), 'auto' = 'mask'
        for mask-aware posteriors, else 'ood' (what ``infer`` always did with x outside the
        training range).
    Rows with a flag are not fit. Returns a :class:`CatalogInference`.
    """
    t0 = time.perf_counter()
    ph, x, use, report = prepare_catalog(posterior, catalog, snr_floor=snr_floor,
                                         noise_policy=noise_policy, min_bands=min_bands,
                                         **read_kw)
    aware = posterior.mask_aware
    mask, band_flag, flag = ph.mask, ph.band_flag, ph.flag
    rows = np.flatnonzero(use)
    t_read = time.perf_counter() - t0
    k = jax.random.key(key) if isinstance(key, (int, np.integer)) else key
    t1 = time.perf_counter()
    s = posterior.sample_batched(k, x[rows], n_samples, mask=mask[rows] if aware else None,
                                 max_rows=max_rows)
    t_sample = time.perf_counter() - t1
    if derived:
        if model is None:
            model = load_model(filters=list(posterior.bands), z_max=posterior.prior.zmax)
        summ = summarize(s, model=model, z=ph.z[rows], n_derived=n_derived)
    else:
        summ = summarize(s)
    t_total = time.perf_counter() - t0
    full = scatter_rows(summ, rows, len(flag))
    full["ood"] = np.asarray(full["ood"], bool) | (noise_ood_rows(ph) & use)
    full["fit"] = use
    full["flag"] = flag
    full["n_bands_used"] = mask.sum(1)
    for i, b in enumerate(posterior.bands):
        full[f"band_flag_{b}"] = band_flag[:, i]
    acc = np.asarray(s.acceptance, float)
    report.update({
        "n_samples": int(n_samples),
        "acceptance_mean": float(acc.mean()) if acc.size else float("nan"),
        "acceptance_median": float(np.median(acc)) if acc.size else float("nan"),
        "n_low_acceptance": int(np.sum(s.low_acceptance)),
        "time_read_s": t_read, "time_sample_s": t_sample, "time_total_s": t_total,
        "galaxies_per_s_sampling": float(rows.size / max(t_sample, 1e-9)),
    })
    full.meta["report"] = report
    return CatalogInference(full, s, rows, ph, report)
