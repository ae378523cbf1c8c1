"""Chunked, resumable, bit-reproducible SEDflow training sets (design spec sections 9.1-9.2).

Pipeline per galaxy (all in one jitted function, float32):

1. ``s ~ prior`` in the 11-dim sampling space (:data:`sedflow_jax.prior.SAMPLING_NAMES`:
   ``[logM, u1, u2, u3, fburst, tburst, log10 g1, log10 g2, tau_bc, tau_ism, n_dust]``, SEDflow's
   ``thetas_unt`` -- the flow's target), ``theta = from_sampling(s)`` the physical 12-vector,
   ``z ~ U(zmin, zmax)``;
2. noiseless fluxes ``f`` [nanomaggies] in the model's filters (``model.phot_batch``);
3. SEDflow's toy noise (:func:`sedflow_jax.noise.add_noise`): ``sigma_f`` and ``f_hat = f + n``;
4. conditioning ``x = [mag_b..., sigma_mag_b..., z]`` with ``mag = 22.5 - 2.5 log10 f_hat`` and
   ``sigma_mag = 2.5/ln10 * sigma_f / f_hat`` -- relative to the *noisy* flux, as a real catalog's
   errors are (:func:`sedflow_jax.noise.sigma_flux_to_mag` of observed flux and error).

Nothing is silently dropped. Every row gets a bit mask ``flags`` and a boolean ``keep``:

=====  =========================  ==============================================================
bit    reason                     meaning
=====  =========================  ==============================================================
1      ``model_flux_invalid``     a noiseless flux <= 0 or non-finite (or non-finite theta / z)
2      ``sigma_nonpositive``      a drawn sigma_f <= 0 or non-finite (SEDflow's cut)
4      ``out_of_range``           a noiseless flux outside the noise model's catalog flux range
                                  (SEDflow's cut; only drops the row when ``range_cut=True``)
8      ``noisy_flux_nonpositive`` a noisy flux <= 0: its magnitude is undefined (x holds NaN)
16     ``x_nonfinite``            any other non-finite entry of x
=====  =========================  ==============================================================

``keep`` is True when no *active* flag is set. Drop counts are reported twice: ``dropped`` assigns
each dropped row to its first reason in the order above (they sum to ``n_dropped``), ``flagged``
counts every condition (overlapping; ``out_of_range`` is counted even with ``range_cut=False``).
Dropped rows stay in the arrays; the readers filter on ``keep``.

Determinism: randomness is derived per fixed-size **block** of ``block`` rows (default 4096,
recorded in the manifest): block ``b`` uses ``jax.random.fold_in(key, b)`` and is evaluated by
one compiled function of fixed shape, so a row's values depend only on (key, block, row in
block) -- not on ``chunk``, on restarts, or on ``n`` (a run with a larger ``n`` extends a smaller
one). A chunk (= one shard on disk) is a whole number of blocks; the last block is computed in
full and trimmed, so nothing recompiles for the tail. Values are bit-identical on the same
backend and JAX version (recorded in the manifest; a resume on a different one warns).

Disk format (``out`` folder)::

    manifest.json        seed; config (key data, n, block, prior, noise model, grid, filters,
                         model config, sha256 of the model tables, ...); layout; shard list with
                         row ranges, sha256, per-shard keep/drop counts and timings; totals;
                         column names; versions
    shard_00000.npz ...  np.savez (uncompressed), one per chunk of ``rows_per_shard`` rows:
        theta    (m, 11) float32  the flow TARGET, sampling space (SAMPLING_NAMES) -- the key
                                  sedflow_jax.train.NpzShards / fit(data=dict) read as 'theta'
        theta12  (m, 12) float32  physical parameters (PARAM_NAMES)
        x        (m, 2*n_bands+1) float32  conditioning, columns ``manifest['x_names']``
        z        (m,) float32     redshift (also the last column of x)
        keep     (m,) bool        use this row for training
        flags    (m,) uint8       drop-reason bits (table above)
        flux, sigma, flux_model   (m, n_bands) float32 nanomaggies, only with include_flux:
                                  noisy flux, its sigma_f, and the noiseless model flux

Shards and the manifest are written atomically (temporary file + ``os.replace``) and the manifest
is rewritten after each shard, so a killed run leaves a consistent folder: calling
:func:`simulate` again with the same arguments verifies the shards present (sha256), computes
only the missing ones and ends bit-identical to an uninterrupted run. A folder holding a
*different* configuration is refused unless ``overwrite=True``.

Scale-out (opt-in, see :mod:`sedflow_jax.parallel` and ``docs/scaling.md``): ``mesh=`` splits
each block's photometry over local devices (values equal up to float rounding; the random draws
are identical); ``hosts=(p, P)`` makes this process compute only the shards ``i % P == p`` of a
shared folder, recorded in ``manifest.host{p}.json``; the merged ``manifest.json`` is written
once every shard exists (:func:`sedflow_jax.sim.merge_manifests`). Shards are found through
any manifest of the folder, so hosts can be restarted (also with another ``P``) without
duplicated or missing rows.

Readers: :func:`load_training_set` (concatenated arrays, ``keep`` rows only by default),
:func:`iter_shards`, :func:`read_manifest`, and :class:`ShardDataset`, a streaming data source
over the kept rows for :func:`sedflow_jax.train.fit` (it does not import the trainer). Do not
point ``train.NpzShards`` at raw shards: it would train on the dropped rows too.

Public API: ``simulate``, ``SimulationResult``, ``load_training_set``, ``iter_shards``,
``read_manifest``, ``ShardDataset``, ``x_names``, ``DROP_REASONS``, ``DEFAULT_BLOCK``.
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
import time
import warnings
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .. import parallel
from ..util import (atomic_write_bytes, atomic_write_json, canonical_json, jsonable, key_parts,
                    sha256_arrays, sha256_file, utc_now, versions)
from . import noise as noise_mod
from . import prior as prior_mod
from .layout import to_conditioning, x_names

__all__ = [
    "simulate",
    "SimulationResult",
    "read_manifest",
    "merge_manifests",
    "simulate_distributed",
    "tables_sha256",
    "DROP_REASONS",
    "DEFAULT_BLOCK",
    "FORMAT",
]

FORMAT = "sedflow_jax.training_set"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
#: per-host manifest part written by ``simulate(..., hosts=(p, P))`` with P > 1
HOST_MANIFEST_PATTERN = "manifest.host{}.json"
DEFAULT_BLOCK = 4096
SHARD_PATTERN = "shard_{:05d}.npz"

#: drop reasons in priority order; bit i of ``flags`` is reason i
DROP_REASONS = (
    "model_flux_invalid",
    "sigma_nonpositive",
    "out_of_range",
    "noisy_flux_nonpositive",
    "x_nonfinite",
)
_BIT = {r: 1 << i for i, r in enumerate(DROP_REASONS)}

#: names of the 12 physical parameters stored as 'theta12'
THETA12_NAMES = tuple(prior_mod.PARAM_NAMES)
#: names of the 11 flow-target coordinates stored as 'theta'
THETA_NAMES = tuple(prior_mod.SAMPLING_NAMES)


class SimulationResult(NamedTuple):
    """What :func:`simulate` returns.

    - ``out``: the output folder (absolute path), or None for an in-memory run.
    - ``n_requested``, ``n_kept``, ``n_dropped``: row counts (kept + dropped = requested).
    - ``dropped``: dict reason -> rows dropped for it (first reason, sums to ``n_dropped``).
    - ``flagged``: dict reason -> rows with that condition (overlapping).
    - ``timings``: this call's timings (seconds, rows computed, galaxies/s).
    - ``manifest``: the manifest dict (also written to ``out/manifest.json``).
    - ``complete``: False only when the run was stopped early (``_stop_after_shards``).
    - in-memory runs only (None otherwise), all rows including dropped ones:
      ``theta`` (n, 12) physical parameters, ``theta_s`` (n, 11) sampling-space target,
      ``x`` (n, 2 n_b + 1), ``z`` (n,), ``keep`` (n,) bool, ``flags`` (n,) uint8, and with
      ``include_flux`` ``flux``, ``sigma``, ``flux_model`` (n, n_b).
    """

    out: Optional[str]
    n_requested: int
    n_kept: int
    n_dropped: int
    dropped: dict
    flagged: dict
    timings: dict
    manifest: dict
    complete: bool = True
    theta: Any = None
    theta_s: Any = None
    x: Any = None
    z: Any = None
    keep: Any = None
    flags: Any = None
    flux: Any = None
    sigma: Any = None
    flux_model: Any = None

    def training_data(self) -> dict:
        """``{'theta': theta_s[keep], 'x': x[keep]}`` for :func:`sedflow_jax.train.fit`
        (in-memory runs; for folders use :func:`load_training_set` or :class:`ShardDataset`)."""
        if self.theta_s is None:
            raise ValueError("no arrays in memory: use load_training_set(result.out)")
        return {"theta": self.theta_s[self.keep], "x": self.x[self.keep]}


# ---------------------------------------------------------------------------------------------
# the jitted block kernel
# ---------------------------------------------------------------------------------------------
class _Block(NamedTuple):
    theta_s: Any  # (B, 11)
    theta: Any  # (B, 12)
    z: Any  # (B,)
    x: Any  # (B, 2 nb + 1)
    flags: Any  # (B,) uint8
    flux_model: Any  # (B, nb)
    flux: Any  # (B, nb)
    sigma: Any  # (B, nb)


@functools.partial(jax.jit, static_argnames=("phot", "prior", "block", "key_impl"))
def _simulate_block(key_data, b, tables, noise, *, phot, prior, block, key_impl):
    """Rows of block ``b``: every output depends only on (key, b, row within the block)."""
    key = jax.random.wrap_key_data(key_data, impl=key_impl)
    kb = jax.random.fold_in(key, b)
    k_theta, k_z, k_noise = jax.random.split(kb, 3)
    s = prior_mod.sample_sampling(k_theta, prior, block)
    theta = prior_mod.from_sampling(s)
    z = prior_mod.sample_redshift(k_z, prior, block)
    f = phot(theta, z, tables)
    noisy = noise_mod.add_noise(k_noise, noise, f, range_cut=False)
    fhat, sig = noisy.flux, noisy.sigma
    pos = fhat > 0
    x = to_conditioning(fhat, sig, z, xp=jnp)

    model_ok = (jnp.all(jnp.isfinite(f) & (f > 0), axis=-1) & jnp.isfinite(z)
                & jnp.all(jnp.isfinite(theta), axis=-1))
    conds = (
        ~model_ok,
        ~noisy.sigma_ok,
        ~noisy.in_range,
        ~jnp.all(pos, axis=-1),
        ~jnp.all(jnp.isfinite(x), axis=-1),
    )
    flags = jnp.zeros((block,), jnp.uint8)
    for i, c in enumerate(conds):
        flags = flags | (c.astype(jnp.uint8) << i)
    return _Block(s, theta, z, x, flags, f, fhat, sig)


# ---------------------------------------------------------------------------------------------
# helpers: keys, config, counts, files
# ---------------------------------------------------------------------------------------------


def tables_sha256(tables) -> str:
    """sha256 of a model's tables (a pytree of arrays): identifies the model in configs."""
    return sha256_arrays(jax.tree_util.tree_leaves(tables))


