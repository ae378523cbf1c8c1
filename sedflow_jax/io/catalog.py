"""Catalog I/O: photometry tables in, the flow's conditioning vector out, with bad rows flagged.

Default column layout (what :func:`sedflow_jax.mock_catalog` writes and ``infer`` reads):
``flux_<band>`` [nanomaggies], ``flux_ivar_<band>`` [nanomaggies^-2] for each model band
(e.g. ``flux_sdss_r``), and ``z``. Other layouts map through ``flux_fmt`` / ``ivar_fmt`` /
``z_col``; SDSS/NSA-style vector columns (``NMGY`` (n, n_bands) + ``NMGY_IVAR``) through
``vector_flux`` / ``vector_ivar`` (``vector_bands``: the band of each element).

Catalogs as users have them are recognised (:func:`resolve_layout`, used by
:func:`read_photometry` and so by both inference paths; the report says which columns it used):

- per-band columns with short names, case-insensitive: ``flux_u`` / ``flux_ivar_u``,
  ``flux_FUV``, ``flux_ivar_NUV`` (:data:`BAND_ALIASES`: u g r i z -> sdss_*, FUV NUV ->
  galex_*), besides the internal names (``flux_sdss_u``, which win when present);
- NSA ``NMGY`` / ``NMGY_IVAR`` (7 elements: FUV, NUV, u, g, r, i, z) with redshift ``Z``: a
  model takes its bands' elements. NSA's NMGY is already corrected for Galactic extinction, so
  ``EXTINCTION`` is not applied (give ``extinction='EXTINCTION'`` to apply it anyway);
- SDSS ``MODELFLUX`` / ``MODELFLUX_IVAR`` (5: u, g, r, i, z): ``EXTINCTION`` (5) is applied
  when the catalog has it (``extinction='none'`` switches that off).

A catalog where two layouts give the model's bands (e.g. both ``flux_u`` and ``flux_U``, or
``NMGY`` and ``MODELFLUX``) is refused with a one-line :class:`CatalogError` naming them;
choose with ``flux_fmt`` / ``vector_flux``. :func:`catalog_bands` tells which bands a
catalog provides.

Nothing is silently dropped: every row gets a ``flag`` bit mask and the counts are returned.
"""
from __future__ import annotations

import dataclasses
import os
import re
import warnings
from typing import NamedTuple, Optional, Sequence

import numpy as np

from ..sed.units import GALEX_BANDS, MAG_PER_LN, SDSS_BANDS

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

#: short band names of catalogs (matched case-insensitively) -> the model's band names
BAND_ALIASES = {"fuv": "galex_fuv", "nuv": "galex_nuv", "u": "sdss_u", "g": "sdss_g",
                "r": "sdss_r", "i": "sdss_i", "z": "sdss_z"}
#: NSA's band order (NMGY, NMGY_IVAR, EXTINCTION: F N u g r i z)
NSA_BANDS = GALEX_BANDS + SDSS_BANDS
# SDSS's band order (MODELFLUX, MODELFLUX_IVAR, EXTINCTION) is SDSS_BANDS
#: the bands :func:`catalog_bands` looks for by default
KNOWN_BANDS = NSA_BANDS
#: vector columns recognised by name: (flux, ivar, band of each element, apply EXTINCTION?)
KNOWN_VECTORS = (("NMGY", "NMGY_IVAR", NSA_BANDS, False),
                 ("MODELFLUX", "MODELFLUX_IVAR", SDSS_BANDS, True))
DEFAULT_FLUX_FMT, DEFAULT_IVAR_FMT = "flux_{band}", "flux_ivar_{band}"


class CatalogError(ValueError):
    """A catalog the reader cannot use (unreadable file, missing columns, wrong shapes, units)."""


