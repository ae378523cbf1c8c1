"""MCMC over a catalog: galaxies fit one by one (a failure never stops the loop), each written
to ``galaxy_<row>.npz`` (and ArviZ ``.nc``) with a summary table rewritten after every galaxy,
resumable. Steps: read the catalog, fit one row, persist it, loop."""
from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import jax
import numpy as np
from astropy.table import Table

from ..io import catalog as C
from ..sed.model import load_model
from ..util import as_key, atomic_output, atomic_write_json, jsonable
from .galaxy import galaxy_data
from .results import MCMCResult, result_arrays, write_npz
from .runners import SAMPLERS, run_aies, run_ess, run_nuts

__all__ = ["run_mcmc_catalog", "summary_table"]

_RUNNERS = {"nuts": run_nuts, "ess": run_ess, "aies": run_aies}


def _catalog_arrays(catalog, bands, flux_fmt, ivar_fmt, z_col, id_col, calibration_error=None):
    """-> flux (n, b), sigma (n, b), z (n,), ids (n,) or None; NaN kept (masked per galaxy);
    sigma with ``calibration_error`` added in quadrature (tables and arrays alike)."""
    if isinstance(catalog, (tuple, list)) and len(catalog) == 3:
        flux, sigma, z = (np.asarray(a, np.float64) for a in catalog)
        flux, sigma, z, ids = np.atleast_2d(flux), np.atleast_2d(sigma), np.atleast_1d(z), None
    elif isinstance(catalog, dict):
        flux = np.atleast_2d(np.asarray(catalog["flux"], np.float64))
        if "sigma" in catalog:
            sigma = np.atleast_2d(np.asarray(catalog["sigma"], np.float64))
        elif "ivar" in catalog:
            iv = np.atleast_2d(np.asarray(catalog["ivar"], np.float64))
            with np.errstate(divide="ignore", invalid="ignore"):
                sigma = np.where(iv > 0, 1.0 / np.sqrt(np.where(iv > 0, iv, 1.0)), np.nan)
        else:
            raise ValueError("an array catalog needs 'flux' and 'sigma' (or 'ivar')")
        ids = catalog.get("id")
        z = np.atleast_1d(np.asarray(catalog["z"], np.float64))
    else:
        t = C.read_table(catalog)
        ph = C.read_photometry(t, bands, flux_fmt=flux_fmt, ivar_fmt=ivar_fmt, z_col=z_col,
                               calibration_error=calibration_error)
        ids = np.asarray(t[id_col]) if id_col is not None and id_col in t.colnames else None
        return ph.flux, ph.sigma, ph.z, ids
    cal = C.calibration_error_mag(bands, calibration_error)
    if cal.any() and flux.shape[-1] == len(bands):
        sigma = C.add_calibration_error(flux, sigma, cal)
    return flux, sigma, z, ids


def _row_fixed(fixed, row, catalog):
    if not fixed:
        return None
    out = {}
    for k, v in fixed.items():
        if isinstance(v, str):  # a column of the catalog
            v = np.asarray(catalog[v], np.float64)
        v = np.asarray(v, np.float64)
        out[k] = float(v) if v.ndim == 0 else float(v[row])
    return out


def _default_z_max(catalog, z_col):
    if isinstance(catalog, (tuple, list)):
        z = np.asarray(catalog[2], np.float64)
    elif isinstance(catalog, dict):
        z = np.asarray(catalog["z"], np.float64)
    else:
        z = np.asarray(C.read_table(catalog)[z_col], np.float64)
    z = z[np.isfinite(z)]
    return float(min(1.0, max(0.2, z.max() if z.size else 0.2)))


def summary_table(rows_out) -> Table:
    """An astropy Table of per-galaxy summary dicts (missing values: '', False or NaN)."""
    keys = []
    for r in rows_out:
        for k in r:
            if k not in keys:
                keys.append(k)
    cols = {}
    for k in keys:
        vals = [r.get(k) for r in rows_out]
        if all(isinstance(v, str) or v is None for v in vals):
            cols[k] = [("" if v is None else v) for v in vals]
        elif all(isinstance(v, (bool, np.bool_)) or v is None for v in vals):
            cols[k] = [bool(v) if v is not None else False for v in vals]
        else:
            cols[k] = [float("nan") if v is None or isinstance(v, str) else float(v) for v in vals]
    t = Table(cols, names=keys) if keys else Table()
    for k in ("row",):
        if k in t.colnames:
            t[k] = np.asarray(t[k], int)
    return t


def _write_summary(out_dir: Path, rows_out) -> Table:
    t = summary_table(rows_out)
    with atomic_output(out_dir / "summary.ecsv") as (tmp,):
        t.write(tmp, format="ascii.ecsv", overwrite=True)
    atomic_write_json(out_dir / "summary.json", rows_out)
    return t


