"""Posteriors for real catalogs: band masks, training-support checks, row flags and counts,
then row-keyed amortized draws and summaries.

One path for every catalog: :func:`infer_rows` fits one block of catalog rows (read the
photometry through a :class:`~sedflow_jax.io.catalog.ColumnSpec` -> masks and support checks ->
:func:`~sedflow_jax.sbi.sampling.reject_to_box` keyed by global catalog row -> the one summary
:func:`~sedflow_jax.sbi.summary.summary_columns`). :func:`infer_catalog` runs it on a whole
table in memory (one block); :func:`sedflow_jax.sbi.streaming.infer_catalog_streaming` on
chunks read from disk. Row g's draws depend only on (key, g): both give the same values.
"""
from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np

from ..io import catalog as C
from ..sed.model import load_model
from ..sim.layout import to_conditioning
from ..util import as_key
from .importance import IS_COLUMNS, REFINE_COLUMNS, sample_exact_rows
from .masks import support_fractions
from .sampling import RowSampler, Samples, reject_to_box
from .summary import summary_columns

__all__ = ["CatalogInference", "RowsResult", "NOISE_POLICIES", "scatter_rows", "resolve_z_range",
           "noise_ood_rows", "prepare_catalog", "infer_rows", "exact_draws", "infer_catalog"]


class CatalogInference(NamedTuple):
    """What :func:`infer_catalog` returns.

    table : astropy Table, one row per catalog row (the ``keep`` columns, ``row``, summaries --
        NaN for rows not fit --, ``acceptance``, ``n_accepted``, ``low_acceptance``, ``ood``,
        ``fit`` (bool), ``flag`` (row bits, :mod:`sedflow_jax.io.catalog`), ``n_bands_used``,
        ``band_flag_<band>`` (band bits));
    samples : :class:`~sedflow_jax.sbi.sampling.Samples` of the fitted rows (``rows`` index them);
    rows : (m,) indices of the fitted rows; photometry : the reader's
        :class:`~sedflow_jax.io.catalog.Photometry` (mask updated by the support check);
    report : JSON-ready dict of counts, support fractions, timings and acceptance.
    """

    table: object
    samples: object
    rows: np.ndarray
    photometry: object
    report: dict


class RowsResult(NamedTuple):
    """What :func:`infer_rows` returns for a block of m catalog rows: ``columns`` (name -> (m,)
    array, in output order), ``samples`` of the fitted rows, ``fit`` (m,) bool, the
    ``photometry`` and the ``report`` of :func:`prepare_catalog`."""

    columns: dict
    samples: object
    fit: np.ndarray
    photometry: object
    report: dict


#: what to do with a band outside the training support (see :func:`infer_catalog`)
NOISE_POLICIES = ("auto", "mask", "flag", "ood")

#: values of the rows not fit, where NaN / 0 / False is not the right "nothing"
_NOT_FIT = {"acceptance": 0.0, **IS_COLUMNS, **REFINE_COLUMNS}


def scatter_rows(table, rows, n: int):
    """An astropy Table of ``n`` rows with ``table``'s rows placed at indices ``rows`` (a bool
    (n,) selection or indices) and the others empty: NaN floats, 0 integers, False booleans."""
    from astropy.table import Table

    return Table(_scatter({c: np.asarray(table[c]) for c in table.colnames}, rows, n))


def _scatter(cols: dict, rows, n: int) -> dict:
    out = {}
    for name, v in cols.items():
        v = np.asarray(v)
        fill = _NOT_FIT.get(name, np.nan if v.dtype.kind == "f" else 0)
        dtype = bool if v.dtype.kind == "b" else v.dtype
        if v.dtype.kind == "U":
            dtype = np.dtype(f"U{max(v.dtype.itemsize // 4, len(str(fill)))}")
        arr = np.full((n,) + v.shape[1:], fill, dtype=dtype)
        arr[rows] = v
        out[name] = arr
    return out


def noise_ood_rows(photometry) -> np.ndarray:
    """(n,) True for rows fit with a band outside the training support (policy 'ood')."""
    return (((photometry.band_flag & C.BAND_NOISE_OOS) > 0) & photometry.mask).any(1)


