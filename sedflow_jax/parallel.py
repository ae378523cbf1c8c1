"""Layer 0 of the package: device meshes, placement, row sharding and host partitions.

It imports nothing of the package: every layer above may use it.

The same functions run on one CPU, on N local devices (GPUs, or virtual CPU devices from
``XLA_FLAGS=--xla_force_host_platform_device_count=N``) and on many hosts started with
``jax.distributed.initialize``. Parallelism never changes the numbers beyond float rounding:
the callers key every random draw by a *global* index (a simulation block, a catalog row),
never by a device, a host or a chunk.

* **devices of one process** -- a 1-d :class:`jax.sharding.Mesh` (:func:`make_mesh`). Batches
  are split along its ``'data'`` axis (padded to a multiple of the device count, trimmed after):
  :func:`shard_rows`, :func:`sharded_phot_batch` (``shard_map`` of ``model.phot_batch``).
* **hosts** -- independent processes sharing a folder. Host ``p`` of ``P`` takes the work items
  ``i`` with ``i % P == p`` (:func:`host_partition`, :func:`resolve_hosts`): training-set shards
  (:func:`sedflow_jax.sim.simulate`) and catalog chunks (:func:`sedflow_jax.sbi.infer_catalog`
  with ``out=``). :func:`barrier` waits for every process of a ``jax.distributed`` job.
* **global meshes** (``make_mesh('global')`` after ``jax.distributed.initialize``) for
  data-parallel training over several hosts.

Public API: ``make_mesh``, ``mesh_size``, ``row_spec``, ``place``, ``replicate``, ``pad_rows``,
``shard_rows``, ``sharded_phot_batch``, ``sharded_phot_fn``, ``process_info``, ``initialize``,
``barrier``, ``host_partition``, ``resolve_hosts``.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


__all__ = [
    "DATA_AXIS",
    "make_mesh",
    "mesh_size",
    "row_spec",
    "place",
    "replicate",
    "pad_rows",
    "shard_rows",
    "sharded_phot_fn",
    "sharded_phot_batch",
    "process_info",
    "initialize",
    "barrier",
    "host_partition",
    "resolve_hosts",
]

DATA_AXIS = "data"


# =============================================================================================
# meshes and placement
# =============================================================================================
def make_mesh(devices=None, axis: str = DATA_AXIS) -> Mesh:
    """A 1-d mesh named ``axis`` for data parallelism.

    devices: None or ``'local'`` -- this process's devices (``jax.local_devices()``); an int
    ``k`` -- the first k local devices; ``'global'`` -- every device of every process
    (``jax.devices()``, for multi-host data-parallel training); or a sequence of devices.
    """
    if devices is None or (isinstance(devices, str) and devices == "local"):
        devs = jax.local_devices()
    elif isinstance(devices, str):
        if devices != "global":
            raise ValueError(f"devices must be None, 'local', 'global', an int or a list of "
                             f"devices; got {devices!r}")
        devs = jax.devices()
    elif isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        local = jax.local_devices()
        if not 1 <= int(devices) <= len(local):
            raise ValueError(f"asked for {devices} devices; this process has {len(local)} "
                             f"({local[0].platform}); on CPU set "
                             "XLA_FLAGS=--xla_force_host_platform_device_count=N before "
                             "importing jax")
        devs = local[: int(devices)]
    else:
        devs = list(devices)
        if not devs:
            raise ValueError("make_mesh needs at least one device")
    return Mesh(np.asarray(devs, dtype=object), (axis,))


def mesh_size(mesh: Mesh, *, local: bool = False) -> int:
    """Number of devices of ``mesh``; ``local=True`` also checks they all belong to this
    process (what per-process work such as ``simulate(mesh=...)`` needs)."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"expected a jax.sharding.Mesh (see make_mesh), got {type(mesh).__name__}")
    if local:
        me = jax.process_index()
        if any(d.process_index != me for d in mesh.devices.flat):
            raise ValueError("this mesh spans devices of other processes; per-process work "
                             "(simulate, inference) needs make_mesh() over local devices")
    return int(mesh.devices.size)


def row_spec(mesh: Mesh) -> P:
    """Rows split over every axis of the mesh."""
    names = tuple(mesh.axis_names)
    return P(names[0] if len(names) == 1 else names)


def place(x, sharding):
    """``x`` put on ``sharding`` (for a sharding spanning several processes, every process
    passes the same value and feeds its own devices)."""
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    host = np.asarray(x)  # every process holds the same value; each feeds its own devices
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def replicate(tree, mesh: Mesh):
    """Every array leaf of ``tree`` replicated on all devices of ``mesh`` (works for meshes
    spanning several processes when every process passes the same values)."""
    sh = NamedSharding(mesh, P())
    return jax.tree_util.tree_map(lambda a: place(a, sh), tree)