def _counts(flags: np.ndarray, keep: np.ndarray, keep_bits: int) -> dict:
    """Per-row flags -> counts: ``dropped`` by first *active* reason, ``flagged`` overlapping."""
    flags = np.asarray(flags, np.uint8)
    flagged = {r: int(np.count_nonzero(flags & _BIT[r])) for r in DROP_REASONS}
    dropped = {}
    rest = ~np.asarray(keep, bool)
    for r in DROP_REASONS:
        hit = rest & ((flags & (_BIT[r] & keep_bits)) != 0)
        dropped[r] = int(np.count_nonzero(hit))
        rest = rest & ~hit
    return {"n_rows": int(flags.size), "n_kept": int(np.count_nonzero(keep)),
            "n_dropped": int(flags.size - np.count_nonzero(keep)),
            "dropped": dropped, "flagged": flagged}


def _sum_counts(items) -> dict:
    tot = {"n_rows": 0, "n_kept": 0, "n_dropped": 0,
           "dropped": {r: 0 for r in DROP_REASONS}, "flagged": {r: 0 for r in DROP_REASONS}}
    for c in items:
        for k in ("n_rows", "n_kept", "n_dropped"):
            tot[k] += int(c[k])
        for k in ("dropped", "flagged"):
            for r in DROP_REASONS:
                tot[k][r] += int(c[k].get(r, 0))
    return tot