def _policy(posterior, noise_policy: str) -> str:
    if noise_policy not in NOISE_POLICIES:
        raise ValueError(f"noise_policy must be one of {NOISE_POLICIES}, got {noise_policy!r}")
    aware = posterior.mask_aware
    policy = ("mask" if aware else "ood") if noise_policy == "auto" else noise_policy
    if policy == "mask" and not aware:
        raise ValueError("noise_policy='mask' needs a mask-aware posterior "
                         "(train_posterior(..., band_dropout=p))")
    return policy


def resolve_z_range(posterior, z_range):
    """'prior' -> the posterior's prior redshift range (lo, hi]; None (no cut) or (lo, hi)."""
    if isinstance(z_range, str) and z_range == "prior":
        return (posterior.prior.zmin, posterior.prior.zmax)
    return None if z_range is None else tuple(float(v) for v in z_range)


def prepare_catalog(posterior, catalog, spec=None, *, noise_policy: str = "auto",
                    min_bands=None, z_range="prior", **read_kw):
    """Read a catalog for ``posterior``: band masks, support checks, row flags (no sampling).

    spec : a :class:`~sedflow_jax.io.catalog.ColumnSpec`; ``read_kw`` override its fields
    (``snr_floor=``, ``flux_fmt=``, ``vector_flux=``, ``extinction=``, ...). Other arguments as
    :func:`infer_catalog`. Returns ``(photometry, x, use, report)``: the
    :class:`~sedflow_jax.io.catalog.Photometry` with ``mask`` / ``band_flag`` / ``flag`` updated by
    the support check, the conditioning x (n, 2 nb + 1) [mags, sigma_mags, z] (NaN where a
    band cannot be measured), ``use`` (n,) rows to fit (``flag == 0``), and a dict of counts.
    """
    spec = C.ColumnSpec.make(spec, **read_kw)
    policy = _policy(posterior, noise_policy)
    aware = posterior.mask_aware
    if min_bands is None:
        min_bands = int(posterior.meta.get("band_mask", {}).get("min_bands", len(posterior.bands)))
    ph = C.read_photometry(catalog, posterior.bands, spec, z_range=resolve_z_range(posterior, z_range),
                           mask_bands=aware, min_bands=min_bands)
    x = to_conditioning(ph.flux, ph.sigma, ph.z)
    report = {"n_rows": int(len(ph.flag)), "reader_counts": dict(ph.counts),
              "band_counts": {b: dict(v) for b, v in ph.band_counts.items()},
              "noise_policy": policy, "mask_aware": bool(aware), "snr_floor": spec.snr_floor,
              "calibration_error_mag": dict(zip(posterior.bands, C.calibration_error_mag(
                  posterior.bands, spec.calibration_error).tolist()))}
    mask, band_flag, flag = _support_check(posterior, x, ph, policy, min_bands, report)
    use = flag == 0
    if not aware:
        # the plain flow needs every band: rows the reader masked are flagged
        flag[use & ~mask.all(1)] |= C.FLAG_TOO_FEW_BANDS
        use = flag == 0
    # box check on the used entries (magnitudes beyond the training range, z)
    ood_box = posterior.out_of_support(x[use], mask[use] if aware else None)
    report["n_rows_outside_training_range"] = int(ood_box.sum())
    if policy != "ood":  # 'ood': fit, the sampler marks them ood
        flag[np.flatnonzero(use)[ood_box]] |= C.FLAG_NOISE_OOS
    use = flag == 0
    report.update(_fit_counts(posterior, mask, flag, use))
    return ph._replace(mask=mask, band_flag=band_flag, flag=flag), x, use, report


def _support_check(posterior, x, ph, policy, min_bands, report):
    """(mask, band_flag, flag) after the training-support check of every used band."""
    mask, band_flag, flag = ph.mask.copy(), ph.band_flag.copy(), ph.flag.copy()
    support = posterior.support
    if support is None:
        return mask, band_flag, flag
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
    return mask, band_flag, flag


