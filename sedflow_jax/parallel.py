"""Scale-out: device meshes, sharded photometry, multi-host training sets, streaming inference.

The same functions run on one CPU, on N local devices (GPUs, or virtual CPU devices from
``XLA_FLAGS=--xla_force_host_platform_device_count=N``) and on many hosts started with
``jax.distributed.initialize``. Parallelism never changes the numbers beyond float rounding:
every random draw is keyed by a *global* index (a simulation block, a catalog row), never by a
device, a host or a chunk.

Three levels, each opt-in:

* **devices of one process** -- a 1-d :class:`jax.sharding.Mesh` (:func:`make_mesh`). Batches
  are split along its ``'data'`` axis (padded to a multiple of the device count, trimmed after):
  :func:`sharded_phot_batch` (``shard_map`` of ``model.phot_batch``), ``simulate(mesh=...)``
  (each block's photometry split over the devices), ``train.fit(mesh=...)`` (data-parallel
  training: batch sharded, parameters replicated, XLA inserts the gradient all-reduce) and
  :func:`sample_rows` / :func:`infer_catalog_streaming` (posterior draws split over devices).
* **hosts** -- independent processes sharing a folder. Host ``p`` of ``P`` takes the work items
  ``i`` with ``i % P == p`` (:func:`host_partition`): training-set shards in
  ``simulate(hosts=(p, P))`` (per-host manifest parts ``manifest.host{p}.json`` joined by
  :func:`merge_manifests`) and catalog chunks in :func:`infer_catalog_streaming`. Items already
  on disk are never recomputed, so hosts may be killed and restarted, even with another ``P``.
  No collective communication is needed; :func:`simulate_distributed` / :func:`infer_distributed`
  add a ``jax.distributed`` barrier so that process 0 can finalise the output.
* **global meshes** (``make_mesh('global')`` after ``jax.distributed.initialize``) for
  data-parallel training over several hosts: every host iterates the same batches and feeds
  the rows its devices hold.

Streaming inference (:func:`infer_catalog_streaming`) reads a FITS (memory-mapped) or HDF5
catalog in chunks of ``chunk_rows`` rows, draws the posterior of every usable row (catalog row
``g`` in rejection round ``r`` uses ``fold_in(fold_in(key, r), g)``, so the draws depend on
neither the chunking nor the devices nor the hosts), writes one part file per chunk atomically
and, once all chunks exist, assembles them in row order into one HDF5 file. A killed run
continues at the first missing chunk; nothing is lost or duplicated.

Public API: ``make_mesh``, ``mesh_size``, ``replicate``, ``pad_rows``, ``shard_rows``,
``sharded_phot_batch``, ``sharded_phot_fn``, ``process_info``, ``initialize``, ``barrier``,
``host_partition``, ``merge_manifests``, ``simulate_distributed``, ``sample_rows``,
``infer_catalog_streaming``, ``finalize_inference``, ``infer_distributed``,
``InferenceResult``, ``read_inference``.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import io
import json
import math
import os
import shutil
import time
import warnings
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from . import simulation as S

__all__ = [
    "DATA_AXIS",
    "make_mesh",
    "mesh_size",
    "replicate",
    "pad_rows",
    "shard_rows",
    "sharded_phot_fn",
    "sharded_phot_batch",
    "process_info",
    "initialize",
    "barrier",
    "host_partition",
    "merge_manifests",
    "simulate_distributed",
    "sample_rows",
    "InferenceResult",
    "infer_catalog_streaming",
    "finalize_inference",
    "infer_distributed",
    "read_inference",
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


def _row_spec(mesh: Mesh) -> P:
    """Rows split over every axis of the mesh."""
    names = tuple(mesh.axis_names)
    return P(names[0] if len(names) == 1 else names)


def _place(x, sharding):
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    host = np.asarray(x)  # every process holds the same value; each feeds its own devices
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def replicate(tree, mesh: Mesh):
    """Every array leaf of ``tree`` replicated on all devices of ``mesh`` (works for meshes
    spanning several processes when every process passes the same values)."""
    sh = NamedSharding(mesh, P())
    return jax.tree_util.tree_map(lambda a: _place(a, sh), tree)


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
    return _place(padded, NamedSharding(mesh, _row_spec(mesh))), n


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
        spec = _row_spec(self.mesh)
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
def _atomic_write_shared(path: str, data: bytes) -> None:
    """Atomic write of a file that several hosts may write at once: a temporary name unique
    across machines (host name, pid, random), then ``os.replace``."""
    import socket
    import uuid

    tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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


# =============================================================================================
# multi-host training sets
# =============================================================================================
def merge_manifests(out, *, strict: bool = True, verify: bool = False) -> Optional[dict]:
    """Join the per-host manifest parts (``manifest.host{p}.json``) of a training-set folder
    into its ``manifest.json``.

    Every shard of the plan (``n`` rows in ``rows_per_shard`` shards) must be listed by some
    part (or by an earlier ``manifest.json``) with the planned row range and exist on disk; the
    merged shard list covers rows ``0..n`` exactly once (a shard listed by several parts, e.g.
    after restarts with another process count, is taken once). ``verify=True`` hashes every
    shard against its sha256 (otherwise only existence and size are checked, and a file is
    hashed only when two parts disagree about it).

    Returns the merged manifest, or None when ``strict=False`` and shards are still missing.
    Raises ValueError (parts with different configurations, missing or corrupt shards with
    ``strict``) or FileNotFoundError (no parts).
    """
    folder = os.path.abspath(os.fspath(out))
    part_files = sorted(glob.glob(os.path.join(folder, S.HOST_MANIFEST_PATTERN.format("*"))))
    if not part_files:
        if strict:
            raise FileNotFoundError(f"{folder}: no per-host manifest parts (manifest.host*.json)")
        return None
    parts = [(os.path.basename(p), S.read_manifest(p)) for p in part_files]
    main_path = os.path.join(folder, S.MANIFEST_NAME)
    shas = {m["config_sha256"] for _, m in parts}
    if len(shas) > 1:
        raise ValueError(f"{folder}: the manifest parts hold different configurations "
                         f"({', '.join(n for n, _ in parts)}); re-run the stale hosts with the "
                         "same arguments, or remove their parts")
    base = parts[0][1]
    sources = list(parts)
    if os.path.exists(main_path):
        main = S.read_manifest(main_path)
        if main.get("config_sha256") == base["config_sha256"]:
            sources.append((S.MANIFEST_NAME, main))
    n = int(base["n"])
    rps = int(base["layout"]["rows_per_shard"])
    if any(int(m["layout"]["rows_per_shard"]) != rps for _, m in sources):
        raise ValueError(f"{folder}: the manifests disagree on the shard size")
    n_shards = math.ceil(n / rps)

    by_index: dict = {}
    for name, m in sources:
        for e in m.get("shards", []):
            i = int(e["index"])
            want = (i * rps, min(n, (i + 1) * rps))
            if not 0 <= i < n_shards or (e["row_start"], e["row_stop"]) != want:
                raise ValueError(f"{folder}/{name}: shard {i} has rows "
                                 f"[{e['row_start']}, {e['row_stop']}), the plan says {want}")
            by_index.setdefault(i, []).append(e)

    chosen, problems = [], []
    for i in range(n_shards):
        es = by_index.get(i, [])
        if not es:
            problems.append(f"shard {i} not done")
            continue
        path = os.path.join(folder, es[0]["file"])
        if not os.path.isfile(path):
            problems.append(f"{es[0]['file']} missing")
            continue
        distinct = {e.get("sha256") for e in es}
        if verify or len(distinct) > 1:
            h = S._sha256_file(path)
            e = next((e for e in es if e.get("sha256") == h), None)
            if e is None:
                problems.append(f"{es[0]['file']} does not match its manifest entry")
                continue
        else:
            e = es[0]
            if e.get("bytes") is not None and os.path.getsize(path) != int(e["bytes"]):
                problems.append(f"{e['file']} has {os.path.getsize(path)} bytes, manifest "
                                f"says {e['bytes']}")
                continue
        chosen.append(e)
    if problems:
        if strict:
            raise ValueError(f"{folder}: cannot merge the host manifests: "
                             + "; ".join(problems[:10])
                             + (f" (and {len(problems) - 10} more)" if len(problems) > 10 else "")
                             + ". Finish (or restart) the hosts with the same arguments.")
        return None
    # exact cover of 0..n, in order
    stop = 0
    for e in chosen:
        if e["row_start"] != stop:
            raise ValueError(f"{folder}: rows [{stop}, {e['row_start']}) are not covered")
        stop = e["row_stop"]
    if stop != n:
        raise ValueError(f"{folder}: shards cover {stop} of {n} rows")

    tot = S._sum_counts(e["counts"] for e in chosen)
    comp = sum(e["timing"]["compute_s"] for e in chosen)
    wr = sum(e["timing"]["write_s"] for e in chosen)
    sessions, seen = [], set()
    for _, m in sources:
        for sess in m.get("sessions", []):
            k = json.dumps(sess, sort_keys=True, default=str)
            if k not in seen:
                seen.add(k)
                sessions.append(sess)
    sessions.sort(key=lambda s_: s_.get("started", ""))
    merged = {k: v for k, v in base.items() if k != "host"}
    merged.update(
        complete=True,
        created=min(m.get("created", S._now()) for _, m in sources),
        updated=S._now(),
        shards=chosen,
        n_rows_done=tot["n_rows"],
        n_kept=tot["n_kept"],
        n_dropped=tot["n_dropped"],
        dropped=tot["dropped"],
        flagged=tot["flagged"],
        timings={"compute_s": comp, "write_s": wr,
                 "galaxies_per_s_compute": tot["n_rows"] / comp if comp > 0 else None},
        sessions=sessions,
        hosts={"parts": [nm for nm, _ in parts],
               "process_counts": sorted({int(m["host"]["process_count"]) for _, m in parts
                                         if "host" in m})},
    )
    data = json.dumps(S._jsonable(merged), indent=1, allow_nan=True).encode() + b"\n"
    _atomic_write_shared(os.path.join(folder, S.MANIFEST_NAME), data)
    return S._jsonable(merged)


def simulate_distributed(key_or_seed, n, model=None, prior=None, noise=None, *, out,
                         mesh=None, **kw):
    """:func:`sedflow_jax.simulation.simulate` on every process of a ``jax.distributed`` job.

    Each process computes its share of the shards (``hosts='auto'``) into the shared folder
    ``out``, optionally split over its local devices (``mesh``); after a barrier process 0
    merges the manifests. Returns ``(this process's SimulationResult, merged manifest or None
    on the other processes)``. Call it with the same arguments on every process.
    """
    res = S.simulate(key_or_seed, n, model, prior, noise, out=out, mesh=mesh, hosts="auto", **kw)
    barrier("sedflow_jax.simulate.done")
    merged = None
    if jax.process_index() == 0:
        if jax.process_count() > 1:
            merged = merge_manifests(out)
        else:
            merged = S.read_manifest(out)
    barrier("sedflow_jax.simulate.merged")
    return res, merged


# =============================================================================================
# posterior draws keyed by global row
# =============================================================================================
@functools.lru_cache(maxsize=16)
def _sample_fn(graphdef, n: int, sampler: str, mesh):
    from flax import nnx

    def body(state, key, idx, xs):
        flow = nnx.merge(graphdef, state)

        def one(i, x):
            return flow.sample(jax.random.fold_in(key, i), x, n, sampler=sampler)

        return jax.vmap(one)(idx, xs)

    if mesh is None:
        return jax.jit(body)
    spec = _row_spec(mesh)
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), spec, spec),
                                 out_specs=spec, check_vma=False))


class _RowSampler:
    """Flow draws for rows ``idx`` with key ``fold_in(key, idx[j])`` (as flow.sample_batched
    does for position j), optionally over a mesh. Every call runs groups of one fixed size
    (``max_rows // n`` galaxies, a multiple of the device count; short groups are padded):
    compiling the sampler costs seconds, running a padded group milliseconds."""

    def __init__(self, flow, n: int, *, mesh=None, max_rows: int = 65536,
                 sampler: str = "prefix"):
        from flax import nnx

        self.n, self.mesh, self.d = int(n), mesh, flow.config.d_theta
        self.ndev = 1 if mesh is None else mesh_size(mesh, local=True)
        graphdef, state = nnx.split(flow)
        self.state = state if mesh is None else replicate(state, mesh)
        self.fn = _sample_fn(graphdef, self.n, sampler, mesh)
        g = max(1, int(max_rows) // max(self.n, 1))
        self.group = math.ceil(g / self.ndev) * self.ndev

    def from_sampling(self, s_out):
        """theta of sampling-space draws (m, n, 11), evaluated in padded groups (a bounded
        number of compilations whatever m is)."""
        from . import prior as prior_mod

        m = s_out.shape[0]
        step = self.group * max(1, 4096 // max(self.group * self.n, 1))
        padded, _ = pad_rows(np.nan_to_num(s_out), max(1, math.ceil(m / step)) * step)
        theta = np.concatenate([np.asarray(prior_mod.from_sampling(jnp.asarray(
            padded[i:i + step]))) for i in range(0, padded.shape[0], step)])[:m]
        return np.where(np.isnan(s_out[..., :1]), np.nan, theta)

    def __call__(self, key, idx, xs) -> np.ndarray:
        idx = np.asarray(idx, np.uint32)
        xs = np.asarray(xs, np.float32)
        m = idx.shape[0]
        out = np.empty((m, self.n, self.d), np.float32)
        key = key if self.mesh is None else replicate(key, self.mesh)
        pending = []  # dispatch every group first (asynchronous), then collect
        for s in range(0, m, self.group):
            e = min(m, s + self.group)
            ii, _ = pad_rows(idx[s:e], self.group)
            xx, _ = pad_rows(xs[s:e], self.group)
            if self.mesh is not None:
                sh = NamedSharding(self.mesh, _row_spec(self.mesh))
                ii, xx = _place(ii, sh), _place(xx, sh)
            pending.append((s, e, self.fn(self.state, key, ii, xx)))
        for s, e, r in pending:
            out[s:e] = np.asarray(jax.device_get(r))[: e - s]
        return out


def _as_key(key):
    if isinstance(key, (bool, np.bool_)):
        raise TypeError("key must be an int seed or a jax.random key")
    if isinstance(key, (int, np.integer)):
        return jax.random.key(int(key))
    k = jnp.asarray(key)
    if jnp.issubdtype(k.dtype, jax.dtypes.prng_key):
        return k
    if k.dtype == jnp.uint32 and k.ndim == 1:
        return jax.random.wrap_key_data(k)
    raise TypeError(f"key must be an int seed or a jax.random key, got {type(key).__name__}")


def _rejection(posterior, sampler: _RowSampler, key, xs, rows, n: int, max_rounds: int):
    """posterior.sample_batched's prior-support rejection, with row-keyed draws."""
    from . import posterior as post_mod
    from . import prior as prior_mod

    xs = np.atleast_2d(np.asarray(xs, np.float32))
    rows = np.asarray(rows, np.int64)
    if rows.shape != (xs.shape[0],):
        raise ValueError(f"rows must have shape ({xs.shape[0]},), got {rows.shape}")
    if rows.size and (rows.min() < 0 or rows.max() >= 2 ** 32):
        raise ValueError("rows must be in [0, 2**32)")
    m, d = xs.shape[0], posterior.flow.config.d_theta
    if m == 0:
        z0 = np.zeros(0)
        return post_mod.Samples(theta=np.zeros((0, n, prior_mod.N_PARAMS), np.float32),
                                s=np.zeros((0, n, d), np.float32), acceptance=z0,
                                n_accepted=z0.astype(np.int64), low_acceptance=z0.astype(bool),
                                ood=z0.astype(bool))
    ood = posterior.out_of_support(xs)
    finite = np.isfinite(xs).all(1)
    lo, hi = (np.asarray(a, np.float32) for a in prior_mod.sampling_bounds(posterior.prior))
    s_out = np.full((m, n, d), np.nan, np.float32)
    filled = np.zeros(m, np.int64)
    drawn = np.zeros(m, np.int64)
    inside = np.zeros(m, np.int64)
    todo = np.flatnonzero(finite)
    for r in range(max_rounds):
        if todo.size == 0:
            break
        draws = posterior.flow_to_sampling(sampler(jax.random.fold_in(key, r), rows[todo],
                                                   xs[todo]))
        # prior_mod.in_support in numpy (closed box, NaN outside): no shape-dependent compiles
        ok = np.all((draws >= lo) & (draws <= hi), axis=-1)
        drawn[todo] += n
        inside[todo] += ok.sum(1)
        slot = np.cumsum(ok, axis=1) - 1 + filled[todo][:, None]  # first accepted in order
        sel = ok & (slot < n)
        gi, ji = np.nonzero(sel)
        s_out[todo[gi], slot[gi, ji]] = draws[gi, ji]
        filled[todo] += sel.sum(1)
        todo = todo[filled[todo] < n]
    acc = np.where(drawn > 0, inside / np.maximum(drawn, 1), 0.0)
    theta = sampler.from_sampling(s_out)
    return post_mod.Samples(theta=theta, s=s_out, acceptance=acc, n_accepted=filled,
                            low_acceptance=(acc < post_mod.LOW_ACCEPTANCE) | (filled < n),
                            ood=ood)


def sample_rows(posterior, key, xs, rows, n: int, *, mesh=None, max_rounds: int = 20,
                max_rows: int = 65536, sampler: str = "prefix"):
    """``n`` posterior draws for each context ``xs[j]`` ((m, d_x)) identified by its global
    catalog row ``rows[j]`` (unique ints), with the prior-support rejection of
    :meth:`~sedflow_jax.posterior.AmortizedPosterior.sample_batched`.

    Row ``g`` in rejection round ``r`` uses the key ``fold_in(fold_in(key, r), g)``, so a
    galaxy's draws depend only on (key, g): not on which other rows share the call, on the
    chunking, on ``mesh`` (devices used to split the rows) or on ``max_rows``. With
    ``rows = arange(m)`` and ``max_rounds=1`` the draws equal ``posterior.sample_batched``'s.
    Returns :class:`sedflow_jax.posterior.Samples`.
    """
    smp = _RowSampler(posterior.flow, n, mesh=mesh, max_rows=max_rows, sampler=sampler)
    return _rejection(posterior, smp, _as_key(key), xs, rows, int(n), int(max_rounds))


# =============================================================================================
# streaming catalog inference
# =============================================================================================
INFER_FORMAT = "sedflow_jax.inference"
INFER_FORMAT_VERSION = 1
_RUN = "run.json"
_PART = "chunk_{:06d}.npz"
_FITS_EXT = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz")
_HDF5_EXT = (".h5", ".hdf5", ".hdf", ".he5")


class InferenceResult(NamedTuple):
    """What :func:`infer_catalog_streaming` returns.

    - ``out``: the final HDF5 path (exists when ``finalized``).
    - ``parts``: the work folder ``out + '.parts'`` (chunk files, ``run.json``, progress).
    - ``n_rows``, ``n_chunks``, ``chunk_rows``: the plan.
    - ``chunks_computed``: chunks this call computed; ``complete``: every chunk of the plan is
      on disk; ``finalized``: ``out`` was written (now or earlier).
    - ``timings``: seconds and galaxies/s of this call.
    """

    out: str
    parts: str
    n_rows: int
    n_chunks: int
    chunk_rows: int
    chunks_computed: int
    complete: bool
    finalized: bool
    timings: dict


class _Catalog:
    """Row-range reader of a catalog: FITS (memory-mapped), HDF5 (h5py: a compound table
    dataset, or a group of 1-d column datasets), an astropy Table, or any other format astropy
    reads (loaded whole)."""

    def __init__(self, catalog, *, hdu=None, hdf5_path=None):
        from astropy.table import Table

        self.kind, self.path, self._close = None, None, []
        if isinstance(catalog, Table):
            self.kind, self.table = "table", catalog
            self.n_rows = len(catalog)
            self.colnames = list(catalog.colnames)
            return
        path = os.path.abspath(os.fspath(catalog))
        self.path = path
        low = path.lower()
        if low.endswith(_FITS_EXT):
            from astropy.io import fits

            hdul = fits.open(path, memmap=True)
            self._close.append(hdul)
            if hdu is None:
                hdu = next((i for i, h in enumerate(hdul)
                            if isinstance(h, (fits.BinTableHDU, fits.TableHDU))), None)
                if hdu is None:
                    raise ValueError(f"{path}: no table HDU")
            h = hdul[hdu]
            self.kind, self.data, self.units = "fits", h.data, {}
            self.n_rows = int(h.header.get("NAXIS2", 0))
            self.colnames = list(h.columns.names)
            for c in h.columns:
                if c.unit:
                    self.units[c.name] = c.unit
        elif low.endswith(_HDF5_EXT):
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
                    raise ValueError(f"{path}:{obj.name} is not a table (compound) dataset")
                self.kind, self.ds = "h5table", obj
                self.n_rows = int(obj.shape[0])
                self.colnames = list(obj.dtype.names)
            else:
                cols = {k: v for k, v in obj.items() if isinstance(v, h5py.Dataset)
                        and v.ndim >= 1}
                lens = {v.shape[0] for v in cols.values()}
                if not cols or len(lens) != 1:
                    raise ValueError(f"{path}:{obj.name}: expected a table dataset or a group of "
                                     "column datasets of equal length (use hdf5_path=)")
                self.kind, self.cols = "h5cols", cols
                self.n_rows = lens.pop()
                self.colnames = list(cols)
        else:
            warnings.warn(f"{path}: only FITS and HDF5 catalogs are read in chunks; this one is "
                          "loaded whole", stacklevel=3)
            self.kind, self.table = "table", Table.read(path)
            self.n_rows = len(self.table)
            self.colnames = list(self.table.colnames)

    def fingerprint(self) -> dict:
        d = {"n_rows": self.n_rows, "kind": self.kind}
        if self.path is not None:
            d.update(path=self.path, bytes=os.path.getsize(self.path))
        return d

    def read(self, start: int, stop: int, columns):
        from astropy.table import Table

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


def _flow_sha256(posterior) -> str:
    from flax import nnx

    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(nnx.state(posterior.flow)):
        a = np.asarray(leaf)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(json.dumps(S._jsonable({"flow": posterior.flow.config.to_dict(),
                                     "prior": dataclasses.asdict(posterior.prior),
                                     "bands": list(posterior.bands),
                                     "x_lo": np.asarray(posterior.x_lo).tolist(),
                                     "x_hi": np.asarray(posterior.x_hi).tolist()}),
                        sort_keys=True).encode())
    return h.hexdigest()


def _atomic_json(path: str, obj) -> None:
    data = json.dumps(S._jsonable(obj), indent=1, sort_keys=True, allow_nan=True).encode()
    _atomic_write_shared(path, data + b"\n")


def _read_json(path: str):
    with open(path) as fh:
        return json.load(fh)


def _nanpercentile_rows(a, qs):
    """``np.nanpercentile(a, qs, axis=1)`` (linear interpolation) for a (m, n, p), vectorised
    (numpy's falls back to a Python loop over rows when NaNs are present)."""
    a = np.sort(np.asarray(a, np.float64), axis=1)  # NaN last
    k = np.isfinite(a).sum(1)  # (m, p)
    out = []
    for q in qs:
        pos = (k - 1) * (q / 100.0)
        i0 = np.clip(np.floor(pos).astype(np.int64), 0, None)
        i1 = np.clip(np.ceil(pos).astype(np.int64), 0, None)
        v0 = np.take_along_axis(a, i0[:, None, :], 1)[:, 0]
        v1 = np.take_along_axis(a, i1[:, None, :], 1)[:, 0]
        t = pos - np.floor(pos)
        v = np.where(t >= 0.5, v1 - (v1 - v0) * (1 - t), v0 + (v1 - v0) * t)
        out.append(np.where(k > 0, v, np.nan))
    return np.stack(out) if out else np.zeros((0,) + a.shape[:1] + a.shape[2:])


def _chunk_summary(posterior, samples, *, use, flag, z, rows, model, n_derived, z_fill,
                   chunk_rows, keep):
    """Per-row output columns of one chunk (all rows, unusable ones NaN / 0 / False)."""
    from . import catalog as C
    from . import posterior as post_mod
    from . import prior as prior_mod

    m = use.shape[0]
    cols = {name: keep[name] for name in keep}
    cols["row"] = rows.astype(np.int64)
    th = np.full((m, samples.theta.shape[1], prior_mod.N_PARAMS), np.nan, np.float32)
    th[use] = samples.theta
    with np.errstate(all="ignore"):
        q = _nanpercentile_rows(th, [16, 50, 84])
    for i, name in enumerate(prior_mod.PARAM_NAMES):
        cols[f"{name}_p50"] = q[1][:, i].astype(np.float64)
        cols[f"{name}_p16"] = q[0][:, i].astype(np.float64)
        cols[f"{name}_p84"] = q[2][:, i].astype(np.float64)
    if model is not None:
        # fixed shape (chunk_rows, k, 12) -> one compilation for every chunk
        zz = np.where(use & (z > 0) & (z <= model.config.z_max), z, z_fill)
        thp, _ = pad_rows(th, chunk_rows) if m < chunk_rows else (th, m)
        zp, _ = pad_rows(zz, chunk_rows) if m < chunk_rows else (zz, m)
        der = post_mod.derived_samples(model, thp, zp, n_derived)
        with np.errstate(all="ignore"):
            for name in post_mod.DERIVED:
                v = np.where(use[:, None], der[name][:m], np.nan)
                qq = _nanpercentile_rows(v[..., None], [16, 50, 84])[..., 0]
                cols[f"{name}_p50"], cols[f"{name}_p16"], cols[f"{name}_p84"] = qq[1], qq[0], qq[2]
    acc = np.zeros(m, np.float64)
    acc[use] = samples.acceptance
    nacc = np.zeros(m, np.int64)
    nacc[use] = samples.n_accepted
    low = np.zeros(m, bool)
    low[use] = samples.low_acceptance
    ood = np.zeros(m, bool)
    ood[use] = samples.ood
    ood |= (flag & C.FLAG_Z_RANGE) > 0
    cols.update(acceptance=acc, n_accepted=nacc, low_acceptance=low, ood=ood,
                flag=flag.astype(np.int64))
    return cols, th


def _progress_name(pidx: int, pcount: int) -> str:
    return "progress.json" if pcount == 1 else f"progress.host{pidx}.json"


def _done_chunks(parts: str, mine, config_sha: str) -> dict:
    """index -> progress entry for this writer's chunks present on disk (atomic files: a part
    that exists is complete; its entry is checked by size, or rebuilt from the file)."""
    listed = {}
    for p in glob.glob(os.path.join(parts, "progress*.json")):
        try:
            pr = _read_json(p)
        except (OSError, json.JSONDecodeError):
            continue
        if pr.get("config_sha256") != config_sha:
            continue
        for e in pr.get("chunks", []):
            listed.setdefault(int(e["index"]), e)
    done = {}
    for c in mine:
        path = os.path.join(parts, c["file"])
        if not os.path.isfile(path):
            continue
        e = listed.get(c["index"])
        if e is not None and e.get("bytes") == os.path.getsize(path) and \
                (e["row_start"], e["row_stop"]) == (c["row_start"], c["row_stop"]):
            done[c["index"]] = e
            continue
        try:  # written but not yet recorded (killed in between): check the file itself
            with open(path, "rb") as fh:
                data = fh.read()
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                meta = json.loads(str(z["__meta__"]))
            ok = (meta.get("config_sha256") == config_sha and meta.get("index") == c["index"]
                  and (meta["row_start"], meta["row_stop"]) == (c["row_start"], c["row_stop"]))
        except Exception:
            ok = False
        if ok:
            done[c["index"]] = {k: c[k] for k in ("index", "file", "row_start", "row_stop")}
            done[c["index"]].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
        else:
            os.remove(path)  # not ours / corrupt: recompute
    return done


def infer_catalog_streaming(posterior, catalog, out, *, n_samples: int = 1000, key=0,
                            chunk_rows: int = 16384, max_rounds: int = 20,
                            max_rows: int = 65536, mesh=None, hosts=None, model=None,
                            n_derived: int = 500, store_samples: bool = False,
                            keep_columns: Sequence[str] = (), hdu=None, hdf5_path=None,
                            z_range="prior", flux_fmt: str = "flux_{band}",
                            ivar_fmt: str = "flux_ivar_{band}", z_col: str = "z",
                            vector_flux=None, vector_ivar=None, overwrite: bool = False,
                            finalize: Optional[bool] = None, keep_parts: Optional[bool] = None,
                            progress: bool = True, _stop_after_chunks: Optional[int] = None,
                            _on_chunk=None) -> InferenceResult:
    """Posterior summaries (and optionally samples) of every row of a catalog too large for
    memory, written to one HDF5 file; resumable, and splittable over devices and hosts.

    Args:
        posterior: :class:`sedflow_jax.posterior.AmortizedPosterior`.
        catalog: FITS (memory-mapped, first table HDU or ``hdu``) or HDF5 (``hdf5_path``: a
            table dataset or a group of column datasets; default the only table at the root,
            else the root group) path, or an astropy Table. Columns as
            :func:`sedflow_jax.catalog.read_photometry` reads them (``flux_fmt``, ...).
        out: the HDF5 file to write; the work folder is ``out + '.parts'``.
        n_samples, max_rounds: draws per galaxy and rejection rounds (as ``sample_batched``).
        key: int seed or ``jax.random`` key. Row g's draws depend only on (key, g).
        chunk_rows: catalog rows per chunk (part file, progress step); part of the run's
            configuration (resuming needs the same value), not of the values.
        max_rows: galaxies x samples per compiled sampling call (memory bound).
        mesh: local devices to split each chunk's sampling over (:func:`make_mesh`).
        hosts: ``(process_index, process_count)`` or ``'auto'``: this process computes the
            chunks i with ``i % process_count == process_index``.
        model: an SEDModel for derived-property summaries (``n_derived`` draws each); None
            skips them.
        store_samples: also store every draw, ``samples/theta`` (n_rows, n_samples, 12).
        keep_columns: catalog columns copied to the output (e.g. an id).
        z_range: rows outside it are flagged and not sampled; ``'prior'`` (default) uses the
            posterior's prior redshift range, None disables the cut.
        overwrite: discard a work folder / output holding a different configuration.
        finalize: assemble ``out`` when every chunk exists (default: yes for one process;
            several processes: whichever finds all chunks done, or :func:`finalize_inference`).
        keep_parts: keep the chunk files after assembling (default: False for one process,
            True for several, where another host may still be reading them).
        progress: tqdm bar over rows.

    Output (``out``, HDF5): ``summary``, a table (compound) dataset with one row per catalog row
    in order -- the ``keep_columns``, ``row``, ``<param>_p50/_p16/_p84`` for the 12 PROVABGS
    parameters, with ``model`` the derived properties likewise, ``acceptance``, ``n_accepted``,
    ``low_acceptance``, ``ood``, ``flag`` (:mod:`sedflow_jax.catalog` bits; unusable rows hold
    NaN / 0) -- readable with ``astropy.table.Table.read(out, path='summary')``; with
    ``store_samples`` ``samples/theta``; attributes ``run`` (JSON: the configuration and its
    sha256), ``stats`` (JSON: usable rows, mean acceptance, ...), ``param_names``, ``bands``.
    Each row is written exactly once: nothing is duplicated or lost across kills.

    Work folder (``out + '.parts'``): ``run.json`` (configuration), ``chunk_{i:06d}.npz`` (one
    per finished chunk, written atomically), ``progress.json`` (``progress.host{p}.json`` per
    host): the finished chunks with their rows, sha256 and timing. A rerun with the same
    arguments skips the chunks on disk; other arguments are refused unless ``overwrite``.
    """
    from . import catalog as C

    t_start = time.perf_counter()
    n_samples, chunk_rows = int(n_samples), int(chunk_rows)
    if n_samples < 1 or chunk_rows < 1 or int(max_rounds) < 1:
        raise ValueError("n_samples, chunk_rows and max_rounds must be >= 1")
    pidx, pcount = S._resolve_hosts(hosts)
    multi = pcount > 1
    if finalize is None:
        finalize = True
    if keep_parts is None:
        keep_parts = multi
    if mesh is not None:
        mesh_size(mesh, local=True)
    key = _as_key(key)
    out = os.path.abspath(os.fspath(out))
    parts = out + ".parts"
    bands = tuple(posterior.bands)
    zr = (posterior.prior.zmin, posterior.prior.zmax) if isinstance(z_range, str) and \
        z_range == "prior" else (None if z_range is None else tuple(float(v) for v in z_range))
    if vector_flux is not None:
        needed = [vector_flux, vector_ivar, z_col]
    else:
        needed = [flux_fmt.format(band=b) for b in bands] + \
                 [ivar_fmt.format(band=b) for b in bands] + [z_col]
    keep_columns = [str(c) for c in keep_columns]
    cat = _Catalog(catalog, hdu=hdu, hdf5_path=hdf5_path)
    try:
        missing = [c for c in dict.fromkeys(needed + keep_columns) if c not in cat.colnames]
        if missing:
            raise C.CatalogError(f"catalog is missing columns {missing} "
                                 f"(have {cat.colnames[:20]})")
        columns = list(dict.fromkeys(needed + keep_columns))
        config = {
            "format": INFER_FORMAT, "format_version": INFER_FORMAT_VERSION,
            "catalog": cat.fingerprint(), "chunk_rows": chunk_rows, "n_samples": n_samples,
            "key_data": np.asarray(jax.random.key_data(key)).ravel().tolist(),
            "key_impl": str(jax.random.key_impl(key)), "max_rounds": int(max_rounds),
            "posterior_sha256": _flow_sha256(posterior), "bands": list(bands),
            "z_range": zr, "columns": {"flux_fmt": flux_fmt, "ivar_fmt": ivar_fmt,
                                       "z_col": z_col, "vector_flux": vector_flux,
                                       "vector_ivar": vector_ivar},
            "keep_columns": keep_columns, "store_samples": bool(store_samples),
            "derived": None if model is None else {
                "n_derived": int(n_derived), "filters": list(model.filter_names),
                "model_tables_sha256": S._tables_sha256(model.tables)},
        }
        config = json.loads(json.dumps(S._jsonable(config)))
        config_sha = hashlib.sha256(S._canon(config).encode()).hexdigest()
        n_rows = cat.n_rows
        n_chunks = max(1, math.ceil(n_rows / chunk_rows)) if n_rows else 0
        plan = [{"index": i, "file": _PART.format(i), "row_start": i * chunk_rows,
                 "row_stop": min(n_rows, (i + 1) * chunk_rows)} for i in range(n_chunks)]
        mine = [c for c in plan if c["index"] % pcount == pidx]

        # -- an existing output / work folder ------------------------------------------------
        if os.path.exists(out) and not overwrite:
            got = _output_config_sha(out)
            if got == config_sha:
                return InferenceResult(out, parts, n_rows, n_chunks, chunk_rows, 0, True, True,
                                       {"total_s": time.perf_counter() - t_start})
            raise ValueError(f"{out} exists and holds another inference run (or is not one); "
                             "pass overwrite=True or choose another path")
        run_path = os.path.join(parts, _RUN)
        if os.path.isdir(parts):
            if os.path.exists(run_path):
                try:
                    run = _read_json(run_path)
                except (OSError, json.JSONDecodeError):
                    run = {}
                if run.get("config_sha256") != config_sha:
                    if not overwrite:
                        raise ValueError(f"{parts} holds chunks of another inference run; pass "
                                         "overwrite=True to discard them, or choose another out")
                    _clear_parts(parts, multi, pidx, pcount)
            elif glob.glob(os.path.join(parts, "chunk_*.npz")):
                if not overwrite:
                    raise ValueError(f"{parts} holds chunk files but no {_RUN}; pass "
                                     "overwrite=True to discard them")
                _clear_parts(parts, multi, pidx, pcount)
            for p in glob.glob(os.path.join(parts, "*.tmp-*")):
                base = os.path.basename(p)
                i = _chunk_index(base)
                if not multi or (i is not None and i % pcount == pidx) or \
                        base.startswith(_progress_name(pidx, pcount)):
                    try:
                        os.remove(p)
                    except FileNotFoundError:
                        pass
        os.makedirs(parts, exist_ok=True)
        if overwrite and os.path.exists(out) and not multi:
            os.remove(out)
        # identical bytes whoever writes it (no timestamps): concurrent hosts are harmless
        _atomic_json(run_path, {"config": config, "config_sha256": config_sha,
                                "n_rows": n_rows, "n_chunks": n_chunks})

        done = _done_chunks(parts, mine, config_sha)
        todo = [c for c in mine if c["index"] not in done]
        prog_path = os.path.join(parts, _progress_name(pidx, pcount))
        entries = dict(done)

        def write_progress():
            _atomic_json(prog_path, {"config_sha256": config_sha, "process_index": pidx,
                                     "process_count": pcount, "n_chunks": n_chunks,
                                     "assigned": [c["index"] for c in mine],
                                     "chunks": [entries[i] for i in sorted(entries)],
                                     "updated": S._now()})

        write_progress()
        pbar = None
        if progress and todo:
            from tqdm.auto import tqdm

            pbar = tqdm(total=sum(c["row_stop"] - c["row_start"] for c in mine),
                        initial=sum(c["row_stop"] - c["row_start"] for c in mine
                                    if c["index"] in done),
                        unit="gal", unit_scale=True, desc="infer")
        sampler = _RowSampler(posterior.flow, n_samples, mesh=mesh, max_rows=max_rows) \
            if todo else None
        z_fill = 0.5 * model.config.z_max if model is not None else None
        t_loop = time.perf_counter()
        rows_done = 0
        computed = 0
        try:
            for c in todo:
                t0 = time.perf_counter()
                r0, r1 = c["row_start"], c["row_stop"]
                tab = cat.read(r0, r1, columns)
                ph = C.read_photometry(tab, bands, flux_fmt=flux_fmt, ivar_fmt=ivar_fmt,
                                       z_col=z_col, vector_flux=vector_flux,
                                       vector_ivar=vector_ivar, z_range=zr)
                x = C.to_conditioning(ph.flux, ph.sigma, ph.z)
                use = ph.flag == 0
                rows = np.arange(r0, r1, dtype=np.int64)
                smp = _rejection(posterior, sampler, key, x[use], rows[use], n_samples,
                                 int(max_rounds))
                keep = {k: np.asarray(tab[k]) for k in keep_columns}
                cols, th = _chunk_summary(posterior, smp, use=use, flag=ph.flag, z=ph.z,
                                          rows=rows, model=model, n_derived=n_derived,
                                          z_fill=z_fill, chunk_rows=chunk_rows, keep=keep)
                meta = {"config_sha256": config_sha, "index": c["index"], "row_start": r0,
                        "row_stop": r1, "columns": list(cols)}
                payload = {f"col_{k}": v for k, v in cols.items()}
                if store_samples:
                    payload["theta"] = th
                payload["__meta__"] = np.asarray(json.dumps(meta))
                buf = io.BytesIO()
                np.savez(buf, **payload)
                data = buf.getvalue()
                S._atomic_write_bytes(os.path.join(parts, c["file"]), data)
                e = {k: c[k] for k in ("index", "file", "row_start", "row_stop")}
                e.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data),
                         n_usable=int(use.sum()), seconds=time.perf_counter() - t0)
                entries[c["index"]] = e
                write_progress()
                rows_done += r1 - r0
                computed += 1
                if pbar is not None:
                    pbar.update(r1 - r0)
                if _on_chunk is not None:
                    _on_chunk(c["index"])
                if _stop_after_chunks is not None and computed >= int(_stop_after_chunks):
                    break
        finally:
            if pbar is not None:
                pbar.close()
        loop_s = time.perf_counter() - t_loop
    finally:
        cat.close()

    complete = all(os.path.isfile(os.path.join(parts, c["file"])) for c in plan)
    finalized = False
    if complete and finalize:
        finalize_inference(out, keep_parts=keep_parts)
        finalized = True
    timings = {"total_s": time.perf_counter() - t_start, "loop_s": loop_s,
               "rows_computed": rows_done,
               "galaxies_per_s": rows_done / loop_s if rows_done and loop_s > 0 else None}
    return InferenceResult(out, parts, n_rows, n_chunks, chunk_rows, computed, complete,
                           finalized, timings)


