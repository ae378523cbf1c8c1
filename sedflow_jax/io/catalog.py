"""Catalog I/O: photometry tables in, the flow's conditioning vector out, with bad rows flagged.

Default column layout (what :func:`sedflow_jax.mock_catalog` writes and ``infer`` reads):
``flux_<band>`` [nanomaggies], ``flux_ivar_<band>`` [nanomaggies^-2] for each model band
(e.g. ``flux_sdss_r``), and ``z``. Other layouts map through ``flux_fmt`` / ``ivar_fmt`` /
``z_col``; SDSS/NSA-style vector columns (``NMGY`` (n, n_bands) + ``NMGY_IVAR``) through
``vector_flux`` / ``vector_ivar``.

Nothing is silently dropped: every row gets a ``flag`` bit mask and the counts are returned.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import NamedTuple, Optional, Sequence

import numpy as np


FLAG_NONFINITE = 1  # NaN / inf flux, ivar or z
FLAG_NONPOSITIVE_FLUX = 2  # flux <= 0: no magnitude
FLAG_BAD_IVAR = 4  # ivar <= 0
FLAG_Z_RANGE = 8  # redshift outside the model / training range
FLAG_SENTINEL = 16  # a band holds a sentinel value (e.g. -9999)
FLAG_LOW_SNR = 32  # a band below the user's S/N floor (plain posteriors)
FLAG_TOO_FEW_BANDS = 64  # fewer usable bands than the (mask-aware) posterior needs
FLAG_NOISE_OOS = 128  # (mag, sigma) outside the training support and not handled
FLAG_NAMES = {FLAG_NONFINITE: "non-finite value", FLAG_NONPOSITIVE_FLUX: "flux <= 0",
              FLAG_BAD_IVAR: "ivar <= 0", FLAG_Z_RANGE: "redshift out of range",
              FLAG_SENTINEL: "sentinel value", FLAG_LOW_SNR: "S/N below floor",
              FLAG_TOO_FEW_BANDS: "too few usable bands",
              FLAG_NOISE_OOS: "outside training support"}

# per (row, band) reasons a band is masked (Photometry.band_flag; 0 = used)
BAND_NONFINITE = 1  # NaN / inf flux or ivar
BAND_SENTINEL = 2  # flux or ivar equals a sentinel value
BAND_NOT_OBSERVED = 4  # flux == 0 and ivar == 0
BAND_BAD_IVAR = 8  # ivar <= 0 (otherwise)
BAND_NONPOSITIVE_FLUX = 16  # flux <= 0 with ivar > 0: no magnitude
BAND_LOW_SNR = 32  # flux * sqrt(ivar) < snr_floor
BAND_EMPTY = 64  # the band has no usable value in any row of the catalog
BAND_NOISE_OOS = 128  # (mag, sigma_mag) outside the training support (set by infer_catalog)
BAND_FLAG_NAMES = {BAND_NONFINITE: "non-finite", BAND_SENTINEL: "sentinel",
                   BAND_NOT_OBSERVED: "not observed (flux = ivar = 0)",
                   BAND_BAD_IVAR: "ivar <= 0", BAND_NONPOSITIVE_FLUX: "flux <= 0",
                   BAND_LOW_SNR: "S/N below floor", BAND_EMPTY: "band empty in catalog",
                   BAND_NOISE_OOS: "outside training support"}
#: values read as "no measurement" in flux or ivar columns
DEFAULT_SENTINELS = (-9999.0, -999.0, -99.0)


class CatalogError(ValueError):
    """A catalog the reader cannot use (unreadable file, missing columns, wrong shapes, units)."""


def catalog_error(path, exc) -> CatalogError:
    """A one-line :class:`CatalogError` naming ``path`` for an exception raised reading it."""
    msg = " ".join(str(exc).split())
    msg = (msg[:200] + "...") if len(msg) > 200 else msg
    return CatalogError(f"{os.fspath(path)}: cannot read it as a catalog table "
                        f"({type(exc).__name__}: {msg or 'no detail'})")


@dataclasses.dataclass(frozen=True)
class ColumnSpec:
    """Where a catalog keeps what the reader needs: the one column specification of
    :func:`read_photometry`, :func:`sedflow_jax.sbi.inference.infer_catalog` and
    :func:`sedflow_jax.sbi.streaming.infer_catalog_streaming`.

    flux_fmt / ivar_fmt : per-band column names with ``{band}`` (default ``flux_{band}`` /
        ``flux_ivar_{band}``); vector_flux / vector_ivar : SDSS-style (n, n_bands) columns used
        instead (both or neither); z_col : the redshift column; extinction : Galactic A_b [mag]
        (a vector column or a ``{band}`` format), fluxes are dereddened; snr_floor : bands with
        flux sqrt(ivar) below it are masked or flag the row; sentinels : values read as "no
        measurement"; keep : catalog columns copied to an inference output (e.g. an id).
    """

    flux_fmt: str = "flux_{band}"
    ivar_fmt: str = "flux_ivar_{band}"
    z_col: str = "z"
    vector_flux: Optional[str] = None
    vector_ivar: Optional[str] = None
    extinction: Optional[str] = None
    snr_floor: Optional[float] = None
    sentinels: tuple = DEFAULT_SENTINELS
    keep: tuple = ()

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "keep", tuple(str(c) for c in (self.keep or ())))
        set_(self, "sentinels", tuple(float(v) for v in (self.sentinels or ())))
        if (self.vector_flux is None) != (self.vector_ivar is None):
            raise CatalogError("give both vector_flux and vector_ivar (or neither)")
        if self.snr_floor is not None:
            if not np.isfinite(self.snr_floor):
                raise ValueError(f"snr_floor must be a finite number, got {self.snr_floor}")
            set_(self, "snr_floor", float(self.snr_floor))

    @classmethod
    def make(cls, spec: "ColumnSpec | None" = None, **kw) -> "ColumnSpec":
        """``spec`` (default: the default layout) with the fields given in ``kw`` replaced."""
        base = cls() if spec is None else spec
        return dataclasses.replace(base, **kw) if kw else base

    def photometry_columns(self, bands) -> list:
        """The columns :func:`read_photometry` reads for ``bands`` (flux, ivar, z, extinction)."""
        if self.vector_flux is not None:
            cols = [self.vector_flux, self.vector_ivar]
        else:
            cols = [self.flux_fmt.format(band=b) for b in bands] + \
                   [self.ivar_fmt.format(band=b) for b in bands]
        cols.append(self.z_col)
        if self.extinction is not None:
            cols += ([self.extinction.format(band=b) for b in bands]
                     if "{band}" in self.extinction else [self.extinction])
        return list(dict.fromkeys(cols))

    def columns(self, bands) -> list:
        """Every column a run reads: :meth:`photometry_columns` and the ``keep`` columns."""
        return list(dict.fromkeys(self.photometry_columns(bands) + list(self.keep)))

    def check(self, colnames, bands) -> None:
        """Raise :class:`CatalogError` naming the columns the catalog lacks."""
        have = set(colnames)
        missing = [c for c in self.columns(bands) if c not in have]
        if missing:
            raise CatalogError(f"catalog is missing columns {missing} (have "
                               f"{list(colnames)[:20]})")

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}


class Photometry(NamedTuple):
    """flux, sigma : (n, n_bands) nanomaggies (extinction-corrected if asked); z : (n,);
    flag : (n,) int row bit mask (0 = usable, ``FLAG_*``); counts : dict flag name -> number of
    rows (plus ``usable``, ``rows_with_masked_bands``, ``masked_<band>``); bands : band names;
    mask : (n, n_bands) bool, True = band used; band_flag : (n, n_bands) int ``BAND_*`` bits;
    band_counts : {band: {reason: n}}."""

    flux: np.ndarray
    sigma: np.ndarray
    z: np.ndarray
    flag: np.ndarray
    counts: dict
    bands: tuple
    mask: np.ndarray = None
    band_flag: np.ndarray = None
    band_counts: dict = None


def read_table(table):
    """An astropy Table from a Table or a path (FITS, ECSV, CSV, HDF5 by extension); a file
    that is missing or cannot be read raises a one-line :class:`CatalogError` naming it."""
    from astropy.table import Table

    if isinstance(table, Table):
        return table
    path = os.fspath(table)
    if not os.path.exists(path):
        raise CatalogError(f"{path}: no such catalog file")
    try:
        return Table.read(path)
    except Exception as exc:  # noqa: BLE001 -- any reader failure is a bad catalog
        raise catalog_error(path, exc) from None


def _band_matrix(t, spec, bands, what):
    """(n, nb) float array from a vector column name, a '{band}' format or None."""
    if spec is None:
        return None
    if "{band}" in spec:
        cols = [spec.format(band=b) for b in bands]
        missing = [c for c in cols if c not in t.colnames]
        if missing:
            raise CatalogError(f"catalog is missing {what} columns {missing}")
        return np.column_stack([np.ma.filled(np.ma.asarray(t[c], float), np.nan) for c in cols])
    if spec not in t.colnames:
        raise CatalogError(f"catalog has no {what} column {spec!r}")
    a = np.ma.filled(np.ma.asarray(t[spec], float), np.nan)
    if a.ndim != 2 or a.shape[1] != len(bands):
        raise CatalogError(f"{what} column {spec} must have shape (n, {len(bands)}), got {a.shape}")
    return a


_NMGY_NAMES = ("nanomaggy", "nanomaggies", "nmgy", "")


def _column_nmgy(t, fc: str, ic: str, sentinels):
    """(flux [nanomaggies], ivar [nanomaggies^-2]) of one band from its two columns.

    Units are read from the columns: none or nanomaggies -- used as they are; any spectral flux
    density (Jy, uJy, nJy, erg/s/cm^2/Hz) -- converted (the ivar column in the inverse square
    of the same unit, or of its own unit if it has one); AB magnitudes (unit ``mag`` or
    ``AB``) -- flux = 10^((22.5 - m) / 2.5), and the second column is the magnitude error
    (unit ``mag``: sigma_f = f ln(10)/2.5 sigma_m) or, with unit ``1/mag2``, its inverse
    variance. Magnitude sentinels (e.g. -99, 99 for "not measured") stay sentinels.
    """
    import astropy.units as u

    f = np.ma.filled(np.ma.asarray(t[fc], float), np.nan)
    iv = np.ma.filled(np.ma.asarray(t[ic], float), np.nan)
    fu, iu = getattr(t[fc], "unit", None), getattr(t[ic], "unit", None)
    if fu is None or str(fu) in _NMGY_NAMES:
        return f, iv
    nmgy = 3.631 * u.uJy
    try:
        fu = u.Unit(str(fu), parse_strict="raise")
    except ValueError:
        raise CatalogError(f"column {fc} has unit {str(fu)!r}, which astropy cannot parse; give "
                           "nanomaggies, a flux density (Jy, uJy, ...) or AB magnitudes") from None
    if fu in (u.mag, u.ABmag) or str(fu) in ("mag", "AB", "mag(AB)"):
        bad = np.zeros(f.shape, bool)
        for v in tuple(sentinels or ()) + (99.0, -99.0):
            bad |= (f == v) | (iv == v)
        with np.errstate(invalid="ignore", over="ignore"):
            flux = 10.0 ** ((22.5 - f) / 2.5)
            if iu is not None and str(iu) in ("1 / mag2", "mag-2", "1/mag2", "1 / mag(AB)2"):
                smag = np.where(iv > 0, 1.0 / np.sqrt(np.where(iv > 0, iv, 1.0)), -1.0)
            else:
                smag = iv
            sig = flux * np.log(10.0) / 2.5 * smag
            # sigma_m <= 0 -> ivar -1 (flagged BAD_IVAR); NaN stays NaN (flagged NONFINITE)
            ivar = np.where(smag > 0, 1.0 / np.where(smag > 0, sig, 1.0) ** 2,
                            np.where(np.isfinite(smag), -1.0, np.nan))
        sentinel = (sentinels or (-9999.0,))[0]
        return np.where(bad, sentinel, flux), np.where(bad, sentinel, ivar)
    try:
        k = (1.0 * fu).to(nmgy, equivalencies=u.spectral_density(1 * u.um)).value
    except u.UnitConversionError:
        raise CatalogError(f"column {fc} has unit {fu}; fluxes must be in nanomaggies, a flux "
                           "density (Jy, uJy, ...) or AB magnitudes") from None
    if not fu.is_equivalent(u.Jy):
        raise CatalogError(f"column {fc} has unit {fu}: a flux density per unit frequency "
                           "(f_nu) is needed")
    ki = 1.0 / k**2
    if iu is not None and str(iu) not in _NMGY_NAMES:
        try:
            ki = (1.0 * u.Unit(str(iu))).to(nmgy**-2).value
        except (ValueError, u.UnitConversionError):
            raise CatalogError(f"column {ic} has unit {iu}; expected an inverse flux "
                               f"density squared matching {fc}") from None
    return f * k, iv * ki


def read_photometry(table, bands: Sequence[str], spec: Optional[ColumnSpec] = None, *,
                    z_range=None, mask_bands: bool = False, min_bands: int = 2,
                    **columns) -> Photometry:
    """Read fluxes, sigmas and redshifts of ``bands``, build the band mask and flag rows.

    Where the columns are: ``spec`` (a :class:`ColumnSpec`), or its fields as keywords
    (``flux_fmt=``, ``ivar_fmt=``, ``z_col=``, ``vector_flux=`` / ``vector_ivar=``,
    ``extinction=``, ``sentinels=``, ``snr_floor=``), which also override those of ``spec``.

    Every (row, band) gets ``BAND_*`` reason bits (0 = usable): NaN / inf, a ``sentinels`` value
    in flux or ivar, flux = ivar = 0 ("not observed"), ivar <= 0, flux <= 0, S/N =
    flux sqrt(ivar) < ``snr_floor`` (if given), and ``BAND_EMPTY`` for a band with no usable
    value in any row. ``mask = band_flag == 0``.

    mask_bands=False (plain posteriors, the default): any bad band flags the whole row (NaN ->
    ``FLAG_NONFINITE``, flux <= 0 -> ``FLAG_NONPOSITIVE_FLUX``, ivar <= 0 ->
    ``FLAG_BAD_IVAR``, sentinel -> ``FLAG_SENTINEL``, low S/N -> ``FLAG_LOW_SNR``).
    mask_bands=True (mask-aware posteriors): bad bands are only masked; a row is flagged
    ``FLAG_TOO_FEW_BANDS`` when fewer than ``min_bands`` remain. Either way a non-finite z flags
    ``FLAG_NONFINITE`` and z outside ``z_range`` (lo, hi] ``FLAG_Z_RANGE``.

    extinction : Galactic extinction A_b [mag] (vector column or '{band}' format): flux and
    sigma are multiplied by 10**(0.4 A_b), as in the shipped noise model. Nothing is dropped:
    rows keep their index; ``counts`` and ``band_counts`` report every reason.
    """
    spec = ColumnSpec.make(spec, **columns)
    t = read_table(table)
    bands = tuple(bands)
    flux, ivar = _read_fluxes(t, bands, spec)
    if spec.z_col not in t.colnames:
        raise CatalogError(f"catalog has no redshift column {spec.z_col!r}")
    z = np.ma.filled(np.ma.asarray(t[spec.z_col], float), np.nan)
    bf = _band_flags(flux, ivar, spec)
    with np.errstate(invalid="ignore", divide="ignore"):
        sigma = np.where(ivar > 0, 1.0 / np.sqrt(np.where(ivar > 0, ivar, 1.0)), np.nan)
    if spec.extinction is not None:
        a = _band_matrix(t, spec.extinction, bands, "extinction")
        if not np.all(np.isfinite(a)):
            raise CatalogError(f"extinction {spec.extinction!r} has non-finite values")
        corr = 10.0 ** (0.4 * a)
        flux, sigma = flux * corr, sigma * corr
    mask = bf == 0
    flag = _row_flags(flux, ivar, z, bf, z_range=z_range, mask_bands=mask_bands,
                      min_bands=min_bands)
    counts, band_counts = _counts(flag, mask, bf, bands)
    empty = ((bf & BAND_EMPTY) > 0).all(0) if len(z) else np.zeros(len(bands), bool)
    if empty.any():
        warnings.warn(f"bands {[b for b, e in zip(bands, empty) if e]} have no usable value in "
                      "any row: masked everywhere", stacklevel=2)
    return Photometry(flux, sigma, z, flag, counts, bands, mask, bf, band_counts)


def _read_fluxes(t, bands, spec: ColumnSpec):
    """(flux [nanomaggies], ivar) (n, nb) of ``bands`` from the columns ``spec`` names."""
    if spec.vector_flux is not None:
        for c in (spec.vector_flux, spec.vector_ivar):
            if c not in t.colnames:
                raise CatalogError(f"catalog has no column {c!r}")
        flux = np.ma.filled(np.ma.asarray(t[spec.vector_flux], float), np.nan)
        ivar = np.ma.filled(np.ma.asarray(t[spec.vector_ivar], float), np.nan)
        if flux.ndim != 2 or flux.shape[1] != len(bands) or ivar.shape != flux.shape:
            raise CatalogError(f"{spec.vector_flux}/{spec.vector_ivar} must have shape "
                               f"(n, {len(bands)})")
        return flux, ivar
    fc = [spec.flux_fmt.format(band=b) for b in bands]
    ic = [spec.ivar_fmt.format(band=b) for b in bands]
    missing = [c for c in fc + ic if c not in t.colnames]
    if missing:
        raise CatalogError(f"catalog is missing columns {missing} (have {t.colnames[:20]})")
    pairs = [_column_nmgy(t, f, i, spec.sentinels) for f, i in zip(fc, ic)]
    return np.column_stack([p[0] for p in pairs]), np.column_stack([p[1] for p in pairs])


def _band_flags(flux, ivar, spec: ColumnSpec) -> np.ndarray:
    """(n, nb) ``BAND_*`` reason bits of every (row, band)."""
    n, nb = flux.shape
    bf = np.zeros((n, nb), int)
    with np.errstate(invalid="ignore"):
        nonfin = ~(np.isfinite(flux) & np.isfinite(ivar))
        bf[nonfin] |= BAND_NONFINITE
        sent = np.zeros((n, nb), bool)
        for v in spec.sentinels:
            sent |= (flux == v) | (ivar == v)
        bf[sent] |= BAND_SENTINEL
        notobs = (flux == 0) & (ivar == 0)
        bf[notobs] |= BAND_NOT_OBSERVED
        rest = ~(nonfin | sent | notobs)
        bf[rest & (ivar <= 0)] |= BAND_BAD_IVAR
        bf[rest & (ivar > 0) & (flux <= 0)] |= BAND_NONPOSITIVE_FLUX
        if spec.snr_floor is not None:
            low = rest & (ivar > 0) & (flux > 0) & \
                (flux * np.sqrt(np.abs(ivar)) < spec.snr_floor)
            bf[low] |= BAND_LOW_SNR
    empty = (bf != 0).all(0) if n else np.zeros(nb, bool)
    bf[:, empty] |= BAND_EMPTY
    return bf


def _row_flags(flux, ivar, z, bf, *, z_range, mask_bands, min_bands) -> np.ndarray:
    """(n,) ``FLAG_*`` bits: bad bands flag the row (plain) or only too few bands do (masks)."""
    mask = bf == 0
    flag = np.zeros(len(z), int)
    flag[~np.isfinite(z)] |= FLAG_NONFINITE
    if mask_bands:
        flag[mask.sum(1) < int(min_bands)] |= FLAG_TOO_FEW_BANDS
    else:
        with np.errstate(invalid="ignore"):
            flag[((bf & BAND_NONFINITE) > 0).any(1)] |= FLAG_NONFINITE
            flag[(flux <= 0).any(1)] |= FLAG_NONPOSITIVE_FLUX
            flag[(ivar <= 0).any(1)] |= FLAG_BAD_IVAR
        flag[((bf & BAND_SENTINEL) > 0).any(1)] |= FLAG_SENTINEL
        flag[((bf & BAND_LOW_SNR) > 0).any(1)] |= FLAG_LOW_SNR
    if z_range is not None:
        with np.errstate(invalid="ignore"):
            flag[~((z > z_range[0]) & (z <= z_range[1]))] |= FLAG_Z_RANGE
    return flag


def _counts(flag, mask, bf, bands):
    """(row counts by flag name and masked band, {band: {reason: n}})."""
    counts = {name: int(np.sum(flag & bit > 0)) for bit, name in FLAG_NAMES.items()}
    counts["usable"] = int(np.sum(flag == 0))
    counts["rows_with_masked_bands"] = int((~mask).any(1).sum())
    for i, b in enumerate(bands):
        counts[f"masked_{b}"] = int((~mask[:, i]).sum())
    band_counts = {b: {name: int(np.sum((bf[:, i] & bit) > 0))
                       for bit, name in BAND_FLAG_NAMES.items()} for i, b in enumerate(bands)}
    return counts, band_counts