def _fit_counts(posterior, mask, flag, use) -> dict:
    return {
        "n_rows_fit": int(use.sum()), "n_rows_not_fit": int((~use).sum()),
        "n_rows_fit_with_masked_bands": int((~mask[use]).any(1).sum()),
        "n_masked_bands_in_fit_rows": {b: int((~mask[use, i]).sum())
                                       for i, b in enumerate(posterior.bands)},
        "row_flag_counts": {name: int(np.sum(flag & bit > 0))
                            for bit, name in C.FLAG_NAMES.items()},
    }


def infer_rows(posterior, table, rows, *, sampler: RowSampler, key, spec=None,
               max_rounds: int = 20, model=None, n_derived: int = 500,
               noise_policy: str = "auto", min_bands=None, z_range="prior",
               max_draws: int = 65536, exact=None) -> RowsResult:
    """Fit one block of catalog rows: the one inference step of every catalog path.

    table : astropy Table of the block (the columns ``spec`` names); rows : (m,) their global
    catalog row indices (the draws' keys); sampler : a :class:`RowSampler` of the posterior's
    flow (n draws per galaxy); key : a typed ``jax.random`` key; model / n_derived : derived
    property summaries (None: none); max_draws : galaxies x draws per derived-property group.
    Output columns, in order: ``spec.keep``, ``row``, :func:`summary_columns` (``ood`` also set
    for rows outside the redshift range or the training support), ``fit``, ``flag``,
    ``n_bands_used``, ``band_flag_<band>``; rows not fit hold NaN / 0 / False.
    """
    spec = C.ColumnSpec() if spec is None else spec
    rows = np.asarray(rows, np.int64)
    t0 = time.perf_counter()
    ph, x, use, report = prepare_catalog(posterior, table, spec, noise_policy=noise_policy,
                                         min_bands=min_bands, z_range=z_range)
    t1 = time.perf_counter()
    if exact is None:
        smp = reject_to_box(posterior, sampler, key, x[use], rows[use], sampler.n,
                            int(max_rounds), mask=ph.mask[use] if posterior.mask_aware else None)
        is_cols = {}
    else:
        smp, is_cols = exact_draws(posterior, key, exact, ph, use, rows, sampler.n)
    t2 = time.perf_counter()
    summ = summary_columns(smp, model=model, z=ph.z[use], n_derived=n_derived,
                           max_draws=max_draws)
    summ.update(is_cols)
    cols = {name: np.asarray(table[name]) for name in spec.keep}
    cols["row"] = rows
    cols.update(_scatter(summ, use, len(rows)))
    cols["ood"] |= ((ph.flag & (C.FLAG_Z_RANGE | C.FLAG_NOISE_OOS)) > 0) | \
        (noise_ood_rows(ph) & use)
    cols["fit"] = use
    cols["flag"] = ph.flag.astype(np.int64)
    cols["n_bands_used"] = ph.mask.sum(1).astype(np.int64)
    for i, b in enumerate(posterior.bands):
        cols[f"band_flag_{b}"] = ph.band_flag[:, i].astype(np.int64)
    report.update(time_read_s=t1 - t0, time_sample_s=t2 - t1,
                  time_summary_s=time.perf_counter() - t2)
    return RowsResult(cols, smp, use, ph, report)


def exact_draws(posterior, key, exact, ph, use, rows, n: int):
    """Importance-sampled draws of the used rows -> (:class:`Samples`, ``is_*`` columns).
    Resampled draws lie inside the prior box: acceptance 1 where the galaxy was fitted."""
    idx = np.flatnonzero(use)
    if idx.size == 0:
        empty = {k: np.zeros(0, "U64" if isinstance(v, str) else np.asarray(v).dtype)
                 for k, v in {**IS_COLUMNS,
                              **(REFINE_COLUMNS if exact.refine is not None else {})}.items()}
        return Samples(np.zeros((0, n, 12), np.float32), np.zeros((0, n, 11), np.float32),
                       np.zeros(0), np.zeros(0, np.int64), np.zeros(0, bool),
                       np.zeros(0, bool)), empty
    theta, s, ood, cols = sample_exact_rows(
        posterior, key, exact, ph.flux[idx], ph.sigma[idx], ph.z[idx], ph.mask[idx], rows[idx],
        n)
    n_ok = np.isfinite(s).all(-1).sum(1).astype(np.int64)
    smp = Samples(theta, s, (n_ok > 0).astype(np.float64), n_ok, np.zeros(idx.size, bool), ood)
    return smp, cols