def _keep_mask(range_cut: bool) -> int:
    m = 0
    for r in DROP_REASONS:
        if r == "out_of_range" and not range_cut:
            continue
        m |= _BIT[r]
    return m


def _write_manifest(folder: str, manifest: dict, name: str = MANIFEST_NAME) -> None:
    atomic_write_json(os.path.join(folder, name), manifest)


def read_manifest(path) -> dict:
    """The manifest dict of a training-set folder (or of a ``manifest.json`` path, or of a
    per-host part ``manifest.host{p}.json``)."""
    path = os.fspath(path)
    base = os.path.basename(path)
    is_file = base == MANIFEST_NAME or (base.startswith("manifest.host") and base.endswith(".json"))
    mpath = path if is_file else os.path.join(path, MANIFEST_NAME)
    if not os.path.isfile(mpath):
        folder = os.path.dirname(mpath) or "."
        if glob.glob(os.path.join(folder, HOST_MANIFEST_PATTERN.format("*"))):
            raise FileNotFoundError(
                f"no {MANIFEST_NAME} in {folder}, only per-host parts (manifest.host*.json) of a "
                "multi-host run: finish every host, then call "
                "sedflow_jax.sim.merge_manifests(folder)")
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {folder}: not a "
                                "training set written by sedflow_jax.simulation.simulate")
    with open(mpath) as fh:
        m = json.load(fh)
    if m.get("format") != FORMAT:
        raise ValueError(f"{mpath}: not a {FORMAT} manifest (format={m.get('format')!r})")
    if int(m.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{mpath}: format version {m['format_version']} is newer than this "
                         f"package supports ({FORMAT_VERSION})")
    return m


def _prepare_out(out) -> str:
    """Create the folder and prove it is writable (before any computation)."""
    folder = os.path.abspath(os.fspath(out))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(f"simulate(out={out!r}): exists and is not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test-{os.getpid()}")
        with open(probe, "wb") as fh:
            fh.write(b"ok")
        os.remove(probe)
    except OSError as e:
        raise PermissionError(f"simulate(out={out!r}): the output folder cannot be created or "
                              f"written ({e.__class__.__name__}: {e})") from e
    return folder


def _our_files(folder: str):
    pats = ("shard_*.npz", "shard_*.npz.tmp-*", MANIFEST_NAME, MANIFEST_NAME + ".tmp-*",
            HOST_MANIFEST_PATTERN.format("*"), HOST_MANIFEST_PATTERN.format("*") + ".tmp-*")
    out = []
    for p in pats:
        out.extend(glob.glob(os.path.join(folder, p)))
    return sorted(set(out))


