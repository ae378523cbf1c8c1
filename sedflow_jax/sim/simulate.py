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


Public API: ``simulate``, ``SimulationResult``, ``read_manifest``, ``merge_manifests``,
``simulate_distributed``, ``tables_sha256``, ``DROP_REASONS``, ``DEFAULT_BLOCK``, ``FORMAT``,
``MANIFEST_NAME`` (the shard store lives in :mod:`sedflow_jax.sim.store`, the jitted block
kernel in :mod:`sedflow_jax.sim.kernel`; the readers in :mod:`sedflow_jax.sim.readers`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
import warnings
from typing import Any, NamedTuple, Optional

import jax
import numpy as np

from .. import parallel
from ..sed.model import load_model
from ..util import canonical_json, jsonable, key_parts, sha256_arrays, utc_now, versions
from . import noise as noise_mod
from . import prior as prior_mod
from .kernel import DROP_BITS, DROP_REASONS, Block, BlockRunner, count_flags, keep_mask
from .layout import x_names
from .store import (FORMAT, FORMAT_VERSION, HOST_MANIFEST_PATTERN, MANIFEST_NAME, carried_shards,
                    clear_own_files, done_shards, known_manifests, merge_manifests, plan_shards,
                    prepare_out, read_manifest, remove_leftovers, shard_size, totals,
                    warn_environment, write_manifest, write_shard)

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
    "MANIFEST_NAME",
]

DEFAULT_BLOCK = 4096

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


def tables_sha256(tables) -> str:
    """sha256 of a model's tables (a pytree of arrays): identifies the model in configs."""
    return sha256_arrays(jax.tree_util.tree_leaves(tables))


# ---------------------------------------------------------------------------------------------
# the state of one call, and its steps
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Run:
    """Everything one :func:`simulate` call works with (filled step by step)."""

    n: int
    block: int
    chunk: int
    include_flux: bool
    range_cut: bool
    seed: Any
    key_data: Any
    key_impl: str
    pidx: int
    pcount: int
    n_dev: int
    folder: Optional[str]
    # inputs and configuration (_configure)
    model: Any = None
    prior: Any = None
    noise: Any = None
    config: Optional[dict] = None
    config_sha: str = ""
    env: Optional[dict] = None
    rows_per_shard: int = 0
    # the store (_open_store, _resume)
    known: list = dataclasses.field(default_factory=list)
    old: Optional[dict] = None
    plan: list = dataclasses.field(default_factory=list)
    mine: list = dataclasses.field(default_factory=list)
    shards: list = dataclasses.field(default_factory=list)
    carry: list = dataclasses.field(default_factory=list)
    created: str = ""
    sessions: list = dataclasses.field(default_factory=list)
    session: dict = dataclasses.field(default_factory=dict)
    # progress of this call
    rows_computed: int = 0
    mem: Optional[dict] = None

    @property
    def multi(self) -> bool:
        return self.pcount > 1

    @property
    def own_name(self) -> str:
        return HOST_MANIFEST_PATTERN.format(self.pidx) if self.multi else MANIFEST_NAME

    @property
    def keep_bits(self) -> int:
        return keep_mask(self.range_cut)

    @property
    def n_shards(self) -> int:
        return len(self.plan)

    def mine_done(self) -> bool:
        return all(self.shards[p["index"]] is not None for p in self.mine)


def _check_count(n) -> int:
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer, float)):
        raise TypeError(f"n must be an integer, got {type(n).__name__}")
    if isinstance(n, float):
        if not n.is_integer():
            raise ValueError(f"n must be a whole number, got {n}")
        n = int(n)
    n = int(n)
    if n <= 0:
        raise ValueError(f"n must be > 0, got {n}")
    return n