def infer_catalog(posterior, catalog, spec=None, *, key=0, n_samples: int = 1000,
                  n_derived: int = 200, model=None, noise_policy: str = "auto", min_bands=None,
                  max_rows: int = 65536, max_rounds: int = 20, derived: bool = True,
                  z_range="prior", mesh=None, exact=None, **read_kw) -> CatalogInference:
    """Posteriors for every usable row of a real catalog, with band masks and support checks:
    :func:`infer_rows` on the whole table (one block, in memory).

    posterior : an :class:`~sedflow_jax.sbi.posterior.AmortizedPosterior` (mask-aware or not).
    catalog : astropy Table or path. spec : a :class:`~sedflow_jax.io.catalog.ColumnSpec` (where
        the fluxes, redshift, extinction and kept columns are); ``read_kw`` override its fields
        (``vector_flux='MODELFLUX'``, ``vector_ivar=...``, ``extinction=...``, ``z_col='Z'``,
        ``snr_floor=...``, ``keep=('objid',)``, ...).
    snr_floor (a spec field) : bands with flux * sqrt(ivar) below it are masked (mask-aware) or
        flag the row.
    noise_policy : what to do with a band whose (mag, sigma_mag) lies outside the training
        support: 'mask' (mask it; the row is flagged if fewer than ``min_bands`` remain),
        'flag' (flag the row ``FLAG_NOISE_OOS``, do not fit it), 'ood' (fit it, mark the row
        ``ood`` and the band ``BAND_NOISE_OOS``: an extrapolation, counted), 'auto' = 'mask'
        for mask-aware posteriors, else 'ood'.
    key : int seed or ``jax.random`` key; row g's draws depend only on (key, g).
    max_rows : galaxies x draws per compiled sampling call (and derived-property group).
    derived / model / n_derived : derived-property summaries (``model`` default: loaded for the
        posterior's bands). z_range : 'prior' (default), (lo, hi] or None.
    exact : None or :class:`~sedflow_jax.sbi.importance.ExactOptions` (importance-sampled exact
        posteriors, ``is_*`` columns; see :func:`infer_rows`).
    Rows with a flag are not fit. Returns a :class:`CatalogInference`.
    """
    from astropy.table import Table

    t0 = time.perf_counter()
    spec = C.ColumnSpec.make(spec, **read_kw)
    table = C.read_table(catalog)
    spec.check(table.colnames, posterior.bands)
    if derived and model is None:
        model = load_model(filters=list(posterior.bands), z_max=posterior.prior.zmax)
    sampler = RowSampler(posterior.flow, int(n_samples), mesh=mesh, max_rows=max_rows)
    res = infer_rows(posterior, table, np.arange(len(table)), sampler=sampler, key=as_key(key),
                     spec=spec, max_rounds=max_rounds, model=model if derived else None,
                     n_derived=n_derived, noise_policy=noise_policy, min_bands=min_bands,
                     z_range=z_range, max_draws=max_rows, exact=exact)
    full = Table(res.columns)
    report = dict(res.report)
    acc = np.asarray(res.samples.acceptance, float)
    n_fit = int(res.fit.sum())
    report.update({
        "n_samples": int(n_samples),
        "acceptance_mean": float(acc.mean()) if acc.size else float("nan"),
        "acceptance_median": float(np.median(acc)) if acc.size else float("nan"),
        "n_low_acceptance": int(np.sum(res.samples.low_acceptance)),
        "time_total_s": time.perf_counter() - t0,
        "galaxies_per_s_sampling": float(n_fit / max(report["time_sample_s"], 1e-9)),
    })
    if exact is not None:
        report["exact"] = {**exact.config(), "n_flagged": int(np.sum(full["is_flag"][res.fit])),
                           "median_efficiency": float(np.nanmedian(full["is_efficiency"]))
                           if n_fit else float("nan")}
    full.meta["report"] = report
    return CatalogInference(full, res.samples, np.flatnonzero(res.fit), res.photometry, report)