def _shard_index(name: str):
    """``shard_00012.npz[.tmp-123]`` -> 12 (None for other names)."""
    base = os.path.basename(name)
    if not base.startswith("shard_"):
        return None
    digits = base[len("shard_"):].split(".", 1)[0]
    return int(digits) if digits.isdigit() else None


def _is_own_file(name: str, own_manifest: str, pidx: int, pcount: int) -> bool:
    """Is this file (or temporary file) written by host ``pidx`` of ``pcount``?"""
    base = os.path.basename(name)
    if base == own_manifest or base.startswith(own_manifest + ".tmp-"):
        return True
    i = _shard_index(base)
    return i is not None and i % pcount == pidx


def _config_diff(a: dict, b: dict) -> list:
    keys = sorted(set(a) | set(b))
    return [k for k in keys if canonical_json(a.get(k)) != canonical_json(b.get(k))]


def _resolve_inputs(model, prior, noise):
    if prior is None:
        prior = prior_mod.provabgs_prior()
    if not isinstance(prior, prior_mod.Prior):
        raise TypeError(f"prior must be a sedflow_jax.prior.Prior, got {type(prior).__name__}")
    if prior.zmin < 0:
        raise ValueError(f"the redshift prior must be >= 0, got {prior.redshift}")
    if model is None:
        from ..sed.model import load_model

        model = load_model(z_max=prior.zmax)
    for attr in ("phot_batch", "tables", "filter_names", "config", "grid"):
        if not hasattr(model, attr):
            raise TypeError(f"model must be a sedflow_jax.model.SEDModel (no .{attr})")
    if model.config.z_max < prior.zmax:
        raise ValueError(f"the prior reaches z = {prior.zmax} but the model only accepts "
                         f"z <= {model.config.z_max}; use load_model(z_max={prior.zmax})")
    bands = tuple(model.filter_names)
    if noise is None:
        noise = noise_mod.default_noise_model(bands)
    elif not isinstance(noise, noise_mod.NoiseModel):
        raise TypeError(f"noise must be a sedflow_jax.noise.NoiseModel, got {type(noise).__name__}")
    elif tuple(noise.bands) != bands:
        noise = noise.select(bands)  # KeyError naming the missing bands
    return model, prior, noise


def _build_config(*, key_data, key_impl, n, block, range_cut, include_flux, model, prior,
                  noise) -> dict:
    return {
        "key_data": [int(v) for v in key_data.ravel()],
        "key_impl": key_impl,
        "threefry_partitionable": bool(jax.config.jax_threefry_partitionable),
        "n": int(n),
        "block": int(block),
        "range_cut": bool(range_cut),
        "include_flux": bool(include_flux),
        "prior": dataclasses.asdict(prior),
        "noise_model": noise.to_dict(),
        "grid": {"name": model.grid.name, "provenance": model.grid.provenance},
        "filters": list(model.filter_names),
        "model_config": dataclasses.asdict(model.config),
        "model_tables_sha256": tables_sha256(model.tables),
    }