def _check_args(key_or_seed, n, *, out, chunk, block, include_flux, range_cut, mesh,
                hosts) -> _Run:
    """The cheap argument checks (before anything else), and the output folder proven
    writable."""
    n = _check_count(n)
    block = int(block)
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    chunk = int(chunk)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    seed, key_data, key_impl, _ = key_parts(key_or_seed)
    pidx, pcount = parallel.resolve_hosts(hosts)
    if pcount > 1 and out is None:
        raise ValueError("simulate(hosts=...) with more than one process needs out= (a folder "
                         "shared by all hosts)")
    n_dev = 1
    if mesh is not None:
        n_dev = parallel.mesh_size(mesh, local=True)
        if block % n_dev:
            raise ValueError(f"block={block} must be a multiple of the mesh's {n_dev} devices")
    folder = prepare_out(out) if out is not None else None
    return _Run(n=n, block=block, chunk=chunk, include_flux=bool(include_flux),
                range_cut=bool(range_cut), seed=seed, key_data=key_data, key_impl=key_impl,
                pidx=pidx, pcount=pcount, n_dev=n_dev, folder=folder)


def _resolve_inputs(model, prior, noise):
    if prior is None:
        prior = prior_mod.provabgs_prior()
    if not isinstance(prior, prior_mod.Prior):
        raise TypeError(f"prior must be a sedflow_jax.prior.Prior, got {type(prior).__name__}")
    if prior.zmin < 0:
        raise ValueError(f"the redshift prior must be >= 0, got {prior.redshift}")
    if model is None:
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


def _configure(run: _Run, model, prior, noise) -> None:
    """Inputs (defaults filled in and checked) and the configuration the manifest records."""
    run.model, run.prior, run.noise = _resolve_inputs(model, prior, noise)
    config = _build_config(key_data=run.key_data, key_impl=run.key_impl, n=run.n,
                           block=run.block, range_cut=run.range_cut,
                           include_flux=run.include_flux, model=run.model, prior=run.prior,
                           noise=run.noise)
    run.config = json.loads(json.dumps(jsonable(config)))  # exactly what the manifest holds
    run.config_sha = hashlib.sha256(canonical_json(run.config).encode()).hexdigest()
    run.env = versions()
    run.rows_per_shard = max(1, math.ceil(run.chunk / run.block)) * run.block


def _open_store(run: _Run, overwrite: bool) -> None:
    """An existing folder is resumed (same configuration), refused (another one) or cleared
    (``overwrite``); then the shards are planned.

    ``run.known``: every manifest in the folder (manifest.json and per-host parts) holding this
    configuration; ``run.old``: this writer's own one (manifest.json, or its host part)."""
    folder = run.folder
    if folder is not None:
        if not overwrite:
            run.known = known_manifests(folder, run.config)
            run.rows_per_shard = shard_size(folder, run.known, run.rows_per_shard, run.chunk)
            if run.known:
                run.old = dict(run.known).get(run.own_name)
                warn_environment(folder, run.old if run.old is not None else run.known[0][1],
                                 run.env)
        else:
            clear_own_files(folder, run.own_name, run.pidx, run.pcount)
        remove_leftovers(folder, run.own_name, run.pidx, run.pcount)
    run.plan = plan_shards(run.n, run.rows_per_shard, run.block)
    # this writer's shards: all of them, or those with index % process_count == process_index
    run.mine = [p for p in run.plan if p["index"] % run.pcount == run.pidx]


def _resume(run: _Run, mesh) -> None:
    """The shards already present (sha256-checked), those a restarted host keeps listing, and
    this call's session record."""
    run.shards = done_shards(run.folder, run.known, run.own_name, run.mine, run.n_shards)
    if run.multi and run.old is not None:
        run.carry = carried_shards(run.folder, run.old, run.mine, run.plan)
    old = run.old
    run.created = old.get("created") if old is not None else utc_now()
    run.sessions = list(old.get("sessions", [])) if old is not None else []
    run.session = {"started": utc_now(), "rows_computed": 0, "wall_s": 0.0,
                   "environment": run.env}
    if mesh is not None:
        run.session["devices"] = run.n_dev
    if run.multi:
        run.session["host"] = run.pidx
    run.sessions.append(run.session)
    if run.folder is None:
        run.mem = {f: [] for f in (*Block._fields, "keep")}