def pad_rows(a, multiple: int):
    """Pad ``a`` along axis 0 to a multiple of ``multiple`` by repeating its last row (padded
    rows are valid inputs; their results are discarded). Returns ``(padded, n)``."""
    a = np.asarray(a)
    n = a.shape[0]
    m = max(1, math.ceil(n / multiple)) * multiple
    if m == n:
        return a, n
    if n == 0:
        raise ValueError("cannot pad an empty batch")
    pad = np.broadcast_to(a[-1:], (m - n,) + a.shape[1:])
    return np.concatenate([a, pad]), n


def shard_rows(a, mesh: Mesh):
    """``a`` padded to a multiple of the mesh size and split along axis 0 over the mesh.
    Returns ``(global array, n)``; trim results with ``[:n]``."""
    padded, n = pad_rows(a, mesh_size(mesh))
    return place(padded, NamedSharding(mesh, row_spec(mesh))), n


# =============================================================================================
# sharded photometry
# =============================================================================================
class _ShardedPhot:
    """``phot_batch`` split over a mesh with ``shard_map``; hashable, so it can be a static
    argument of ``jax.jit`` (the simulation block kernel takes it as ``phot``)."""

    def __init__(self, phot, mesh: Mesh):
        self.phot, self.mesh = phot, mesh

    def __hash__(self):
        return hash((self.phot, self.mesh))

    def __eq__(self, other):
        return (isinstance(other, _ShardedPhot) and other.phot is self.phot
                and other.mesh == self.mesh)

    def __call__(self, theta, z, tables):
        spec = row_spec(self.mesh)
        f = jax.shard_map(self.phot, mesh=self.mesh, in_specs=(spec, spec, P()), out_specs=spec,
                          check_vma=False)
        return f(theta, z, tables)


def sharded_phot_fn(model, mesh: Mesh) -> _ShardedPhot:
    """``f(theta (n, 12), z (n,), tables) -> (n, n_filters)``: ``model.phot_batch`` with its
    rows split over ``mesh`` (n must be a multiple of the mesh size; usable inside ``jit``)."""
    mesh_size(mesh)
    return _ShardedPhot(model.phot_batch, mesh)


@functools.lru_cache(maxsize=8)
def _phot_jit(fn: _ShardedPhot):
    return jax.jit(fn)


@functools.lru_cache(maxsize=8)
def _replicated_tables(model, mesh):
    return replicate(model.tables, mesh)


def sharded_phot_batch(model, theta, z, mesh: Mesh):
    """Nanomaggies (n, n_filters) of theta (n, 12), z (n,), computed with the rows split over
    ``mesh`` (padded to a multiple of its size, trimmed after). Equal to
    ``model.phot_batch(theta, z, model.tables)`` up to float rounding. Returns a numpy array."""
    theta = np.asarray(theta, model.dtype)
    z = np.asarray(z, model.dtype)
    if theta.ndim != 2 or z.shape != theta.shape[:1]:
        raise ValueError(f"need theta (n, 12) and z (n,); got {theta.shape} and {z.shape}")
    th, n = shard_rows(theta, mesh)
    zz, _ = shard_rows(z, mesh)
    out = _phot_jit(sharded_phot_fn(model, mesh))(th, zz, _replicated_tables(model, mesh))
    return np.asarray(jax.device_get(out))[:n]


# =============================================================================================
# processes
# =============================================================================================


def process_info() -> tuple:
    """``(jax.process_index(), jax.process_count())``."""
    return int(jax.process_index()), int(jax.process_count())


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, **kw) -> tuple:
    """``jax.distributed.initialize`` (once; SLURM / Open MPI environments are detected by JAX
    when called without arguments). Returns :func:`process_info`."""
    if not jax.distributed.is_initialized():
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id, **kw)
    return process_info()


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def host_partition(n_items: int, process_index: Optional[int] = None,
                   process_count: Optional[int] = None) -> list:
    """Indices ``i < n_items`` with ``i % process_count == process_index`` (defaults: this
    process of ``jax.process_count()``): round-robin, so restarts with another process count
    still cover every item exactly once."""
    p, c = process_info()
    p = p if process_index is None else int(process_index)
    c = c if process_count is None else int(process_count)
    if c < 1 or not 0 <= p < c:
        raise ValueError(f"need 0 <= process_index < process_count, got ({p}, {c})")
    return list(range(p, int(n_items), c))


def resolve_hosts(hosts) -> tuple:
    """None -> (0, 1); 'auto' -> (jax.process_index(), jax.process_count()); (p, P) checked."""
    if hosts is None:
        return 0, 1
    if isinstance(hosts, str):
        if hosts != "auto":
            raise ValueError(f"hosts must be None, 'auto' or (process_index, process_count); "
                             f"got {hosts!r}")
        return process_info()
    try:
        pidx, pcount = (int(v) for v in hosts)
    except (TypeError, ValueError) as e:
        raise ValueError(f"hosts must be None, 'auto' or (process_index, process_count); got "
                         f"{hosts!r}") from e
    if pcount < 1 or not 0 <= pidx < pcount:
        raise ValueError(f"hosts=(process_index, process_count) needs 0 <= process_index < "
                         f"process_count; got {hosts!r}")
    return pidx, pcount
