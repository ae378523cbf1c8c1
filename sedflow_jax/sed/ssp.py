"""Simple-stellar-population (SSP) grids: one validated type, loaders, interpolation weights.

The model is grid-agnostic: anything that can be expressed as an :class:`SSPGrid` works.

Loaders
-------
- :func:`load_ssp_grid` -- our compact ``.npz`` format (the shipped BC03/MILES default lives in
  ``ssp_templates/``; ``scripts``-made FSPS grids use the same format, see
  ``ssp_templates/build_fsps_grid.py``).
- :func:`load_dsps_hdf5` -- DSPS's HDF5 SSP format (``ssp_lgmet``, ``ssp_lg_age_gyr``, ``ssp_wave``,
  ``ssp_flux`` in L_sun/Hz per M_sun), e.g. DSPS's FSPS v3.2 MIST file. Units are converted to
  L_sun/Angstrom (L_lambda = L_nu c / lambda^2).

Interpolation (FSPS conventions, spec §5.2-5.3)
-----------------------------------------------
- age: linear in log10(age); ages below the first node put all weight on the first node, above the
  last node on the last node;
- metallicity: linear in logzsol with the bracketing index clamped to the first/last interval and
  the weight NOT clamped -> linear extrapolation outside the grid, as FSPS does.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from importlib import resources
from pathlib import Path

import jax.numpy as jnp
import numpy as np

#: Units every SSPGrid's ``spec`` is stored in.
SPEC_UNITS = "Lsun/Angstrom/Msun"

DEFAULT_GRID_NAME = "ssp_bc03_2016_miles_kroupa.npz"
#: L_sun in erg/s assumed by each known source (the grid's own convention).
from .units import C_ANGSTROM_S, LSUN_BC03_CGS, LSUN_DSPS_CGS  # noqa: F401 (re-exported)


class SSPGridError(ValueError):
    """An SSP grid failed validation (shape, axes, values or units)."""


@dataclasses.dataclass(frozen=True, eq=False)
class SSPGrid:
    """A rest-frame SSP grid, L_lambda per solar mass formed.

    Attributes
    ----------
    wave : (n_wave,) float64, rest-frame wavelength [Angstrom], strictly increasing.
    log_age_yr : (n_age,) float64, log10(SSP age / yr), strictly increasing, finite.
    logzsol : (n_met,) float64, log10(Z / zsol) of the metallicity nodes, strictly increasing.
    zsol : float, the solar metallicity the grid's ``logzsol`` refers to (0.02 BC03, 0.0142 MIST).
    spec : (n_met, n_age, n_wave) float32, L_lambda [L_sun / Angstrom] per M_sun formed; finite, >= 0.
    surviving_frac : (n_met, n_age) float64 or None, stellar mass remaining per M_sun formed.
    lsun_cgs : float, the grid's L_sun in erg/s (used to convert to physical fluxes).
    name : short label; provenance : free-text provenance (source, hashes, IMF, isochrones).
    units : must equal :data:`SPEC_UNITS`.
    """

    wave: np.ndarray
    log_age_yr: np.ndarray
    logzsol: np.ndarray
    zsol: float
    spec: np.ndarray
    surviving_frac: np.ndarray | None = None
    lsun_cgs: float = LSUN_BC03_CGS
    name: str = "custom"
    provenance: str = ""
    units: str = SPEC_UNITS

    def __post_init__(self):
        validate_grid(self)

    @property
    def shape(self):
        return self.spec.shape

    @property
    def Z(self):
        """Absolute metallicity of the nodes, zsol * 10**logzsol."""
        return self.zsol * 10.0 ** np.asarray(self.logzsol)

    def __repr__(self):
        n_met, n_age, n_wave = self.spec.shape
        return (
            f"SSPGrid(name={self.name!r}, n_met={n_met}, n_age={n_age}, n_wave={n_wave}, "
            f"wave={self.wave[0]:.0f}-{self.wave[-1]:.0f} A, "
            f"log_age_yr={self.log_age_yr[0]:.2f}-{self.log_age_yr[-1]:.2f}, "
            f"Z={self.Z[0]:.2g}-{self.Z[-1]:.2g} (zsol={self.zsol}))"
        )


def _strictly_increasing(a):
    return a.ndim == 1 and a.size >= 2 and bool(np.all(np.diff(a) > 0))


def validate_grid(g: SSPGrid) -> None:
    """Raise :class:`SSPGridError` naming the first problem found; return None if valid."""
    if g.units != SPEC_UNITS:
        raise SSPGridError(f"SSP grid units must be {SPEC_UNITS!r}, got {g.units!r}")
    for nm in ("wave", "log_age_yr", "logzsol"):
        a = np.asarray(getattr(g, nm))
        if not np.all(np.isfinite(a)):
            raise SSPGridError(f"SSP grid axis {nm!r} has non-finite values")
        if not _strictly_increasing(a):
            raise SSPGridError(
                f"SSP grid axis {nm!r} must be 1-D, strictly increasing, with >= 2 nodes "
                f"(got shape {a.shape})"
            )
    spec = np.asarray(g.spec)
    want = (len(g.logzsol), len(g.log_age_yr), len(g.wave))
    if spec.shape != want:
        raise SSPGridError(
            f"SSP grid spec has shape {spec.shape}, expected (n_met, n_age, n_wave) = {want}"
        )
    if not np.all(np.isfinite(spec)):
        raise SSPGridError("SSP grid spec has non-finite values")
    if np.any(spec < 0):
        raise SSPGridError(f"SSP grid spec has {int((spec < 0).sum())} negative values")
    if g.wave[0] <= 0:
        raise SSPGridError("SSP grid wavelengths must be positive (Angstrom)")
    if not (0 < g.zsol < 0.1):
        raise SSPGridError(f"SSP grid zsol={g.zsol} is not a plausible solar metallicity")
    if not (1e33 < g.lsun_cgs < 1e34):
        raise SSPGridError(f"SSP grid lsun_cgs={g.lsun_cgs} is not L_sun in erg/s")
    if g.surviving_frac is not None and np.shape(g.surviving_frac) != want[:2]:
        raise SSPGridError(
            f"surviving_frac has shape {np.shape(g.surviving_frac)}, expected {want[:2]}"
        )
    empty = np.all(spec == 0, axis=(0, 2))
    if np.any(empty):
        ages = ", ".join(f"{10 ** (a - 6):.3g} Myr" for a in np.asarray(g.log_age_yr)[empty])
        raise SSPGridError(
            f"SSP grid has all-zero spectra at {int(empty.sum())} ages ({ages}); a model built on "
            "it would have no light from stars of those ages. Fix the grid, or drop those ages "
            "explicitly (load_dsps_hdf5(..., drop_empty_ages=True))."
        )


def default_grid_path() -> Path:
    """Path of the shipped default grid.

    Looks at ``$SEDFLOW_JAX_SSP_GRID`` first, then the package resource
    ``sedflow_jax/ssp_templates/`` (an installed wheel: the repository's ``ssp_templates/`` is
    packaged there), then ``<repo>/ssp_templates/`` beside the package (a source checkout or an
    editable install).
    """
    env = os.environ.get("SEDFLOW_JAX_SSP_GRID")
    if env:
        return Path(env)
    packaged = resources.files("sedflow_jax") / "ssp_templates" / DEFAULT_GRID_NAME
    if packaged.is_file():
        return Path(str(packaged))
    return Path(str(resources.files("sedflow_jax"))).parent / "ssp_templates" / DEFAULT_GRID_NAME


def load_ssp_grid(path: str | os.PathLike | None = None) -> SSPGrid:
    """Load an SSP grid from our ``.npz`` format (``None``: the shipped BC03/MILES default).

    Required arrays: ``spec`` (n_met, n_age, n_wave) in L_sun/A per M_sun formed, ``wave`` [A],
    ``age_yr`` or ``log_age_yr``, ``logzsol`` and ``zsol`` (or absolute ``Z`` and ``zsol``).
    Optional: ``live_frac`` / ``surviving_frac`` (n_met, n_age), ``lsun_cgs``, ``units``, ``source``.
    Ages <= 0 (the BC03 zero-age model) are dropped: the model never asks for ages below 1e5 yr,
    and FSPS's convention puts ages below the first node on the first node.
    """
    p = default_grid_path() if path is None else Path(path)
    if not p.exists():
        raise FileNotFoundError(
            f"SSP grid file not found: {p}. The default grid ships in the repository's "
            "ssp_templates/ folder; install from a source checkout (pip install -e .) or set "
            "SEDFLOW_JAX_SSP_GRID to a grid file."
        )
    with np.load(p, allow_pickle=False) as d:
        files = set(d.files)
        missing = {"spec", "wave"} - files
        if missing:
            raise SSPGridError(f"{p}: missing arrays {sorted(missing)}")
        if "log_age_yr" in files:
            la = np.asarray(d["log_age_yr"], float)
        elif "age_yr" in files:
            with np.errstate(divide="ignore"):
                la = np.log10(np.asarray(d["age_yr"], float))
        else:
            raise SSPGridError(f"{p}: needs 'log_age_yr' or 'age_yr'")
        zsol = float(d["zsol"]) if "zsol" in files else None
        if "logzsol" in files and zsol is not None:
            logzsol = np.asarray(d["logzsol"], float)
        elif "Z" in files and zsol is not None:
            logzsol = np.log10(np.asarray(d["Z"], float) / zsol)
        else:
            raise SSPGridError(f"{p}: needs 'zsol' and 'logzsol' (or 'Z')")
        units = SPEC_UNITS
        if "units" in files:  # our own string, or the shipped grid's descriptive one
            u = str(d["units"])
            if u != SPEC_UNITS and "spec: L_sun/Angstrom per M_sun formed" not in u:
                units = u  # anything else is refused by validation, naming the units
        keep = np.isfinite(la)
        surv = None
        for key in ("surviving_frac", "live_frac"):
            if key in files:
                surv = np.asarray(d[key], float)[:, keep]
                break
        lsun = float(d["lsun_cgs"]) if "lsun_cgs" in files else LSUN_BC03_CGS
        prov = str(d["source"]) if "source" in files else str(p)
        if not np.all(keep):
            prov += f" | dropped {int((~keep).sum())} non-positive age node(s) on load"
        return SSPGrid(
            wave=np.asarray(d["wave"], float),
            log_age_yr=la[keep],
            logzsol=logzsol,
            zsol=zsol,
            spec=np.asarray(d["spec"], np.float32)[:, keep, :],
            surviving_frac=surv,
            lsun_cgs=lsun,
            name=p.stem,
            provenance=prov,
            units=units,
        )


def save_ssp_grid(grid: SSPGrid, path: str | os.PathLike) -> None:
    """Write ``grid`` in our ``.npz`` format (the inverse of :func:`load_ssp_grid`)."""
    arrays = dict(
        spec=np.asarray(grid.spec, np.float32),
        wave=np.asarray(grid.wave, float),
        log_age_yr=np.asarray(grid.log_age_yr, float),
        logzsol=np.asarray(grid.logzsol, float),
        zsol=np.float64(grid.zsol),
        lsun_cgs=np.float64(grid.lsun_cgs),
        units=np.str_(grid.units),
        source=np.str_(grid.provenance),
    )
    if grid.surviving_frac is not None:
        arrays["surviving_frac"] = np.asarray(grid.surviving_frac, float)
    np.savez_compressed(path, **arrays)


def load_dsps_hdf5(
    path: str | os.PathLike,
    *,
    zsol: float = 0.0142,
    lsun_cgs: float = LSUN_DSPS_CGS,
    drop_empty_ages: bool = False,
) -> SSPGrid:
    """Load a grid in DSPS's HDF5 SSP format and convert it to an :class:`SSPGrid`.

    DSPS keys: ``ssp_lgmet`` (n_met,) = log10(Z) absolute; ``ssp_lg_age_gyr`` (n_age,) =
    log10(age/Gyr); ``ssp_wave`` (n_wave,) [A]; ``ssp_flux`` (n_met, n_age, n_wave) = L_nu in
    L_sun/Hz per M_sun formed. Converted with L_lambda = L_nu * c / lambda^2 (c in A/s).

    ``zsol``: the solar metallicity the grid's isochrones use (0.0142 for MIST); sets ``logzsol``.
    ``drop_empty_ages``: the loader refuses grids with all-zero age planes (a model on them has no
    light from those ages); with True it drops them with a warning naming the ages instead.
    """
    import h5py

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"DSPS SSP file not found: {p}")
    with h5py.File(p, "r") as f:
        need = ["ssp_lgmet", "ssp_lg_age_gyr", "ssp_wave", "ssp_flux"]
        missing = [k for k in need if k not in f]
        if missing:
            raise SSPGridError(f"{p}: not a DSPS SSP file, missing datasets {missing}")
        lgmet = np.asarray(f["ssp_lgmet"][...], float)
        lg_age_gyr = np.asarray(f["ssp_lg_age_gyr"][...], float)
        wave = np.asarray(f["ssp_wave"][...], float)
        lnu = np.asarray(f["ssp_flux"][...], float)
        attrs = {k: f.attrs[k] for k in f.attrs}
    if lnu.ndim != 3:
        raise SSPGridError(f"{p}: ssp_flux must be 3-D (n_met, n_age, n_wave), got {lnu.shape}")
    llam = lnu * (C_ANGSTROM_S / wave**2)[None, None, :]
    empty = np.all(llam == 0, axis=(0, 2))
    prov = f"DSPS HDF5 {p.name}; " + "; ".join(f"{k}={v}" for k, v in attrs.items())
    if np.any(empty) and drop_empty_ages:
        ages = ", ".join(f"{10 ** (a + 3):.3g} Myr" for a in lg_age_gyr[empty])
        warnings.warn(
            f"{p.name}: dropping {int(empty.sum())} all-zero age planes ({ages}); ages below "
            "the first remaining node will use that node's spectrum",
            stacklevel=2,
        )
        prov += f" | dropped all-zero ages: {ages}"
        llam, lg_age_gyr = llam[:, ~empty], lg_age_gyr[~empty]
    return SSPGrid(
        wave=wave,
        log_age_yr=lg_age_gyr + 9.0,
        logzsol=lgmet - np.log10(zsol),
        zsol=zsol,
        spec=llam.astype(np.float32),
        surviving_frac=None,
        lsun_cgs=lsun_cgs,
        name=p.stem,
        provenance=prov,
    )


# --------------------------------------------------------------------------------------------
# Interpolation weights (JAX, branch-free)
# --------------------------------------------------------------------------------------------


def age_weights(log_age, nodes):
    """Bracketing index and weights for age interpolation linear in log age (FSPS convention).

    log_age : (...,) log10(age/yr); nodes : (n_age,) increasing.
    Returns (j, w_lo): the SSP is w_lo * node[j] + (1 - w_lo) * node[j+1]; ages outside the node
    range are clamped (all weight on the end node). Shapes (...,).
    """
    nodes = jnp.asarray(nodes, log_age.dtype)
    n = nodes.shape[0]
    j = jnp.clip(jnp.searchsorted(nodes, log_age, side="right") - 1, 0, n - 2)
    lo, hi = nodes[j], nodes[j + 1]
    w_lo = jnp.clip((hi - log_age) / (hi - lo), 0.0, 1.0)
    return j, w_lo


def met_weights(x, nodes):
    """Bracketing index and weights for metallicity interpolation with linear extrapolation.

    x : (...,) logzsol coordinate; nodes : (n_met,) increasing. The index is clamped to the first
    and last interval, the weight is not (FSPS ztinterp). Returns (m, w_lo) with the value
    w_lo * node[m] + (1 - w_lo) * node[m+1]; w_lo may be > 1 or < 0 (extrapolation).
    """
    nodes = jnp.asarray(nodes, x.dtype)
    n = nodes.shape[0]
    m = jnp.clip(jnp.searchsorted(nodes, x, side="right") - 1, 0, n - 2)
    lo, hi = nodes[m], nodes[m + 1]
    w_lo = (hi - x) / (hi - lo)
    return m, w_lo