def _array_notes(include_flux: bool) -> dict:
    return {
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
    }


def _manifest(run: _Run, complete: bool) -> dict:
    """The manifest of this writer now (its shards done so far)."""
    done = sorted([e for e in run.shards if e is not None] + run.carry,
                  key=lambda e: e["index"])
    tot = totals(done)
    bands = list(run.model.filter_names)
    m = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "complete": complete,
        "created": run.created,
        "updated": utc_now(),
        "config": run.config,
        "config_sha256": run.config_sha,
        "seed": run.seed,
        "n": run.n,
        "layout": {"block": run.block, "rows_per_shard": run.rows_per_shard,
                   "n_shards": run.n_shards, "chunk_requested": run.chunk},
        "shards": done,
        **{k: tot[k] for k in ("n_rows_done", "n_kept", "n_dropped", "dropped", "flagged")},
        "drop_reasons": {r: DROP_BITS[r] for r in DROP_REASONS},
        "keep_rule": f"keep = (flags & {run.keep_bits}) == 0",
        "timings": tot["timings"],
        "sessions": run.sessions,
        "bands": bands,
        "theta_names": list(THETA_NAMES),
        "theta12_names": list(THETA12_NAMES),
        "x_names": list(x_names(bands)),
        "arrays": _array_notes(run.include_flux),
        "environment": run.env,
    }
    if run.multi:
        m["host"] = {"process_index": run.pidx, "process_count": run.pcount,
                     "assigned": [p["index"] for p in run.mine]}
    return jsonable(m)


def _payload(arrs: dict, keep, flags, include_flux: bool) -> dict:
    """A shard's arrays under their on-disk names (this order: the files are bit-stable)."""
    payload = {"theta": arrs["theta_s"], "theta12": arrs["theta"], "x": arrs["x"],
               "z": arrs["z"], "keep": keep, "flags": flags}
    if include_flux:
        payload.update(flux=arrs["flux"], sigma=arrs["sigma"], flux_model=arrs["flux_model"])
    return payload


def _record_shard(run: _Run, p: dict, arrs: dict, t_compute: float, t_start: float) -> int:
    """Keep (in memory) or write one computed shard, list it and rewrite the manifest;
    returns its rows."""
    t1 = time.perf_counter()
    flags = arrs["flags"]
    keep = (flags & run.keep_bits) == 0
    m = p["row_stop"] - p["row_start"]
    entry = {k: p[k] for k in ("index", "file", "row_start", "row_stop")}
    entry.update(n_rows=m, counts=count_flags(flags, keep, run.keep_bits),
                 timing={"compute_s": t_compute, "write_s": 0.0})
    if run.folder is None:
        for f in Block._fields:
            run.mem[f].append(arrs[f])
        run.mem["keep"].append(keep)
    else:
        entry.update(write_shard(run.folder, p["file"],
                                 _payload(arrs, keep, flags, run.include_flux)))
    run.shards[p["index"]] = entry
    run.rows_computed += m
    if run.folder is not None:
        run.session["rows_computed"] = run.rows_computed
        run.session["wall_s"] = time.perf_counter() - t_start
        entry["timing"]["write_s"] = time.perf_counter() - t1
        write_manifest(run.folder, _manifest(run, complete=run.mine_done()), run.own_name)
    return m


def _progress_bar(run: _Run):
    from tqdm.auto import tqdm

    done_rows = sum(e["row_stop"] - e["row_start"] for e in run.shards if e is not None)
    total = sum(p["row_stop"] - p["row_start"] for p in run.mine)
    return tqdm(total=total, initial=done_rows, unit="gal", unit_scale=True, desc="simulate",
                smoothing=0.1)


