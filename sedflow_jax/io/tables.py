"""Tables on disk: file-format recognition and a row-range reader for catalogs too large for
memory (FITS memory-mapped, HDF5 through h5py)."""
from __future__ import annotations

import os
import warnings

import numpy as np

from .catalog import CatalogError, catalog_error

__all__ = ["FITS_EXTENSIONS", "HDF5_EXTENSIONS", "CatalogReader"]

FITS_EXTENSIONS = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz")
HDF5_EXTENSIONS = (".h5", ".hdf5", ".hdf", ".he5")


class CatalogReader:
    """Row-range reader of a catalog: FITS (memory-mapped), HDF5 (h5py: a compound table
    dataset, or a group of 1-d column datasets), an astropy Table, or any other format astropy
    reads (loaded whole)."""

    def __init__(self, catalog, *, hdu=None, hdf5_path=None):
        """Open ``catalog``; a missing or unreadable file raises a one-line
        :class:`~sedflow_jax.io.catalog.CatalogError` naming it (nothing left open)."""
        from astropy.table import Table

        self.kind, self.path, self._close = None, None, []
        if isinstance(catalog, Table):
            self.kind, self.table = "table", catalog
            self.n_rows = len(catalog)
            self.colnames = list(catalog.colnames)
            return
        path = os.path.abspath(os.fspath(catalog))
        self.path = path
        if not os.path.exists(path):
            raise CatalogError(f"{os.fspath(catalog)}: no such catalog file")
        try:
            self._open(path, hdu, hdf5_path)
        except CatalogError:
            self.close()
            raise
        except Exception as exc:  # noqa: BLE001 -- any reader failure is a bad catalog
            self.close()
            raise catalog_error(os.fspath(catalog), exc) from None

    def _open(self, path, hdu, hdf5_path):
        from astropy.table import Table

        low = path.lower()
        if low.endswith(FITS_EXTENSIONS):
            from astropy.io import fits

            hdul = fits.open(path, memmap=True)
            self._close.append(hdul)
            if hdu is None:
                hdu = next((i for i, h in enumerate(hdul)
                            if isinstance(h, (fits.BinTableHDU, fits.TableHDU))), None)
                if hdu is None:
                    raise CatalogError(f"{path}: no table HDU")
            h = hdul[hdu]
            self.kind, self.data, self.units = "fits", h.data, {}
            self.n_rows = int(h.header.get("NAXIS2", 0))
            self.colnames = list(h.columns.names)
            for c in h.columns:
                if c.unit:
                    self.units[c.name] = c.unit
        elif low.endswith(HDF5_EXTENSIONS):
            import h5py

            f = h5py.File(path, "r")
            self._close.append(f)
            obj = f[hdf5_path] if hdf5_path else None
            if obj is None:  # the only table dataset at the root, else the root group
                tabs = [k for k, v in f.items() if isinstance(v, h5py.Dataset)
                        and v.dtype.names and not k.endswith("__table_column_meta__")]
                obj = f[tabs[0]] if len(tabs) == 1 else f
            if isinstance(obj, h5py.Dataset):
                if not obj.dtype.names:
                    raise CatalogError(f"{path}:{obj.name} is not a table (compound) dataset")
                self.kind, self.ds = "h5table", obj
                self.n_rows = int(obj.shape[0])
                self.colnames = list(obj.dtype.names)
            else:
                cols = {k: v for k, v in obj.items() if isinstance(v, h5py.Dataset)
                        and v.ndim >= 1}
                lens = {v.shape[0] for v in cols.values()}
                if not cols or len(lens) != 1:
                    raise CatalogError(f"{path}:{obj.name}: expected a table dataset or a group of "
                                     "column datasets of equal length (use hdf5_path=)")
                self.kind, self.cols = "h5cols", cols
                self.n_rows = lens.pop()
                self.colnames = list(cols)
        else:
            self.kind, self.table = "table", Table.read(path)
            warnings.warn(f"{path}: only FITS and HDF5 catalogs are read in chunks; this one is "
                          "loaded whole", stacklevel=4)
            self.n_rows = len(self.table)
            self.colnames = list(self.table.colnames)

    @property
    def widths(self) -> dict:
        """{column: elements per row} (1 for plain columns; vector columns such as NMGY more),
        for :func:`sedflow_jax.io.catalog.resolve_layout` and ``catalog_bands``."""
        if self.kind == "table":
            dt = {c: self.table[c].shape[1:] for c in self.colnames}
        elif self.kind == "fits":
            dt = {c: self.data.dtype[c].shape for c in self.colnames}
        elif self.kind == "h5table":
            dt = {c: self.ds.dtype[c].shape for c in self.colnames}
        else:
            dt = {c: self.cols[c].shape[1:] for c in self.colnames}
        return {c: int(np.prod(s)) if s else 1 for c, s in dt.items()}

    def fingerprint(self) -> dict:
        d = {"n_rows": self.n_rows, "kind": self.kind}
        if self.path is not None:
            d.update(path=self.path, bytes=os.path.getsize(self.path))
        return d

    def read(self, start: int, stop: int, columns):
        """Rows [start, stop) of ``columns`` as an astropy Table; a column the catalog lacks
        raises a one-line :class:`~sedflow_jax.io.catalog.CatalogError`."""
        from astropy.table import Table

        missing = [c for c in columns if c not in self.colnames]
        if missing:
            raise CatalogError(f"{self.path or 'catalog'}: no column(s) {missing} (a ColumnSpec "
                               "must be resolved for this catalog first: spec.resolve(reader, "
                               "bands))")
        if self.kind == "table":
            return self.table[list(columns)][start:stop]
        t = Table()
        if self.kind == "fits":
            sub = self.data[start:stop]
            for c in columns:
                a = np.array(sub[c])
                t[c] = a.astype(a.dtype.newbyteorder("=")) if a.dtype.byteorder == ">" else a
                if c in self.units:
                    t[c].unit = self.units[c]
        elif self.kind == "h5table":
            sub = self.ds[start:stop]
            for c in columns:
                t[c] = np.asarray(sub[c])
        else:
            for c in columns:
                t[c] = np.asarray(self.cols[c][start:stop])
        return t

    def close(self):
        for h in self._close:
            try:
                h.close()
            except Exception:  # pragma: no cover
                pass
        self._close = []