def _chunk_index(name: str):
    base = os.path.basename(name)
    if not base.startswith("chunk_"):
        return None
    d = base[len("chunk_"):].split(".", 1)[0]
    return int(d) if d.isdigit() else None


def _clear_parts(parts: str, multi: bool, pidx: int, pcount: int) -> None:
    for p in glob.glob(os.path.join(parts, "*")):
        base = os.path.basename(p)
        i = _chunk_index(base)
        own = (i is not None and i % pcount == pidx) or base.startswith(
            _progress_name(pidx, pcount))
        if not multi or own or base.startswith(_RUN):
            try:
                os.remove(p)
            except FileNotFoundError:
                pass


def _output_config_sha(out: str):
    import h5py

    try:
        with h5py.File(out, "r") as f:
            return json.loads(f.attrs["run"]).get("config_sha256")
    except Exception:
        return None


def _h5_dtype(a: np.ndarray):
    if a.dtype.kind == "U":  # h5py stores bytes, not numpy unicode
        return np.dtype(f"S{max(1, a.dtype.itemsize // 4 * 4)}")
    return a.dtype


def finalize_inference(out, *, keep_parts: bool = False) -> str:
    """Assemble the chunk files of ``out + '.parts'`` in row order into the HDF5 file ``out``
    (written to a temporary name, then renamed: a kill leaves no partial ``out``). Raises
    ValueError if chunks are missing. Returns ``out``."""
    import h5py

    out = os.path.abspath(os.fspath(out))
    parts = out + ".parts"
    run = _read_json(os.path.join(parts, _RUN))
    config, n_rows, n_chunks = run["config"], int(run["n_rows"]), int(run["n_chunks"])
    files = [os.path.join(parts, _PART.format(i)) for i in range(n_chunks)]
    missing = [os.path.basename(f) for f in files if not os.path.isfile(f)]
    if missing:
        raise ValueError(f"{parts}: {len(missing)} of {n_chunks} chunks missing "
                         f"({', '.join(missing[:5])}...); run infer_catalog_streaming again")
    import socket
    import uuid

    tmp = f"{out}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    stats = {"n_usable": 0, "acceptance_sum": 0.0, "low_acceptance": 0, "ood": 0,
             "flag_nonzero": 0}
    try:
        with h5py.File(tmp, "w") as f:
            dset = samp = None
            stop = 0
            for i, path in enumerate(files):
                with np.load(path, allow_pickle=False) as z:
                    meta = json.loads(str(z["__meta__"]))
                    if meta["config_sha256"] != run["config_sha256"] or meta["index"] != i or \
                            meta["row_start"] != stop:
                        raise ValueError(f"{path}: chunk does not belong here (meta {meta})")
                    cols = {k: z[f"col_{k}"] for k in meta["columns"]}
                    theta = z["theta"] if "theta" in z.files else None
                m = meta["row_stop"] - meta["row_start"]
                if dset is None:
                    dt = np.dtype([(k, _h5_dtype(v), v.shape[1:]) for k, v in cols.items()])
                    dset = f.create_dataset("summary", shape=(n_rows,), dtype=dt,
                                            chunks=(max(1, min(n_rows, 65536)),))
                    if theta is not None:
                        samp = f.create_dataset(
                            "samples/theta", shape=(n_rows,) + theta.shape[1:],
                            dtype=np.float32,
                            chunks=(max(1, min(n_rows, 256)),) + theta.shape[1:])
                rec = np.empty(m, dt)
                for k, v in cols.items():
                    rec[k] = np.char.encode(v, "utf-8") if v.dtype.kind == "U" else v
                dset[stop:stop + m] = rec
                if samp is not None:
                    samp[stop:stop + m] = theta
                use = cols["flag"] == 0
                stats["n_usable"] += int(use.sum())
                stats["acceptance_sum"] += float(cols["acceptance"][use].sum())
                stats["low_acceptance"] += int(cols["low_acceptance"][use].sum())
                stats["ood"] += int(cols["ood"].sum())
                stats["flag_nonzero"] += int((~use).sum())
                stop += m
            if stop != n_rows:
                raise ValueError(f"{parts}: chunks hold {stop} rows, the catalog {n_rows}")
            from . import prior as prior_mod
            from . import __version__

            f.attrs["format"] = INFER_FORMAT
            f.attrs["run"] = json.dumps(run)
            f.attrs["param_names"] = list(prior_mod.PARAM_NAMES)
            f.attrs["bands"] = list(config["bands"])
            f.attrs["n_rows"] = n_rows
            f.attrs["stats"] = json.dumps({**stats, "mean_acceptance": (
                stats["acceptance_sum"] / stats["n_usable"] if stats["n_usable"] else None)})
            f.attrs["sedflow_jax_version"] = str(__version__)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if not keep_parts:
        shutil.rmtree(parts, ignore_errors=True)
    return out


def read_inference(out, *, samples: bool = False):
    """``(summary astropy Table, theta samples (n, n_samples, 12) or None)`` of an output."""
    import h5py
    from astropy.table import Table

    with h5py.File(os.fspath(out), "r") as f:
        t = Table(f["summary"][...])
        for k in ("run", "stats"):
            t.meta[k] = json.loads(f.attrs[k])
        th = f["samples/theta"][...] if samples and "samples/theta" in f else None
    return t, th


def infer_distributed(posterior, catalog, out, *, mesh=None, keep_parts: bool = False, **kw):
    """:func:`infer_catalog_streaming` on every process of a ``jax.distributed`` job: each
    process takes its share of the chunks (over its local devices with ``mesh``), then after a
    barrier process 0 assembles ``out``. Call it with the same arguments on every process."""
    res = infer_catalog_streaming(posterior, catalog, out, mesh=mesh, hosts="auto",
                                  finalize=jax.process_count() == 1, keep_parts=keep_parts, **kw)
    barrier("sedflow_jax.infer.done")
    if jax.process_count() > 1 and jax.process_index() == 0:
        finalize_inference(out, keep_parts=keep_parts)
    barrier("sedflow_jax.infer.finalized")
    return res._replace(complete=True, finalized=True)