# ---------------------------------------------------------------------------------------------
# one row
# ---------------------------------------------------------------------------------------------
class _Job(NamedTuple):
    """What every row of a catalog run shares."""

    runner: Callable
    key: Any
    model: Any
    catalog: Any
    flux: np.ndarray
    sigma: np.ndarray
    z: np.ndarray
    ids: Optional[np.ndarray]
    mask: Optional[np.ndarray]
    fixed: Optional[dict]
    init: Any
    init_samples: Any
    run_kw: dict

    @property
    def n(self) -> int:
        return self.flux.shape[0]


def _row_init(job: _Job, row: int, j: int):
    """The starting points of row ``row`` (the ``j``-th requested)."""
    s = job.init_samples
    if s is None:
        return job.init
    if callable(s):
        return s(row)
    if isinstance(s, dict):
        return s.get(row, job.init)
    return np.asarray(s)[j]


def _fit_row(job: _Job, row: int, j: int) -> tuple:
    """Fit one row -> (its summary fields, the result). Raises on any failure."""
    if not (0 <= row < job.n):
        raise IndexError(f"row {row} out of range (catalog has {job.n} rows)")
    t0 = time.perf_counter()
    mask = None if job.mask is None else job.mask[row]
    res = job.runner(jax.random.fold_in(job.key, row), job.model, job.flux[row], job.sigma[row],
                     job.z[row], mask=mask, fixed=_row_fixed(job.fixed, row, job.catalog),
                     init=_row_init(job, row, j), **job.run_kw)
    if not np.all(np.isfinite(res.samples)):
        raise FloatingPointError("non-finite samples")
    s = res.summary()
    ok = galaxy_data(job.flux[row], job.sigma[row], job.z[row], mask=mask)["ok"]
    rec = dict(status="ok", error="", z=float(job.z[row]), n_bands=int(np.sum(np.asarray(ok))),
               time_s=time.perf_counter() - t0)
    rec.update({k: v for k, v in s.items() if k not in ("sampler",)})
    return rec, res


def _persist(res: MCMCResult, rec: dict, npz: Path, netcdf: bool) -> None:
    """Write the result and its summary row to ``npz`` (and ArviZ ``.nc`` when ``netcdf``)."""
    arrays = result_arrays(res)
    arrays["summary_json"] = np.asarray(json.dumps(jsonable(rec)))
    write_npz(npz, arrays)
    if netcdf:
        try:
            res.to_netcdf(npz.with_suffix(".nc"))
        except Exception as exc:  # netCDF is a convenience: report, go on
            rec["error"] = f"netcdf: {exc}"


def _resumed(npz: Optional[Path]) -> Optional[dict]:
    """The summary row saved with a finished galaxy, or None (absent, corrupt, old file)."""
    if npz is None or not npz.exists():
        return None
    try:
        with np.load(npz, allow_pickle=False) as f:
            return json.loads(str(f["summary_json"]))
    except Exception:  # corrupt / old file: refit
        return None


def _run_row(job: _Job, row: int, j: int, out: Optional[Path], netcdf: bool, resume: bool):
    """-> (summary row, result or None) of one row; failures become a 'failed' row."""
    rec = dict(row=row)
    if job.ids is not None:
        rec["id"] = str(job.ids[row].item() if hasattr(job.ids[row], "item") else job.ids[row])
    npz = out / f"galaxy_{row:06d}.npz" if out is not None else None
    prev = _resumed(npz) if resume else None
    if prev is not None:
        return prev, None
    t0 = time.perf_counter()
    try:
        fields, res = _fit_row(job, row, j)
        rec.update(fields)
        if npz is not None:
            _persist(res, rec, npz, netcdf)
        return rec, res
    except Exception as exc:  # noqa: BLE001 - one bad galaxy must not stop a catalog
        rec.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                   z=float(job.z[row]) if 0 <= row < job.n else float("nan"),
                   time_s=time.perf_counter() - t0, converged=False)
        return rec, None


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
def _select_rows(rows, n: int) -> np.ndarray:
    if rows is None:
        return np.arange(n)
    if isinstance(rows, (int, np.integer)):
        return np.arange(min(int(rows), n))
    return np.asarray(rows, int).ravel()


def _have_arviz() -> bool:
    return importlib.util.find_spec("arviz") is not None


def _with_progress(rows, sampler: str, progress: bool):
    if progress:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover
            return rows
        return tqdm(rows, desc=f"MCMC ({sampler})")
    return rows


def _make_job(catalog, sampler, model, key, mask, fixed, init, init_samples, read_kw,
              run_kw) -> _Job:
    """Read the catalog's photometry for the model's bands and gather what every row shares."""
    if model is None:
        model = load_model(z_max=_default_z_max(catalog, read_kw["z_col"]))
    bands = tuple(model.filter_names)
    flux, sigma, z, ids = _catalog_arrays(catalog, bands, **read_kw)
    n = flux.shape[0]
    if flux.shape[1] != len(bands) or sigma.shape != flux.shape or z.shape != (n,):
        raise ValueError(f"catalog arrays must be flux/sigma (n, {len(bands)}), z (n,); got "
                         f"{flux.shape}, {sigma.shape}, {z.shape}")
    if mask is not None:
        mask = np.asarray(mask, bool)
        mask = np.broadcast_to(mask, (n, len(bands))) if mask.ndim == 1 else mask
    return _Job(_RUNNERS[sampler], as_key(key), model, catalog, flux, sigma, z, ids, mask, fixed,
                init, init_samples, run_kw)