def catalog_error(path, exc) -> CatalogError:
    """A one-line :class:`CatalogError` naming ``path`` for an exception raised reading it."""
    msg = " ".join(str(exc).split())
    msg = (msg[:200] + "...") if len(msg) > 200 else msg
    return CatalogError(f"{os.fspath(path)}: cannot read it as a catalog table "
                        f"({type(exc).__name__}: {msg or 'no detail'})")


def canonical_band(name) -> str:
    """A band's model name from a catalog's spelling: ``u`` / ``U`` -> ``sdss_u``, ``FUV`` ->
    ``galex_fuv`` (:data:`BAND_ALIASES`), any other name lower-cased (``SDSS_R`` -> sdss_r)."""
    low = str(name).strip().lower()
    return BAND_ALIASES.get(low, low)


def band_spellings(band) -> list:
    """The names a catalog may use for ``band`` (lower case): its own and its short aliases."""
    band = canonical_band(band)
    return [band] + [k for k, v in BAND_ALIASES.items() if v == band]


def parse_bands(value) -> Optional[tuple]:
    """``'FUV,NUV,u'`` or a sequence -> model band names (None stays None)."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    out = tuple(canonical_band(b) for b in items if str(b).strip())
    if not out:
        raise CatalogError(f"vector_bands {value!r} names no band")
    return out


#: photometric calibration errors [mag] per band (``calibration_error='auto'``): SDSS 2 % in u
#: and 1 % in griz (Padmanabhan et al. 2008, ApJ 674, 1217; 2 % = 0.0217 mag), GALEX 0.05 mag
#: in FUV and 0.03 mag in NUV (Morrissey et al. 2007, ApJS 173, 682). Catalog errors such as
#: SDSS MODELFLUX_IVAR are statistical only; these are added to them in quadrature.
CALIBRATION_ERROR_MAG = {"sdss_u": 0.02 * MAG_PER_LN,
                         **{b: 0.01 * MAG_PER_LN for b in ("sdss_g", "sdss_r", "sdss_i",
                                                           "sdss_z")},
                         "galex_fuv": 0.05, "galex_nuv": 0.03}


_NO_CALIBRATION = ("none", "off")


def calibration_error_mag(bands, value) -> np.ndarray:
    """Per-band calibration errors (n_b,) [mag] of ``bands`` from a ``calibration_error`` value:
    None / ``'none'`` / 0 (none), ``'auto'`` (:data:`CALIBRATION_ERROR_MAG`; 0 for a band it
    does not list), a number (every band), ``{band: mag}`` or ``'u=0.02,g=0.01'`` (bands not
    named: 0). Raises CatalogError on a negative, non-finite or unparsable value or an unknown
    band name."""
    bands = tuple(bands)
    if value is None or (isinstance(value, str) and value.strip().lower() in _NO_CALIBRATION):
        return np.zeros(len(bands))
    if isinstance(value, str) and value.strip().lower() == "auto":
        return np.asarray([CALIBRATION_ERROR_MAG.get(b, 0.0) for b in bands])
    given = value
    if isinstance(value, str) and "=" in value:
        given = dict(item.split("=", 1) for item in value.split(",") if item.strip())
    try:
        if isinstance(given, dict):
            given = {canonical_band(b): float(v) for b, v in given.items()}
            out = np.asarray([given.get(b, 0.0) for b in bands])
        else:
            out = np.full(len(bands), float(given))
    except (TypeError, ValueError):
        raise CatalogError(f"calibration_error must be 'auto', 'none', a number [mag] or "
                           f"'band=mag,...', got {value!r}") from None
    unknown = sorted(set(given) - set(bands)) if isinstance(given, dict) else []
    if unknown:
        raise CatalogError(f"calibration_error names band(s) {unknown} not among {list(bands)}")
    if not np.all(np.isfinite(out) & (out >= 0)):
        raise CatalogError(f"calibration_error must be finite and >= 0 [mag], got {value!r}")
    return out


def add_calibration_error(flux, sigma, error_mag) -> np.ndarray:
    """sigma (n, n_b) with a calibration error of ``error_mag`` (n_b,) [mag] added in
    quadrature: ``sqrt(sigma^2 + (error_mag |flux| / MAG_PER_LN)^2)`` (same units as flux)."""
    rel = np.asarray(error_mag, np.float64) / MAG_PER_LN
    return np.sqrt(np.square(sigma) + np.square(rel * np.abs(flux)))


@dataclasses.dataclass(frozen=True)
class ColumnSpec:
    """Where a catalog keeps what the reader needs: the one column specification of
    :func:`read_photometry`, :func:`sedflow_jax.sbi.inference.infer_catalog` and
    :func:`sedflow_jax.sbi.streaming.infer_catalog_streaming`.

    flux_fmt / ivar_fmt : per-band column names with ``{band}`` (default ``flux_{band}`` /
        ``flux_ivar_{band}``; ``{band}`` matches the model's band name or, when no such column
        exists, its short name, case-insensitively: ``flux_u``, ``flux_FUV``); vector_flux /
        vector_ivar : SDSS-style (n, n_elements) columns used instead (both or neither);
        vector_bands : the band of each element (e.g. ``'FUV,NUV,u,g,r,i,z'``; default: NSA /
        SDSS order for NMGY / MODELFLUX of 7 / 5 elements, else the model's bands in order);
        z_col : the redshift column (matched case-insensitively when absent: ``Z``);
        extinction : Galactic A_b [mag] (a vector column or a ``{band}`` format), fluxes are
        dereddened (``'none'``: never, not even for an auto-detected MODELFLUX); snr_floor : bands
        with flux sqrt(ivar) below it are masked or flag the row; calibration_error : a
        photometric calibration error [mag] added to sigma in quadrature (None: sigma as the
        catalog gives it; ``'auto'``: :data:`CALIBRATION_ERROR_MAG`; see
        :func:`calibration_error_mag`); sentinels : values read as "no
        measurement"; keep : catalog columns copied to an inference output (e.g. an id);
        band_columns : ((band, flux column, ivar column), ...) explicit per-band columns (what
        :meth:`resolve` finds); note : what auto-detection decided (for reports).
    """

    flux_fmt: str = DEFAULT_FLUX_FMT
    ivar_fmt: str = DEFAULT_IVAR_FMT
    z_col: str = "z"
    vector_flux: Optional[str] = None
    vector_ivar: Optional[str] = None
    extinction: Optional[str] = None
    snr_floor: Optional[float] = None
    calibration_error: object = None
    sentinels: tuple = DEFAULT_SENTINELS
    keep: tuple = ()
    vector_bands: Optional[tuple] = None
    band_columns: Optional[tuple] = None
    note: str = ""

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "keep", tuple(str(c) for c in (self.keep or ())))
        set_(self, "sentinels", tuple(float(v) for v in (self.sentinels or ())))
        set_(self, "vector_bands", parse_bands(self.vector_bands))
        if self.band_columns is not None:
            set_(self, "band_columns", tuple((canonical_band(b), str(f), str(i))
                                             for b, f, i in self.band_columns))
        if (self.vector_flux is None) != (self.vector_ivar is None):
            raise CatalogError("give both vector_flux and vector_ivar (or neither)")
        if self.vector_bands is not None and self.vector_flux is None:
            raise CatalogError("vector_bands needs vector_flux and vector_ivar")
        if self.snr_floor is not None:
            if not np.isfinite(self.snr_floor):
                raise ValueError(f"snr_floor must be a finite number, got {self.snr_floor}")
            set_(self, "snr_floor", float(self.snr_floor))
        cal = self.calibration_error
        if isinstance(cal, str) and cal.strip().lower() in _NO_CALIBRATION:
            set_(self, "calibration_error", None)  # one spelling of "none" (and its config hash)
        elif isinstance(cal, dict):
            set_(self, "calibration_error", ",".join(f"{b}={float(v)}" for b, v in cal.items()))

    @classmethod
    def make(cls, spec: "ColumnSpec | None" = None, **kw) -> "ColumnSpec":
        """``spec`` (default: the default layout) with the fields given in ``kw`` replaced."""
        base = cls() if spec is None else spec
        return dataclasses.replace(base, **kw) if kw else base

    @property
    def extinction_col(self) -> Optional[str]:
        """The extinction column or format (None for none or ``'none'``)."""
        e = self.extinction
        return None if e is None or str(e).strip().lower() == "none" else e

    def resolve(self, table, bands) -> "ColumnSpec":
        """This spec with the catalog's actual columns for ``bands`` (:func:`resolve_layout`)."""
        return resolve_layout(self, table, bands)

    def photometry_columns(self, bands) -> list:
        """The columns :func:`read_photometry` reads for ``bands`` (flux, ivar, z, extinction)
        (of a spec :meth:`resolve` d for the catalog, when it is not in the default layout)."""
        if self.vector_flux is not None:
            cols = [self.vector_flux, self.vector_ivar]
        elif self.band_columns is not None:
            have = {b: (f, i) for b, f, i in self.band_columns}
            cols = [have[b][0] for b in bands if b in have] + \
                   [have[b][1] for b in bands if b in have]
        else:
            cols = [self.flux_fmt.format(band=b) for b in bands] + \
                   [self.ivar_fmt.format(band=b) for b in bands]
        cols.append(self.z_col)
        ext = self.extinction_col
        if ext is not None:
            cols += ([ext.format(band=b) for b in bands] if "{band}" in ext else [ext])
        return list(dict.fromkeys(cols))

    def columns(self, bands) -> list:
        """Every column a run reads: :meth:`photometry_columns` and the ``keep`` columns."""
        return list(dict.fromkeys(self.photometry_columns(bands) + list(self.keep)))

    def check(self, colnames, bands) -> None:
        """Raise :class:`CatalogError` naming the columns the catalog lacks (after recognising
        its layout, :func:`resolve_layout`)."""
        spec = self.resolve(colnames, bands)
        have = set(colnames)
        missing = [c for c in spec.columns(bands) if c not in have]
        if missing:
            raise CatalogError(f"catalog is missing columns {missing} (have "
                               f"{list(colnames)[:20]})")

    def describe(self, bands) -> str:
        """One line: which columns give ``bands``, the redshift and the extinction."""
        if self.vector_flux is not None:
            vb = self.vector_bands
            idx = "" if vb is None else str([vb.index(b) for b in bands if b in vb])
            order = "" if vb is None else f" (elements {','.join(_short(b) for b in vb)})"
            where = f"{self.vector_flux}{idx} / {self.vector_ivar}{idx}{order}"
        elif self.band_columns is not None:
            have = {b: (f, i) for b, f, i in self.band_columns}
            where = ", ".join(f"{have[b][0]}/{have[b][1]}" for b in bands if b in have)
        else:
            where = ", ".join(f"{self.flux_fmt.format(band=b)}/{self.ivar_fmt.format(band=b)}"
                              for b in bands)
        ext = self.extinction_col
        text = (f"bands {','.join(bands)} from {where}; redshift {self.z_col}; extinction "
                f"{'corrected with ' + ext if ext else 'not corrected'}")
        cal = calibration_error_mag(bands, self.calibration_error)
        if cal.any():
            text += "; calibration error added in quadrature (" + ", ".join(
                f"{_short(b)} {c:.3g}" for b, c in zip(bands, cal)) + " mag)"
        return text + (f" ({self.note})" if self.note else "")

    def to_dict(self) -> dict:
        """JSON form (the newer fields only when set, so older layouts keep their form)."""
        d = {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
             for f in dataclasses.fields(self)}
        for k in ("vector_bands", "band_columns", "note", "calibration_error"):
            if not d[k]:
                d.pop(k)
        if d.get("band_columns"):
            d["band_columns"] = [list(c) for c in d["band_columns"]]
        return d


def _short(band) -> str:
    """The short name of a band (``sdss_u`` -> ``u``, ``galex_fuv`` -> ``FUV``) or itself."""
    for k, v in BAND_ALIASES.items():
        if v == band:
            return k.upper() if len(k) > 1 else k
    return band


def _colnames_widths(table):
    """(column names, {name: elements of a 2-d column}) of a Table, a CatalogReader or names."""
    if hasattr(table, "colnames") and hasattr(table, "columns") and not callable(table.columns):
        widths = {c: (table[c].shape[1] if len(table[c].shape) == 2 else 1)
                  for c in table.colnames}
        return list(table.colnames), widths
    names = list(getattr(table, "colnames", table))
    return names, dict(getattr(table, "widths", {}) or {})


def _find(colnames, names) -> list:
    """The catalog columns matching any of ``names`` case-insensitively (an exact match, when
    there is one, alone)."""
    exact = [n for n in names if n in colnames]
    if exact:
        return exact[:1]
    want = {n.lower() for n in names}
    return [c for c in colnames if c.lower() in want]


def _band_column(fmt, band, colnames, what) -> Optional[str]:
    """The column of ``band`` for format ``fmt``: the model name exactly, else the format's
    text exactly with one of the band's spellings in any case (``flux_U``, ``flux_fuv``);
    None: no such column; two: ambiguous."""
    exact = fmt.format(band=band)
    if exact in colnames:
        return exact
    pre, _, post = fmt.partition("{band}")
    alts = "|".join(re.escape(b) for b in band_spellings(band))
    pat = re.compile(f"{re.escape(pre)}(?i:{alts}){re.escape(post)}")
    hits = [c for c in colnames if pat.fullmatch(c)]
    if len(hits) > 1:
        raise CatalogError(f"ambiguous {what} columns for {band}: {hits} (rename one, or give "
                           "the columns with flux_fmt / ivar_fmt)")
    return hits[0] if hits else None


def _per_band(spec, colnames, bands) -> dict:
    """{band: (flux column, ivar column)} of the bands the per-band formats find."""
    out = {}
    for b in bands:
        f = _band_column(spec.flux_fmt, b, colnames, "flux")
        i = _band_column(spec.ivar_fmt, b, colnames, "inverse-variance")
        if f is not None and i is not None:
            out[b] = (f, i)
    return out


def _known_vectors(colnames, widths) -> list:
    """[(flux col, ivar col, element bands, deredden), ...] of the recognised vector columns
    the catalog has (with the expected number of elements, when known)."""
    out = []
    for fname, iname, order, dered in KNOWN_VECTORS:
        fc, ic = _find(colnames, [fname]), _find(colnames, [iname])
        if len(fc) == 1 and len(ic) == 1 and widths.get(fc[0], len(order)) == len(order):
            out.append((fc[0], ic[0], order, dered))
    return out


def resolve_layout(spec: ColumnSpec, table, bands) -> ColumnSpec:
    """``spec`` with the catalog's actual columns for ``bands``: what :func:`read_photometry`
    reads (idempotent; a catalog in the spec's declared layout gets ``spec`` back unchanged).

    table : an astropy Table (its 2-d columns' widths are used), a
    :class:`~sedflow_jax.io.tables.CatalogReader` or column names. In order: explicit
    ``band_columns`` or ``vector_flux`` are used as given (a recognised NMGY / MODELFLUX of 7 / 5
    elements without ``vector_bands`` gets the NSA / SDSS band order); per-band columns with the
    model's band names win; otherwise every layout giving all ``bands`` is a candidate -- the
    per-band formats with short band names in any case (``flux_u``, ``flux_FUV``) and, for the
    default formats, NMGY / MODELFLUX recognised by name -- and exactly one must remain (two:
    :class:`CatalogError` naming them). A missing z_col is matched case-insensitively (``Z``).
    Nothing found: ``spec`` back (the reader then names the missing columns).
    """
    colnames, widths = _colnames_widths(table)
    bands = tuple(bands)
    if spec.z_col not in colnames:
        z = _find(colnames, [spec.z_col])
        if len(z) > 1:
            raise CatalogError(f"ambiguous redshift columns {z}: give z_col (--z-column)")
        spec = dataclasses.replace(spec, z_col=z[0]) if z else spec
    if spec.band_columns is not None:
        return spec
    if spec.vector_flux is not None:
        return _resolve_vector(spec, colnames, widths)
    per = _per_band(spec, colnames, bands)
    if all(per.get(b) == (spec.flux_fmt.format(band=b), spec.ivar_fmt.format(band=b))
           for b in bands):
        return spec  # the declared layout, read as it is
    cands = []
    if len(per) == len(bands):
        cands.append((f"per-band columns {[per[b][0] for b in bands]}", dataclasses.replace(
            spec, band_columns=tuple((b, *per[b]) for b in bands), note="short band names")))
    if (spec.flux_fmt, spec.ivar_fmt) == (DEFAULT_FLUX_FMT, DEFAULT_IVAR_FMT):
        for fc, ic, order, dered in _known_vectors(colnames, widths):
            if all(b in order for b in bands):
                cands.append((f"{fc}/{ic}", _auto_vector(spec, colnames, widths, fc, ic, order,
                                                          dered)))
    if len(cands) > 1:
        raise CatalogError(f"ambiguous catalog layout: {' and '.join(c[0] for c in cands)} all "
                           f"give bands {list(bands)}; choose with --flux-fmt/--ivar-fmt or "
                           "--vector-flux/--vector-ivar (flux_fmt / vector_flux)")
    return cands[0][1] if cands else spec


def _auto_vector(spec, colnames, widths, fc, ic, order, dered) -> ColumnSpec:
    """A recognised NMGY / MODELFLUX layout, with EXTINCTION applied to MODELFLUX (unless the
    spec names another extinction or ``'none'``); NSA's NMGY is already dereddened."""
    note, ext = f"{fc} recognised by name", spec.extinction
    ecol = _find(colnames, ["EXTINCTION"])
    if spec.extinction is None and len(ecol) == 1:
        if dered and widths.get(ecol[0], len(order)) == len(order):
            ext, note = ecol[0], note + f"; {ecol[0]} applied"
        elif not dered:
            note += f"; {ecol[0]} not applied: {fc} is already extinction-corrected (NSA)"
    return dataclasses.replace(spec, vector_flux=fc, vector_ivar=ic, vector_bands=order,
                               extinction=ext, note=note)


def _resolve_vector(spec, colnames, widths) -> ColumnSpec:
    """Explicit vector columns: their names matched case-insensitively when absent; a
    recognised NMGY / MODELFLUX of 7 / 5 elements without ``vector_bands`` gets the NSA / SDSS
    order (other widths: the model's bands in order, as before)."""
    fc = _find(colnames, [spec.vector_flux])
    ic = _find(colnames, [spec.vector_ivar])
    if len(fc) == 1 and len(ic) == 1 and (fc[0], ic[0]) != (spec.vector_flux, spec.vector_ivar):
        spec = dataclasses.replace(spec, vector_flux=fc[0], vector_ivar=ic[0])
    if spec.vector_bands is None:
        for fname, iname, order, _ in KNOWN_VECTORS:
            if spec.vector_flux.upper() == fname and widths.get(spec.vector_flux) == len(order):
                return dataclasses.replace(spec, vector_bands=order,
                                           note=f"{fname} elements in order "
                                                f"{','.join(_short(b) for b in order)}")
    return spec


def catalog_bands(table, spec: Optional[ColumnSpec] = None, bands=KNOWN_BANDS) -> tuple:
    """Which of ``bands`` (default :data:`KNOWN_BANDS`: GALEX FUV, NUV, SDSS u..z; model
    names or short ones) the catalog provides, in that order, under ``spec``'s layout (default:
    recognised as :func:`resolve_layout` does): per-band flux and ivar columns (model or short
    names, any case), ``vector_bands`` of explicit vector columns, NMGY (7) / MODELFLUX (5) by
    name. Two layouts providing bands (e.g. short-named columns and NMGY) raise
    :class:`CatalogError` naming them, as reading would, unless the per-band columns carry the
    model's band names (the default layout, which wins). A path is read first."""
    spec = ColumnSpec() if spec is None else spec
    if isinstance(table, (str, os.PathLike)):
        table = read_table(table)
    colnames, widths = _colnames_widths(table)
    bands = tuple(canonical_band(b) for b in bands)
    if spec.band_columns is not None:
        return tuple(b for b in bands if b in {c[0] for c in spec.band_columns})
    if spec.vector_flux is not None:
        got = _resolve_vector(spec, colnames, widths).vector_bands or ()  # None: positional
        return tuple(b for b in bands if b in got)
    per = _per_band(spec, colnames, bands)
    exact = [b for b in per if per[b] == (spec.flux_fmt.format(band=b),
                                          spec.ivar_fmt.format(band=b))]
    found = [(f"per-band columns {[per[b][0] for b in per]}", set(per))] if per else []
    if (spec.flux_fmt, spec.ivar_fmt) == (DEFAULT_FLUX_FMT, DEFAULT_IVAR_FMT):
        found += [(f"{fc}/{ic}", set(order)) for fc, ic, order, _ in
                  _known_vectors(colnames, widths)]
    if len(found) > 1 and not (exact and len(exact) == len(per)):
        raise CatalogError(f"ambiguous catalog layout: {' and '.join(f[0] for f in found)} "
                           "all give bands; choose with --flux-fmt/--ivar-fmt or "
                           "--vector-flux/--vector-ivar (flux_fmt / vector_flux)")
    have = found[0][1] if found else set()
    return tuple(b for b in bands if b in have)


class Photometry(NamedTuple):
    """flux, sigma : (n, n_bands) nanomaggies (extinction-corrected if asked); z : (n,);
    flag : (n,) int row bit mask (0 = usable, ``FLAG_*``); counts : dict flag name -> number of
    rows (plus ``usable``, ``rows_with_masked_bands``, ``masked_<band>``); bands : band names;
    mask : (n, n_bands) bool, True = band used; band_flag : (n, n_bands) int ``BAND_*`` bits;
    band_counts : {band: {reason: n}}; layout : one line saying which columns were read
    (:meth:`ColumnSpec.describe`)."""

    flux: np.ndarray
    sigma: np.ndarray
    z: np.ndarray
    flag: np.ndarray
    counts: dict
    bands: tuple
    mask: np.ndarray = None
    band_flag: np.ndarray = None
    band_counts: dict = None
    layout: str = None


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


def _band_matrix(t, spec, bands, what, vector_bands=None):
    """(n, nb) float array from a vector column name, a '{band}' format or None; a vector
    column with one element per ``vector_bands`` gives the elements of ``bands``."""
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
    if vector_bands is not None and a.ndim == 2 and a.shape[1] == len(vector_bands):
        return a[:, _element_index(vector_bands, bands, spec)]
    if a.ndim != 2 or a.shape[1] != len(bands):
        raise CatalogError(f"{what} column {spec} must have shape (n, {len(bands)}), got {a.shape}")
    return a


def _element_index(vector_bands, bands, col) -> list:
    """Indices of ``bands`` among a vector column's ``vector_bands``."""
    missing = [b for b in bands if b not in vector_bands]
    if missing:
        raise CatalogError(f"{col} holds bands {list(vector_bands)}, not {missing}")
    return [vector_bands.index(b) for b in bands]


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
    ``vector_bands=``, ``extinction=``, ``sentinels=``, ``snr_floor=``), which also override
    those of ``spec``; layouts as users have them (short band names, NSA NMGY, SDSS MODELFLUX)
    are recognised (:func:`resolve_layout`) and ``layout`` of the result says what was read.

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
    sigma are multiplied by 10**(0.4 A_b), as in the shipped noise model. calibration_error
    (a spec field; default None = sigma as given): a calibration error [mag] added to sigma in
    quadrature after dereddening (:func:`add_calibration_error`; ``'auto'`` = SDSS 2 % in u, 1 %
    in griz, GALEX 0.05 / 0.03 mag). The band masks and ``snr_floor`` use the catalog's own
    ivar. Nothing is dropped:
    rows keep their index; ``counts`` and ``band_counts`` report every reason.
    """
    t = read_table(table)
    bands = tuple(bands)
    spec = ColumnSpec.make(spec, **columns).resolve(t, bands)
    flux, ivar = _read_fluxes(t, bands, spec)
    if spec.z_col not in t.colnames:
        raise CatalogError(f"catalog has no redshift column {spec.z_col!r}")
    z = np.ma.filled(np.ma.asarray(t[spec.z_col], float), np.nan)
    bf = _band_flags(flux, ivar, spec)
    with np.errstate(invalid="ignore", divide="ignore"):
        sigma = np.where(ivar > 0, 1.0 / np.sqrt(np.where(ivar > 0, ivar, 1.0)), np.nan)
    if spec.extinction_col is not None:
        a = _band_matrix(t, spec.extinction_col, bands, "extinction", spec.vector_bands)
        if not np.all(np.isfinite(a)):
            raise CatalogError(f"extinction {spec.extinction_col!r} has non-finite values")
        corr = 10.0 ** (0.4 * a)
        flux, sigma = flux * corr, sigma * corr
    cal = calibration_error_mag(bands, spec.calibration_error)
    if cal.any():
        sigma = add_calibration_error(flux, sigma, cal)
    mask = bf == 0
    flag = _row_flags(flux, ivar, z, bf, z_range=z_range, mask_bands=mask_bands,
                      min_bands=min_bands)
    counts, band_counts = _counts(flag, mask, bf, bands)
    empty = ((bf & BAND_EMPTY) > 0).all(0) if len(z) else np.zeros(len(bands), bool)
    if empty.any():
        warnings.warn(f"bands {[b for b, e in zip(bands, empty) if e]} have no usable value in "
                      "any row: masked everywhere", stacklevel=2)
    return Photometry(flux, sigma, z, flag, counts, bands, mask, bf, band_counts,
                      spec.describe(bands))


def _read_fluxes(t, bands, spec: ColumnSpec):
    """(flux [nanomaggies], ivar) (n, nb) of ``bands`` from the columns ``spec`` names."""
    if spec.vector_flux is not None:
        for c in (spec.vector_flux, spec.vector_ivar):
            if c not in t.colnames:
                raise CatalogError(f"catalog has no column {c!r}")
        flux = np.ma.filled(np.ma.asarray(t[spec.vector_flux], float), np.nan)
        ivar = np.ma.filled(np.ma.asarray(t[spec.vector_ivar], float), np.nan)
        vb = spec.vector_bands
        n_el = len(bands) if vb is None else len(vb)
        if flux.ndim != 2 or flux.shape[1] != n_el or ivar.shape != flux.shape:
            raise CatalogError(f"{spec.vector_flux}/{spec.vector_ivar} must have shape "
                               f"(n, {n_el})" + ("" if vb is None else
                                                 f" (one element per band of {list(vb)})"))
        if vb is not None:
            idx = _element_index(vb, bands, spec.vector_flux)
            flux, ivar = flux[:, idx], ivar[:, idx]
        return flux, ivar
    if spec.band_columns is not None:
        have = {b: (f, i) for b, f, i in spec.band_columns}
        gone = [b for b in bands if b not in have]
        if gone:
            raise CatalogError(f"band_columns give no columns for bands {gone}")
        fc, ic = [have[b][0] for b in bands], [have[b][1] for b in bands]
    else:
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
