"""What several commands share: user errors, output checks, meshes and hosts, the model."""
from __future__ import annotations

import argparse
import functools
import warnings
from pathlib import Path

from sedflow_jax import parallel as par
from sedflow_jax.io.tables import HDF5_EXTENSIONS
from sedflow_jax.sed import model as sed_model


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


class CommandFailed(Exception):
    """The command ran but its work failed (e.g. every galaxy of an MCMC run): printed as one
    line, exit code 1."""


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


def devices_type(s):
    s = str(s).strip().lower()
    if s in ("all", "local"):
        return "all"
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a device count or 'all', got {s!r}")
    if n < 1:
        raise argparse.ArgumentTypeError(f"device count must be >= 1, got {n}")
    return n


def mesh_from_args(a):
    """--devices -> a 1-d mesh over local devices (None for one device / not given)."""
    dev = getattr(a, "devices", None)
    if dev is None or dev == 1:
        return None
    try:
        return par.make_mesh(None if dev == "all" else dev)
    except ValueError as exc:
        raise CLIError(f"--devices {dev}: {exc}") from exc


def host_args(ap, what):
    g = ap.add_argument_group("several hosts (see docs/scaling.md)")
    g.add_argument("--num-processes", type=int, default=None,
                   help=f"number of hosts sharing the {what}")
    g.add_argument("--process-id", type=int, default=None,
                   help="this host's index in 0..num-processes-1: it computes the items "
                        "i %% num-processes == process-id (no communication between hosts)")
    g.add_argument("--coordinator", default=None,
                   help="HOST:PORT of process 0: join a jax.distributed job (barrier, then "
                        "process 0 merges the outputs)")
    g.add_argument("--distributed", action=argparse.BooleanOptionalAction, default=False,
                   help="join a jax.distributed job whose settings JAX detects (SLURM, Open MPI)")


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


def model_args(ap):
    ap.add_argument("--grid", default=None,
                    help="SSP grid: .npz (ours) or .h5 (DSPS); default: shipped BC03")
    ap.add_argument("--filters", nargs="+", default=None,
                    help="filter names (default sdss_u..sdss_z); shipped, speclite names")
    ap.add_argument("--z-max", type=float, default=1.0, help="largest redshift the model accepts")


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