def _compute(run: _Run, runner: BlockRunner, todo: list, pbar, t_start: float,
             stop_after: Optional[int]) -> dict:
    """Compute and record the shards of ``todo`` (stopping after ``stop_after`` of them);
    the loop's timings and whether it was stopped early."""
    stats = {"compute_wait_s": 0.0, "write_s": 0.0, "stopped": False}
    t_loop = time.perf_counter()
    try:
        for j, (p, arrs, t_compute) in enumerate(runner.shards(todo)):
            t1 = time.perf_counter()
            m = _record_shard(run, p, arrs, t_compute, t_start)
            stats["compute_wait_s"] += t_compute
            stats["write_s"] += time.perf_counter() - t1
            if pbar is not None:
                pbar.update(m)
            if stop_after is not None and j + 1 >= int(stop_after) and j + 1 < len(todo):
                stats["stopped"] = True
                break
    finally:
        if pbar is not None:
            pbar.close()
    stats["t_end"] = time.perf_counter()
    stats["loop_s"] = stats["t_end"] - t_loop
    return stats


def _memory_arrays(run: _Run) -> dict:
    """The result's arrays of an in-memory run (empty for a folder)."""
    if run.folder is not None:
        return {}
    cat = {f: np.concatenate(v) for f, v in run.mem.items()}
    arrays = dict(theta=cat["theta"], theta_s=cat["theta_s"], x=cat["x"], z=cat["z"],
                  keep=cat["keep"], flags=cat["flags"])
    if run.include_flux:
        arrays.update(flux=cat["flux"], sigma=cat["sigma"], flux_model=cat["flux_model"])
    return arrays


def _finish(run: _Run, stats: dict, timings: dict, t_start: float) -> SimulationResult:
    """The final manifest (written unless nothing changed), the merge of a multi-host run
    whose last share this was, and the result."""
    complete = run.mine_done()
    run.session["rows_computed"] = run.rows_computed
    run.session["wall_s"] = stats["t_end"] - t_start
    manifest = _manifest(run, complete=complete)
    if run.folder is None:
        manifest["shards"] = []  # no files
    elif run.rows_computed == 0 and run.old is not None and run.old.get("complete") == complete:
        manifest = run.old  # nothing to do: leave the folder untouched
    else:
        write_manifest(run.folder, manifest, run.own_name)
    if run.multi and complete and not stats["stopped"]:
        # the host finishing the last share writes manifest.json (all hosts may try: the
        # merged manifest is written atomically and is the same whoever writes it)
        try:
            merge_manifests(run.folder, strict=False)
        except (ValueError, OSError) as e:
            warnings.warn(f"{run.folder}: could not merge the host manifests yet ({e}); run "
                          "sedflow_jax.sim.merge_manifests(folder) when all hosts are done",
                          stacklevel=3)
    rows, loop_s = run.rows_computed, stats["loop_s"]
    timings.update(compute_wait_s=stats["compute_wait_s"], write_s=stats["write_s"],
                   loop_s=loop_s, total_s=stats["t_end"] - t_start, rows_computed=rows,
                   galaxies_per_s=rows / loop_s if rows and loop_s > 0 else None)
    return SimulationResult(
        out=run.folder, n_requested=run.n, n_kept=int(manifest["n_kept"]),
        n_dropped=int(manifest["n_dropped"]), dropped=dict(manifest["dropped"]),
        flagged=dict(manifest["flagged"]), timings=timings, manifest=manifest,
        complete=complete and not stats["stopped"], **_memory_arrays(run))


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
    run = _check_args(key_or_seed, n, out=out, chunk=chunk, block=block,
                      include_flux=include_flux, range_cut=range_cut, mesh=mesh, hosts=hosts)
    _configure(run, model, prior, noise)
    _open_store(run, overwrite)
    _resume(run, mesh)
    todo = [p for p in run.mine if run.shards[p["index"]] is None]
    runner = BlockRunner(run.model, run.prior, run.noise, run.key_data, run.key_impl, run.block,
                         mesh)
    pbar = _progress_bar(run) if progress else None
    if run.folder is not None and run.old is None:
        write_manifest(run.folder, _manifest(run, complete=not todo), run.own_name)
    timings = {"setup_s": time.perf_counter() - t_start}
    stats = _compute(run, runner, todo, pbar, t_start, _stop_after_shards)
    timings["first_block_s"] = runner.first_block_s
    return _finish(run, stats, timings, t_start)


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