def run_mcmc_catalog(catalog, rows=None, sampler: str = "nuts", out_dir=None, *, model=None,
                     key=0, prior=None, gamma_density: str = "loguniform", init="optimize",
                     init_samples=None, mask=None, fixed: Optional[dict] = None,
                     flux_fmt: str = "flux_{band}",
                     ivar_fmt: str = "flux_ivar_{band}", z_col: str = "z",
                     id_col: Optional[str] = None, calibration_error=None,
                     netcdf: bool = True, resume: bool = True,
                     progress: bool = True, return_results: bool = False, **run_kw):
    """Fit galaxies of a catalog one by one with ``sampler``; a failure never stops the loop.

    catalog : astropy Table or a path (columns ``flux_<band>``, ``flux_ivar_<band>`` in
        nanomaggies for each of ``model.filter_names`` and ``z``; formats via ``flux_fmt``,
        ``ivar_fmt``, ``z_col``), or plain arrays: ``(flux (n,b), sigma (n,b), z (n,))`` or a
        dict with 'flux', 'sigma' or 'ivar', 'z' (and optional 'id').
    rows : None (all), an int n (the first n) or a sequence of row indices.
    sampler : 'nuts' | 'ess' | 'aies'. out_dir : where to write ``galaxy_<row>.npz`` (samples,
        theta, log density, diagnostics; :func:`load_result` reads it), ``galaxy_<row>.nc``
        (ArviZ, if installed and ``netcdf``), and ``summary.ecsv`` + ``summary.json`` (rewritten
        after every galaxy). None: nothing written.
    model : SEDModel (default ``load_model(z_max=max(0.2, max z))``); key : int seed / PRNG key
        (galaxy i uses ``fold_in(key, row)``); prior, gamma_density : see :func:`galaxy_target`.
    init : 'optimize' | 'prior' | array; ``init_samples``: per-galaxy starting draws (e.g. the
        flow's posterior samples), an array (len(rows), m, 11), a dict row -> (m, 11), or a
        callable row -> (m, 11); when given it overrides ``init`` for those galaxies.
    calibration_error : a calibration error [mag] added to the catalog's sigma in quadrature,
        tables and arrays alike (:func:`sedflow_jax.io.catalog.calibration_error_mag`; None:
        sigma as given, ``'auto'``: SDSS / GALEX calibration).
    mask : (n_b,) or (n, n_b) bool band mask (False = leave out). Non-finite flux / ivar and
        ivar <= 0 are masked automatically; a galaxy with no usable band or a bad z fails.
    fixed : {sampling-coordinate name: value, or an (n,) array / column name per row} of
        coordinates held fixed (e.g. known from elsewhere; see :func:`condition`).
    resume : skip galaxies whose ``.npz`` exists in ``out_dir`` (their summary row is re-read).
    run_kw : passed to the runner (num_chains, num_warmup, num_samples, dense_mass, ...).

    Returns the summary astropy Table (one row per requested galaxy: ``row``, ``id``,
    ``status`` 'ok' | 'failed', ``error``, ``n_bands``, ``z``, ``time_s``, ``converged``,
    ``rhat_max``, ``ess_bulk_min``, ``ess_tail_min``, ``num_divergences``, per-coordinate
    ``rhat_*`` / ``ess_bulk_*`` / ``ess_tail_*``, and ``<param>_p16/p50/p84`` for the 11
    sampling coordinates and 12 parameters); with ``return_results`` also a dict row -> result.
    """
    sampler = sampler.lower()
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if not isinstance(catalog, (tuple, list, dict)):
        catalog = C.read_table(catalog)
    read_kw = dict(flux_fmt=flux_fmt, ivar_fmt=ivar_fmt, z_col=z_col, id_col=id_col,
                   calibration_error=calibration_error)
    job = _make_job(catalog, sampler, model, key, mask, fixed, init, init_samples, read_kw,
                    dict(run_kw, prior=prior, gamma_density=gamma_density))
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    netcdf = bool(netcdf and out is not None and _have_arviz())
    summary_rows, results = [], {}
    rows = _select_rows(rows, job.n)
    for j, row in enumerate(_with_progress(rows, sampler, progress)):
        rec, res = _run_row(job, int(row), j, out, netcdf, resume)
        summary_rows.append(rec)
        if return_results and res is not None:
            results[int(row)] = res
        if out is not None:
            _write_summary(out, summary_rows)
    table = summary_table(summary_rows)
    table.meta.update(sampler=sampler, gamma_density=gamma_density,
                      bands=list(job.model.filter_names),
                      calibration_error=str(calibration_error),
                      n_ok=int(sum(r.get("status") == "ok" for r in summary_rows)),
                      n_failed=int(sum(r.get("status") == "failed" for r in summary_rows)))
    if out is not None:
        _write_summary(out, summary_rows)
    return (table, results) if return_results else table