# ---------------------------------------------------------------------------------------------
# simulate
# ---------------------------------------------------------------------------------------------
def simulate(key_or_seed, n, model=None, prior=None, noise=None, *, out=None, chunk=100_000,
             block: int = DEFAULT_BLOCK, include_flux: bool = False, overwrite: bool = False,
             range_cut: bool = True, progress: bool = True, mesh=None, hosts=None,
             _stop_after_shards: Optional[int] = None) -> SimulationResult:
    """Simulate a SEDflow training set of ``n`` galaxies (prior -> photometry -> noise -> x).

    Args:
        key_or_seed: int seed or a ``jax.random`` key (typed or legacy raw). Same key -> same rows.
        n: number of rows (> 0); dropped rows are flagged and counted, not removed.
        model: :class:`sedflow_jax.model.SEDModel` (default ``load_model(z_max=prior.zmax)``,
            SDSS ugriz); its ``config.z_max`` must reach the prior's zmax.
        prior: :class:`sedflow_jax.prior.Prior` (default :func:`~sedflow_jax.prior.provabgs_prior`).
        noise: :class:`sedflow_jax.noise.NoiseModel` (default ``default_noise_model(model's
            filters)``); restricted/reordered to the model's filters.
        out: folder to write (see module docstring); None keeps the arrays in memory.
        chunk: rows per shard (and per progress step), rounded up to a multiple of ``block``.
            Has no influence on the values. When resuming, the folder's shard size is used.
        block: rows per random block and per compiled call (part of the configuration: a
            different ``block`` gives different rows). 4096 suits CPUs; larger blocks (e.g.
            65536) use a GPU better.
        include_flux: also store noisy ``flux``, ``sigma`` and noiseless ``flux_model``
            (nanomaggies).
        overwrite: replace a folder holding a different (or any) configuration instead of
            refusing / resuming. Only this module's files are removed.
        range_cut: drop rows whose noiseless flux lies outside the noise model's catalog range
            (SEDflow); when False such rows are kept but still counted in ``flagged``.
        progress: tqdm bar over rows (galaxies/s).
        mesh: optional ``jax.sharding.Mesh`` over *this process's* devices (one axis; see
            :func:`sedflow_jax.parallel.make_mesh`): the photometry of each block is split
            across its devices (``shard_map``); ``block`` must be a multiple of the device
            count. Values equal the single-device run's up to float rounding (the random draws
            are identical); the mesh is not part of the configuration, so a folder can be
            resumed with another device count.
        hosts: optional multi-host partition: ``(process_index, process_count)`` or ``'auto'``
            (``jax.process_index()``/``jax.process_count()``). Host p computes the shards i with
            ``i % process_count == p`` into the shared folder ``out`` and records them in its
            own ``manifest.host{p}.json``; shards already present in the folder (any manifest,
            sha256-checked) are not recomputed, so hosts can be restarted, also with another
            process count, without duplicated or missing rows. The host that completes the
            last share writes ``manifest.json`` (see
            :func:`sedflow_jax.sim.merge_manifests`); until then the folder is not
            readable by :func:`load_training_set`. The returned result describes this host's
            share (``complete``: its shards are done). With one process it is the same as None.

    Returns:
        :class:`SimulationResult`.

    Raises:
        ValueError: n <= 0, bad chunk/block, a model that cannot reach the prior's redshifts,
            or ``out`` holding a different configuration (without ``overwrite``).
        PermissionError / NotADirectoryError: ``out`` cannot be created or written (checked
            before anything is computed).
    """
    t_start = time.perf_counter()
    # -- argument checks (cheap, before anything else) ---------------------------------------
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer, float)):
        raise TypeError(f"n must be an integer, got {type(n).__name__}")
    if isinstance(n, float):
        if not n.is_integer():
            raise ValueError(f"n must be a whole number, got {n}")
        n = int(n)
    n = int(n)
    if n <= 0:
        raise ValueError(f"n must be > 0, got {n}")
    block = int(block)
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    chunk = int(chunk)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    seed, key_data, key_impl, _ = key_parts(key_or_seed)
    pidx, pcount = parallel.resolve_hosts(hosts)
    multi = pcount > 1
    if multi and out is None:
        raise ValueError("simulate(hosts=...) with more than one process needs out= (a folder "
                         "shared by all hosts)")
    n_dev = 1
    if mesh is not None:

        n_dev = parallel.mesh_size(mesh, local=True)
        if block % n_dev:
            raise ValueError(f"block={block} must be a multiple of the mesh's {n_dev} devices")
    folder = _prepare_out(out) if out is not None else None
    own_name = HOST_MANIFEST_PATTERN.format(pidx) if multi else MANIFEST_NAME

    # -- inputs and configuration ------------------------------------------------------------
    model, prior, noise = _resolve_inputs(model, prior, noise)
    bands = tuple(model.filter_names)
    config = _build_config(key_data=key_data, key_impl=key_impl, n=n, block=block,
                           range_cut=range_cut, include_flux=include_flux, model=model,
                           prior=prior, noise=noise)
    config = json.loads(json.dumps(jsonable(config)))  # exactly what the manifest holds
    config_sha = hashlib.sha256(canonical_json(config).encode()).hexdigest()
    env = versions()
    rows_per_shard = max(1, math.ceil(chunk / block)) * block

    # -- existing folder: resume, refuse or clear --------------------------------------------
    # ``known``: every manifest in the folder (manifest.json and per-host parts) holding this
    # configuration; ``old``: this writer's own one (manifest.json, or its host part).
    old = None
    known = []
    if folder is not None:
        if not overwrite:
            # shard files first, manifests second: a writer saves its manifest before any of
            # its shards, so a shard seen here always has its manifest seen below
            shard_files = glob.glob(os.path.join(folder, "shard_*.npz"))
            names = [MANIFEST_NAME] + sorted(
                os.path.basename(p)
                for p in glob.glob(os.path.join(folder, HOST_MANIFEST_PATTERN.format("*"))))
            for name in names:
                mpath = os.path.join(folder, name)
                if not os.path.exists(mpath):
                    continue
                try:
                    m = read_manifest(mpath)
                except (ValueError, json.JSONDecodeError) as e:
                    what = "manifest" if name == MANIFEST_NAME else f"manifest part {name}"
                    raise ValueError(f"{folder} holds an unreadable {what} ({e}); pass "
                                     "overwrite=True to replace it") from e
                diff = _config_diff(m.get("config", {}), config)
                if diff:
                    raise ValueError(
                        f"{folder} already holds a training set with a different configuration "
                        f"(differs in: {', '.join(diff)}; in {name}). Use another folder, or "
                        "overwrite=True to replace it.")
                known.append((name, m))
            if not known and shard_files:
                raise ValueError(f"{folder} holds shard files but no manifest; pass "
                                 "overwrite=True to replace them, or use another folder")
            if known:
                sizes = {int(m["layout"]["rows_per_shard"]) for _, m in known}
                if len(sizes) > 1:
                    raise ValueError(f"{folder}: its manifests disagree on the shard size "
                                     f"({sorted(sizes)} rows); pass overwrite=True")
                old_rps = sizes.pop()
                if old_rps != rows_per_shard:
                    warnings.warn(
                        f"resuming {folder}: keeping its shard size of {old_rps} rows "
                        f"(chunk={chunk} requested); values are the same either way",
                        stacklevel=2)
                    rows_per_shard = old_rps
                old = dict(known).get(own_name)
                oenv = (old if old is not None else known[0][1]).get("environment", {})
                for k in ("jax", "jaxlib", "backend"):
                    if oenv.get(k) != env.get(k):
                        warnings.warn(f"resuming {folder} written with {k}={oenv.get(k)!r}, now "
                                      f"{env.get(k)!r}: new shards may not be bit-identical to "
                                      "the old ones", stacklevel=2)
        else:
            for p in _our_files(folder):
                # several hosts: each clears only its own files (and the merged manifest)
                if not multi or os.path.basename(p).startswith(MANIFEST_NAME) or \
                        _is_own_file(p, own_name, pidx, pcount):
                    try:
                        os.remove(p)
                    except FileNotFoundError:  # another host removed it first
                        pass
        for p in glob.glob(os.path.join(folder, "*.tmp-*")):  # leftovers of a killed run
            base = os.path.basename(p)
            if not base.startswith(("shard_", MANIFEST_NAME, "manifest.host")):
                continue
            if multi and not _is_own_file(base, own_name, pidx, pcount):
                continue  # another host may be writing it right now
            try:
                os.remove(p)
            except FileNotFoundError:
                pass

    n_shards = math.ceil(n / rows_per_shard)
    plan = []
    for s in range(n_shards):
        r0 = s * rows_per_shard
        r1 = min(n, r0 + rows_per_shard)
        plan.append({"index": s, "file": SHARD_PATTERN.format(s), "row_start": r0,
                     "row_stop": r1, "block_start": r0 // block,
                     "block_stop": math.ceil(r1 / block)})

    # this writer's shards: all of them, or those with index % process_count == process_index
    mine = [p for p in plan if p["index"] % pcount == pidx]
    shards = [None] * n_shards  # only this writer's entries are ever filled
    cands = {}
    for name, m in sorted(known, key=lambda nm: nm[0] != own_name):  # own manifest first
        for e in m.get("shards", []):
            cands.setdefault(int(e["index"]), []).append(e)
    for p in mine:
        es = [e for e in cands.get(p["index"], []) if e["row_start"] == p["row_start"]
              and e["row_stop"] == p["row_stop"] and e.get("file") == p["file"]]
        fpath = os.path.join(folder, p["file"]) if folder is not None else None
        if es and os.path.isfile(fpath):
            h = sha256_file(fpath)
            shards[p["index"]] = next((e for e in es if e.get("sha256") == h), None)
    todo = [p for p in mine if shards[p["index"]] is None]
    # a restarted host with another process count keeps listing the shards it wrote before
    # that are now assigned to others, so that no manifest forgets a finished shard
    carry = []
    if multi and old is not None:
        mine_idx = {p["index"] for p in mine}
        for e in old.get("shards", []):
            i = int(e["index"])
            if i not in mine_idx and i < n_shards and e.get("file") == plan[i]["file"] and \
                    (e["row_start"], e["row_stop"]) == (plan[i]["row_start"],
                                                        plan[i]["row_stop"]) and \
                    os.path.isfile(os.path.join(folder, e["file"])):
                carry.append(e)

    created = old.get("created") if old is not None else utc_now()
    keep_bits = _keep_mask(range_cut)
    sessions = list(old.get("sessions", [])) if old is not None else []
    session = {"started": utc_now(), "rows_computed": 0, "wall_s": 0.0, "environment": env}
    if mesh is not None:
        session["devices"] = n_dev
    if multi:
        session["host"] = pidx
    sessions.append(session)

    def manifest_now(complete: bool) -> dict:
        return jsonable(_manifest(complete))

    def _manifest(complete: bool) -> dict:
        done = sorted([e for e in shards if e is not None] + carry, key=lambda e: e["index"])
        tot = _sum_counts(e["counts"] for e in done)
        comp = sum(e["timing"]["compute_s"] for e in done)
        wr = sum(e["timing"]["write_s"] for e in done)
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "complete": complete,
            "created": created,
            "updated": utc_now(),
            "config": config,
            "config_sha256": config_sha,
            "seed": seed,
            "n": n,
            "layout": {"block": block, "rows_per_shard": rows_per_shard, "n_shards": n_shards,
                       "chunk_requested": chunk},
            "shards": done,
            "n_rows_done": tot["n_rows"],
            "n_kept": tot["n_kept"],
            "n_dropped": tot["n_dropped"],
            "dropped": tot["dropped"],
            "flagged": tot["flagged"],
            "drop_reasons": {r: _BIT[r] for r in DROP_REASONS},
            "keep_rule": f"keep = (flags & {keep_bits}) == 0",
            "timings": {"compute_s": comp, "write_s": wr,
                        "galaxies_per_s_compute": tot["n_rows"] / comp if comp > 0 else None},
            "sessions": sessions,
            "bands": list(bands),
            "theta_names": list(THETA_NAMES),
            "theta12_names": list(THETA12_NAMES),
            "x_names": list(x_names(bands)),
            "arrays": {
                "theta": "(m, 11) float32 flow target, sampling space (theta_names)",
                "theta12": "(m, 12) float32 physical parameters (theta12_names)",
                "x": "(m, 2*n_bands+1) float32 conditioning (x_names): mag = 22.5 - 2.5 log10 "
                     "f_noisy; sigma_mag = 2.5/ln10 sigma_f / f_noisy; z",
                "z": "(m,) float32 redshift",
                "keep": "(m,) bool training rows",
                "flags": "(m,) uint8 drop-reason bits (drop_reasons)",
                **({"flux": "(m, n_bands) float32 noisy flux [nanomaggies]",
                    "sigma": "(m, n_bands) float32 sigma_f [nanomaggies]",
                    "flux_model": "(m, n_bands) float32 noiseless flux [nanomaggies]"}
                   if include_flux else {}),
            },
            "environment": env,
            **({"host": {"process_index": pidx, "process_count": pcount,
                         "assigned": [p["index"] for p in mine]}} if multi else {}),
        }

    # -- compute ---------------------------------------------------------------------------
    kd = jnp.asarray(key_data)
    phot, tables, noise_arg = model.phot_batch, model.tables, noise
    if mesh is not None:  # photometry split over the mesh; inputs replicated on it
        phot = parallel.sharded_phot_fn(model, mesh)
        kd, tables, noise_arg = parallel.replicate((kd, tables, noise), mesh)
    statics = dict(phot=phot, prior=prior, block=block, key_impl=key_impl)

    def dispatch(p, first=None):
        outs = [] if first is None else [first]
        for b in range(p["block_start"] + len(outs), p["block_stop"]):
            outs.append(_simulate_block(kd, np.uint32(b), tables, noise_arg, **statics))
        return outs

    def gather(p, outs):
        host = jax.device_get(outs)
        cat = {f: np.concatenate([getattr(h, f) for h in host]) for f in _Block._fields}
        off = p["row_start"] - p["block_start"] * block
        m = p["row_stop"] - p["row_start"]
        return {k: v[off:off + m] for k, v in cat.items()}

    def write_shard(p, arrs, keep, flags) -> dict:
        payload = {"theta": arrs["theta_s"], "theta12": arrs["theta"], "x": arrs["x"],
                   "z": arrs["z"], "keep": keep, "flags": flags}
        if include_flux:
            payload.update(flux=arrs["flux"], sigma=arrs["sigma"], flux_model=arrs["flux_model"])
        buf = io.BytesIO()
        np.savez(buf, **payload)
        data = buf.getvalue()
        atomic_write_bytes(os.path.join(folder, p["file"]), data)
        return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    mem = {f: [] for f in (*_Block._fields, "keep")} if folder is None else None
    pbar = None
    if progress:
        from tqdm.auto import tqdm

        done_rows = sum(e["row_stop"] - e["row_start"] for e in shards if e is not None)
        total = sum(p["row_stop"] - p["row_start"] for p in mine)
        pbar = tqdm(total=total, initial=done_rows, unit="gal", unit_scale=True, desc="simulate",
                    smoothing=0.1)
    if folder is not None and old is None:
        _write_manifest(folder, manifest_now(complete=not todo), own_name)

    t_setup = time.perf_counter() - t_start
    t_first = None
    t_wait = t_write = 0.0
    rows_computed = 0
    stopped = False
    t_loop = time.perf_counter()
    try:
        pending = None
        if todo:
            # the first block alone, synchronously: its time is mostly compilation
            t0 = time.perf_counter()
            first = jax.block_until_ready(_simulate_block(
                kd, np.uint32(todo[0]["block_start"]), tables, noise_arg, **statics))
            t_first = time.perf_counter() - t0
            pending = dispatch(todo[0], first)
        for j, p in enumerate(todo):
            t0 = time.perf_counter()
            arrs = gather(p, pending)
            # keep the device busy while the host writes this shard
            pending = dispatch(todo[j + 1]) if j + 1 < len(todo) else None
            t_compute = time.perf_counter() - t0
            t1 = time.perf_counter()
            flags = arrs["flags"]
            keep = (flags & keep_bits) == 0
            counts = _counts(flags, keep, keep_bits)
            m = p["row_stop"] - p["row_start"]
            entry = {k: p[k] for k in ("index", "file", "row_start", "row_stop")}
            entry.update(n_rows=m, counts=counts,
                         timing={"compute_s": t_compute, "write_s": 0.0})
            if folder is None:
                for f in _Block._fields:
                    mem[f].append(arrs[f])
                mem["keep"].append(keep)
            else:
                entry.update(write_shard(p, arrs, keep, flags))
            shards[p["index"]] = entry
            rows_computed += m
            if folder is not None:
                session["rows_computed"] = rows_computed
                session["wall_s"] = time.perf_counter() - t_start
                entry["timing"]["write_s"] = time.perf_counter() - t1
                _write_manifest(folder, manifest_now(
                    complete=all(shards[q["index"]] is not None for q in mine)), own_name)
            t_wait += t_compute
            t_write += time.perf_counter() - t1
            if pbar is not None:
                pbar.update(m)
            if _stop_after_shards is not None and j + 1 >= int(_stop_after_shards) \
                    and j + 1 < len(todo):
                stopped = True
                break
    finally:
        if pbar is not None:
            pbar.close()
    t_end = time.perf_counter()
    loop_s = t_end - t_loop

    complete = all(shards[p["index"]] is not None for p in mine)
    session["rows_computed"] = rows_computed
    session["wall_s"] = t_end - t_start
    manifest = manifest_now(complete=complete)
    if folder is None:
        manifest["shards"] = []  # no files
    elif rows_computed == 0 and old is not None and old.get("complete") == complete:
        manifest = old  # nothing to do: leave the folder untouched
    else:
        _write_manifest(folder, manifest, own_name)
    if multi and complete and not stopped:
        # the host finishing the last share writes manifest.json (all hosts may try: the
        # merged manifest is written atomically and is the same whoever writes it)

        try:
            merge_manifests(folder, strict=False)
        except (ValueError, OSError) as e:
            warnings.warn(f"{folder}: could not merge the host manifests yet ({e}); run "
                          "sedflow_jax.sim.merge_manifests(folder) when all hosts are done",
                          stacklevel=2)

    timings = {
        "setup_s": t_setup,
        "first_block_s": t_first,
        "compute_wait_s": t_wait,
        "write_s": t_write,
        "loop_s": loop_s,
        "total_s": t_end - t_start,
        "rows_computed": rows_computed,
        "galaxies_per_s": rows_computed / loop_s if rows_computed and loop_s > 0 else None,
    }
    tot = {"n_kept": manifest["n_kept"], "n_dropped": manifest["n_dropped"],
           "dropped": manifest["dropped"], "flagged": manifest["flagged"]}
    arrays = {}
    if folder is None:
        cat = {f: np.concatenate(v) for f, v in mem.items()}
        arrays = dict(theta=cat["theta"], theta_s=cat["theta_s"], x=cat["x"], z=cat["z"],
                      keep=cat["keep"], flags=cat["flags"])
        if include_flux:
            arrays.update(flux=cat["flux"], sigma=cat["sigma"], flux_model=cat["flux_model"])
    return SimulationResult(
        out=folder, n_requested=n, n_kept=int(tot["n_kept"]), n_dropped=int(tot["n_dropped"]),
        dropped=dict(tot["dropped"]), flagged=dict(tot["flagged"]), timings=timings,
        manifest=manifest, complete=complete and not stopped, **arrays)


