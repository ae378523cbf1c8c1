"""What several commands share: user errors, output checks, meshes and hosts, the model."""
from __future__ import annotations

import functools
import warnings
from pathlib import Path

from sedflow_jax import parallel as par
from sedflow_jax.io.tables import HDF5_EXTENSIONS
from sedflow_jax.sed import model as sed_model

from .args import CLIError


EXAMPLE_THETA = [10.5, 0.25, 0.25, 0.25, 0.25, 0.1, 2.0, 1e-3, 1e-3, 0.5, 0.5, -0.3]


def write_table(t, path, overwrite, *, format=None):
    """astropy Table.write, FITS header warnings (long keys, dict meta) silenced. ``format``:
    astropy's format name (needed for a temporary name without the target's extension)."""
    hdf5 = format == "hdf5" if format else str(path).lower().endswith(HDF5_EXTENSIONS)
    kw = {"path": "summary", "serialize_meta": True} if hdf5 else {}
    if format:
        kw["format"] = format
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*HIERARCH.*")
        warnings.filterwarnings("ignore", message=".*cannot be added to FITS Header.*")
        warnings.filterwarnings("ignore", category=UserWarning, module="astropy")
        t.write(path, overwrite=overwrite, **kw)


def refuse_existing(path, overwrite, what="output", hint="use --overwrite"):
    if path is not None and Path(path).exists() and not overwrite:
        raise CLIError(f"{what} {path} exists ({hint})")


def mesh_from_args(a):
    """--devices -> a 1-d mesh over local devices (None for one device / not given)."""
    dev = getattr(a, "devices", None)
    if dev is None or dev == 1:
        return None
    try:
        return par.make_mesh(None if dev == "all" else dev)
    except ValueError as exc:
        raise CLIError(f"--devices {dev}: {exc}") from exc


def host_split(a):
    """-> (hosts for simulate / infer_catalog_streaming or None, jax.distributed job?)."""
    p, n = a.process_id, a.num_processes
    if n is not None and p is not None and not 0 <= p < n:
        raise CLIError(f"need 0 <= --process-id < --num-processes, got {p} and {n}")
    if a.coordinator or a.distributed:
        try:
            pidx, pcount = par.initialize(a.coordinator, num_processes=n, process_id=p)
        except Exception as exc:  # noqa: BLE001 -- connection errors of any kind
            raise CLIError(f"jax.distributed.initialize failed: {exc}") from exc
        return (pidx, pcount), True
    if (p is None) != (n is None):
        raise CLIError("give both --process-id and --num-processes (or --coordinator / "
                       "--distributed for a jax.distributed job)")
    return ((p, n) if n is not None and n > 1 else None), False


def out_dir(path, overwrite):
    p = Path(path)
    if p.exists() and any(p.iterdir()) and not overwrite:
        raise CLIError(f"output folder {p} exists and is not empty (use --overwrite)")
    p.mkdir(parents=True, exist_ok=True)
    return p


@functools.lru_cache(maxsize=4)
def cached_model(grid, filters, z_max):
    """load_model, memoised: several commands run in one process (tests, scripts calling
    ``main``) share the model and hence its compiled kernels."""
    return sed_model.load_model(grid=grid, filters=None if filters is None else list(filters),
                                z_max=z_max)


def get_model(grid=None, filters=None, z_max=1.0):
    return cached_model(grid, None if filters is None else tuple(filters), float(z_max))


def load_model(a):
    return get_model(a.grid, a.filters, a.z_max)