# ---------------------------------------------------------------------------------------------
# readers
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# multi-host training sets
# ---------------------------------------------------------------------------------------------
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
    part_files = sorted(glob.glob(os.path.join(folder, HOST_MANIFEST_PATTERN.format("*"))))
    if not part_files:
        if strict:
            raise FileNotFoundError(f"{folder}: no per-host manifest parts (manifest.host*.json)")
        return None
    parts = [(os.path.basename(p), read_manifest(p)) for p in part_files]
    main_path = os.path.join(folder, MANIFEST_NAME)
    shas = {m["config_sha256"] for _, m in parts}
    if len(shas) > 1:
        raise ValueError(f"{folder}: the manifest parts hold different configurations "
                         f"({', '.join(n for n, _ in parts)}); re-run the stale hosts with the "
                         "same arguments, or remove their parts")
    base = parts[0][1]
    sources = list(parts)
    if os.path.exists(main_path):
        main = read_manifest(main_path)
        if main.get("config_sha256") == base["config_sha256"]:
            sources.append((MANIFEST_NAME, main))
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
            h = sha256_file(path)
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

    tot = _sum_counts(e["counts"] for e in chosen)
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
        created=min(m.get("created", utc_now()) for _, m in sources),
        updated=utc_now(),
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
    atomic_write_json(os.path.join(folder, MANIFEST_NAME), merged)
    return jsonable(merged)


def simulate_distributed(key_or_seed, n, model=None, prior=None, noise=None, *, out,
                         mesh=None, **kw):
    """:func:`sedflow_jax.simulation.simulate` on every process of a ``jax.distributed`` job.

    Each process computes its share of the shards (``hosts='auto'``) into the shared folder
    ``out``, optionally split over its local devices (``mesh``); after a barrier process 0
    merges the manifests. Returns ``(this process's SimulationResult, merged manifest or None
    on the other processes)``. Call it with the same arguments on every process.
    """
    res = simulate(key_or_seed, n, model, prior, noise, out=out, mesh=mesh, hosts="auto", **kw)
    parallel.barrier("sedflow_jax.simulate.done")
    merged = None
    if jax.process_index() == 0:
        if jax.process_count() > 1:
            merged = merge_manifests(out)
        else:
            merged = read_manifest(out)
    parallel.barrier("sedflow_jax.simulate.merged")
    return res, merged
