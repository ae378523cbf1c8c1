"""Streaming catalog inference: catalogs too large for memory, in chunks written to a work
folder (resumable, split over devices and hosts), assembled into one HDF5 file. Every chunk is fit by
:func:`sedflow_jax.sbi.inference.infer_rows`, the step of ``infer_catalog``: same values.

Output (``out``, HDF5): ``summary``, a table (compound) dataset with one row per catalog row
in order -- the columns of :func:`~sedflow_jax.sbi.inference.infer_rows` (kept columns,
``row``, ``<param>_p50/_p16/_p84``, derived properties with ``model``, ``acceptance``,
``n_accepted``, ``low_acceptance``, ``ood``, ``fit``, ``flag``, ``n_bands_used``,
``band_flag_<band>``; unusable rows hold NaN / 0) -- readable with
``astropy.table.Table.read(out, path='summary')``; with ``store_samples``
``samples/theta``; attributes ``run`` (JSON: the configuration and its sha256), ``stats``
(JSON: usable rows, mean acceptance, ...), ``param_names``, ``bands``. Each row is written
exactly once: nothing is duplicated or lost across kills.

Work folder (``out + '.parts'``): ``run.json`` (configuration), ``chunk_{i:06d}.npz`` (one
per finished chunk, written atomically), ``progress.json`` (``progress.host{p}.json`` per
host): the finished chunks with their rows, sha256 and timing. A rerun with the same
arguments skips the chunks on disk; other arguments are refused unless ``overwrite``.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import io
import json
import math
import os
import shutil
import time
from typing import NamedTuple, Optional, Sequence

import jax
import numpy as np
from flax import nnx

from .. import parallel
from ..io import catalog as C
from ..io.tables import CatalogReader
from ..sed.params import PARAM_NAMES
from ..sim.simulate import tables_sha256
from ..util import (as_key, atomic_write_bytes, atomic_write_json, canonical_json, jsonable,
                    package_version, sha256_arrays, temp_name, utc_now)
from .inference import infer_rows, resolve_z_range
from .sampling import RowSampler

__all__ = ["INFER_FORMAT", "MAX_CHUNK_DRAWS", "InferenceResult", "plan_chunk_rows",
           "infer_catalog_streaming", "finalize_inference", "read_inference",
           "infer_distributed"]


INFER_FORMAT = "sedflow_jax.inference"


INFER_FORMAT_VERSION = 1


_RUN = "run.json"
_PART = "chunk_{:06d}.npz"


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


def _flow_sha256(posterior) -> str:
    """sha256 of the flow's weights and of what the posterior is bound to (prior, bands, x range)."""
    return sha256_arrays(jax.tree_util.tree_leaves(nnx.state(posterior.flow)), extra={
        "flow": posterior.flow.config.to_dict(), "prior": dataclasses.asdict(posterior.prior),
        "bands": list(posterior.bands), "x_lo": np.asarray(posterior.x_lo).tolist(),
        "x_hi": np.asarray(posterior.x_hi).tolist()})


def _read_json(path: str):
    with open(path) as fh:
        return json.load(fh)


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


#: draws held in memory per chunk at most (rows x n_samples): ~0.8 GB of float32 (theta, s)
MAX_CHUNK_DRAWS = 1 << 23


def plan_chunk_rows(chunk_rows: int, n_samples: int, n_rows: int,
                    max_chunk_draws: int = MAX_CHUNK_DRAWS) -> int:
    """Catalog rows per chunk: ``chunk_rows`` at most, sized by memory (rows x ``n_samples``
    draws <= ``max_chunk_draws``), never more than the catalog has (a small catalog is one
    chunk of its own size, not padded to ``chunk_rows``)."""
    by_memory = max(1, int(max_chunk_draws) // max(int(n_samples), 1))
    return max(1, min(int(chunk_rows), by_memory, max(int(n_rows), 1)))


class _Plan(NamedTuple):
    """A run's configuration (hashed: resuming needs the same) and its chunks."""

    config: dict
    sha: str
    n_rows: int
    chunk_rows: int
    chunks: list  # every chunk: {index, file, row_start, row_stop}
    mine: list  # the chunks this process computes
    pidx: int
    pcount: int

    @property
    def n_chunks(self) -> int:
        return len(self.chunks)


def _check_run_args(n_samples, chunk_rows, max_rounds, hosts, mesh) -> tuple:
    """Sizes >= 1, hosts resolved to (process_index, process_count), the mesh local."""
    if int(n_samples) < 1 or int(chunk_rows) < 1 or int(max_rounds) < 1:
        raise ValueError("n_samples, chunk_rows and max_rounds must be >= 1")
    if mesh is not None:
        parallel.mesh_size(mesh, local=True)
    return parallel.resolve_hosts(hosts)


def infer_catalog_streaming(posterior, catalog, out, spec=None, *, n_samples: int = 1000,
                            key=0, chunk_rows: int = 16384, max_rounds: int = 20,
                            max_rows: int = 65536, mesh=None, hosts=None, model=None,
                            n_derived: int = 500, store_samples: bool = False,
                            keep_columns: Sequence[str] = (), hdu=None, hdf5_path=None,
                            z_range="prior", noise_policy: str = "auto", min_bands=None,
                            exact=None, overwrite: bool = False,
                            finalize: Optional[bool] = None,
                            keep_parts: Optional[bool] = None, progress: bool = True,
                            _stop_after_chunks: Optional[int] = None, _on_chunk=None,
                            **columns) -> InferenceResult:
    """Posterior summaries (and optionally samples) of every row of a catalog too large for
    memory, written to one HDF5 file; resumable, and splittable over devices and hosts. Each
    chunk is fit by :func:`sedflow_jax.sbi.inference.infer_rows`, the step of
    :func:`~sedflow_jax.sbi.inference.infer_catalog`: the values are the same. Output and work
    folder: see the module documentation.

    Args:
        posterior: an :class:`~sedflow_jax.sbi.posterior.AmortizedPosterior`.
        catalog: FITS (memory-mapped, first table HDU or ``hdu``) or HDF5 (``hdf5_path``: a
            table dataset or a group of column datasets; default the only table at the root,
            else the root group) path, or an astropy Table.
        out: the HDF5 file to write; the work folder is ``out + '.parts'``.
        spec: a :class:`sedflow_jax.io.catalog.ColumnSpec` (flux / ivar / z / extinction
            columns, ``snr_floor``, sentinels); ``columns`` keywords (``flux_fmt=``,
            ``vector_flux=``, ``extinction=``, ``snr_floor=``, ...) override its fields.
        n_samples, max_rounds: draws per galaxy and rejection rounds (as ``sample_batched``).
        key: int seed or ``jax.random`` key. Row g's draws depend only on (key, g).
        chunk_rows: catalog rows per chunk at most (part file, progress step); fewer when
            rows x n_samples would exceed :data:`MAX_CHUNK_DRAWS` or the catalog is smaller
            (:func:`plan_chunk_rows`). Part of the run's configuration, not of the values.
        max_rows: galaxies x samples per compiled sampling call (memory bound).
        mesh: local devices to split each chunk's sampling over (:func:`make_mesh`).
        hosts: ``(process_index, process_count)`` or ``'auto'``: this process computes the
            chunks i with ``i % process_count == process_index``.
        model: an SEDModel for derived-property summaries (``n_derived`` draws), or None.
        store_samples: also store every draw, ``samples/theta`` (n_rows, n_samples, 12).
        keep_columns: catalog columns copied to the output (e.g. an id), added to spec.keep.
        z_range: rows outside it are flagged and not sampled; ``'prior'`` (default) uses the
            posterior's prior redshift range, None disables the cut.
        noise_policy, min_bands: as :func:`sedflow_jax.sbi.inference.infer_catalog`.
        exact: None or :class:`~sedflow_jax.sbi.importance.ExactOptions`: importance-sampled
            exact posteriors with the ``is_*`` columns (as plain inference).
        overwrite: discard a work folder / output holding a different configuration.
        finalize: assemble ``out`` when every chunk exists (default: yes for one process;
            several processes: whichever finds all chunks done, or :func:`finalize_inference`).
        keep_parts: keep the chunk files after assembling (default: only with several
            processes, as another host may still be reading them).
        progress: tqdm bar over rows.
    """
    t_start = time.perf_counter()
    pidx, pcount = _check_run_args(n_samples, chunk_rows, max_rounds, hosts, mesh)
    finalize = True if finalize is None else finalize
    keep_parts = pcount > 1 if keep_parts is None else keep_parts
    key, out = as_key(key), os.path.abspath(os.fspath(out))
    spec = C.ColumnSpec.make(spec, **columns)
    spec = dataclasses.replace(spec, keep=tuple(dict.fromkeys(spec.keep + tuple(keep_columns))))
    fit = dict(max_rounds=int(max_rounds), model=model, n_derived=int(n_derived),
               noise_policy=noise_policy, min_bands=min_bands, z_range=z_range,
               max_draws=int(max_rows), exact=exact)
    cat = CatalogReader(catalog, hdu=hdu, hdf5_path=hdf5_path)
    try:
        spec = spec.resolve(cat, posterior.bands)  # short band names, NMGY / MODELFLUX arrays
        spec.check(cat.colnames, posterior.bands)
        plan = _plan(posterior, cat, spec, key, fit, n_samples=int(n_samples),
                     chunk_rows=int(chunk_rows), store_samples=store_samples,
                     pidx=pidx, pcount=pcount)
        if _finished(out, plan, overwrite):
            return InferenceResult(out, out + ".parts", plan.n_rows, plan.n_chunks,
                                   plan.chunk_rows, 0, True, True,
                                   {"total_s": time.perf_counter() - t_start})
        _prepare_parts(out, plan, overwrite)
        sampler = RowSampler(posterior.flow, int(n_samples), mesh=mesh, max_rows=max_rows)
        computed, rows_done, loop_s = _run_chunks(
            posterior, cat, out + ".parts", plan, spec, sampler, key, fit,
            store_samples=store_samples, progress=progress, stop_after=_stop_after_chunks,
            on_chunk=_on_chunk)
    finally:
        cat.close()
    return _conclude(out, plan, computed, rows_done, loop_s, t_start, finalize, keep_parts)


def _plan(posterior, cat, spec, key, fit, *, n_samples, chunk_rows, store_samples, pidx,
          pcount) -> _Plan:
    """The configuration (everything the values depend on, plus the chunking) and chunks."""
    model = fit["model"]
    n_rows = cat.n_rows
    chunk_rows = plan_chunk_rows(chunk_rows, n_samples, n_rows)
    config = {
        "format": INFER_FORMAT, "format_version": INFER_FORMAT_VERSION,
        "catalog": cat.fingerprint(), "chunk_rows": chunk_rows, "n_samples": n_samples,
        "key_data": np.asarray(jax.random.key_data(key)).ravel().tolist(),
        "key_impl": str(jax.random.key_impl(key)), "max_rounds": fit["max_rounds"],
        "posterior_sha256": _flow_sha256(posterior), "bands": list(posterior.bands),
        "z_range": resolve_z_range(posterior, fit["z_range"]),
        "columns": {k: v for k, v in spec.to_dict().items() if k != "keep"},
        "noise_policy": fit["noise_policy"], "min_bands": fit["min_bands"],
        "keep_columns": list(spec.keep), "store_samples": bool(store_samples),
        "derived": None if model is None else {
            "n_derived": fit["n_derived"], "filters": list(model.filter_names),
            "model_tables_sha256": tables_sha256(model.tables)},
    }
    if fit["exact"] is not None:  # absent otherwise: earlier runs keep their configuration
        config["exact"] = fit["exact"].config()
    config = json.loads(json.dumps(jsonable(config)))
    sha = hashlib.sha256(canonical_json(config).encode()).hexdigest()
    n_chunks = math.ceil(n_rows / chunk_rows) if n_rows else 0
    chunks = [{"index": i, "file": _PART.format(i), "row_start": i * chunk_rows,
               "row_stop": min(n_rows, (i + 1) * chunk_rows)} for i in range(n_chunks)]
    mine = [c for c in chunks if c["index"] % pcount == pidx]
    return _Plan(config, sha, n_rows, chunk_rows, chunks, mine, pidx, pcount)


def _finished(out: str, plan: _Plan, overwrite: bool) -> bool:
    """True if ``out`` holds this run already; refuses another run's output."""
    if not os.path.exists(out) or overwrite:
        return False
    if _output_config_sha(out) == plan.sha:
        return True
    raise ValueError(f"{out} exists and holds another inference run (or is not one); "
                     "pass overwrite=True or choose another path")


def _prepare_parts(out: str, plan: _Plan, overwrite: bool) -> None:
    """The work folder for this run: another run's chunks refused (or cleared with
    ``overwrite``), this process's leftover temporary files removed, ``run.json`` written."""
    parts = out + ".parts"
    multi, pidx, pcount = plan.pcount > 1, plan.pidx, plan.pcount
    run_path = os.path.join(parts, _RUN)
    if os.path.isdir(parts):
        if os.path.exists(run_path):
            try:
                run = _read_json(run_path)
            except (OSError, json.JSONDecodeError):
                run = {}
            if run.get("config_sha256") != plan.sha:
                if not overwrite:
                    raise ValueError(f"{parts} holds chunks of another inference run; pass "
                                     "overwrite=True to discard them, or choose another out")
                _clear_parts(parts, multi, pidx, pcount)
        elif glob.glob(os.path.join(parts, "chunk_*.npz")):
            if not overwrite:
                raise ValueError(f"{parts} holds chunk files but no {_RUN}; pass "
                                 "overwrite=True to discard them")
            _clear_parts(parts, multi, pidx, pcount)
        _remove_own_temporaries(parts, multi, pidx, pcount)
    os.makedirs(parts, exist_ok=True)
    if overwrite and os.path.exists(out) and not multi:
        os.remove(out)
    # identical bytes whoever writes it (no timestamps): concurrent hosts are harmless
    atomic_write_json(run_path, {"config": plan.config, "config_sha256": plan.sha,
                                 "n_rows": plan.n_rows, "n_chunks": plan.n_chunks})


def _remove_own_temporaries(parts, multi, pidx, pcount) -> None:
    for p in glob.glob(os.path.join(parts, "*.tmp-*")):
        base = os.path.basename(p)
        i = _chunk_index(base)
        if not multi or (i is not None and i % pcount == pidx) or \
                base.startswith(_progress_name(pidx, pcount)):
            try:
                os.remove(p)
            except FileNotFoundError:
                pass


class _Progress:
    """This process's progress file: the finished chunks with their rows, sha256 and timing."""

    def __init__(self, parts: str, plan: _Plan, done: dict):
        self.path = os.path.join(parts, _progress_name(plan.pidx, plan.pcount))
        self.plan, self.entries = plan, dict(done)
        self.write()

    def add(self, entry: dict) -> None:
        self.entries[entry["index"]] = entry
        self.write()

    def write(self) -> None:
        p = self.plan
        atomic_write_json(self.path, {
            "config_sha256": p.sha, "process_index": p.pidx, "process_count": p.pcount,
            "n_chunks": p.n_chunks, "assigned": [c["index"] for c in p.mine],
            "chunks": [self.entries[i] for i in sorted(self.entries)], "updated": utc_now()})


def _run_chunks(posterior, cat, parts, plan: _Plan, spec, sampler, key, fit, *, store_samples,
                progress, stop_after, on_chunk):
    """Compute this process's missing chunks: -> (computed, rows computed, seconds)."""
    done = _done_chunks(parts, plan.mine, plan.sha)
    todo = [c for c in plan.mine if c["index"] not in done]
    prog = _Progress(parts, plan, done)
    pbar = _progress_bar(plan, done) if progress and todo else None
    columns = spec.columns(posterior.bands)
    t_loop = time.perf_counter()
    rows_done = computed = 0
    try:
        for c in todo:
            t0 = time.perf_counter()
            r0, r1 = c["row_start"], c["row_stop"]
            res = infer_rows(posterior, cat.read(r0, r1, columns), np.arange(r0, r1),
                             sampler=sampler, key=key, spec=spec, **fit)
            data = _chunk_bytes(res, plan.sha, c, store_samples)
            atomic_write_bytes(os.path.join(parts, c["file"]), data)
            e = {k: c[k] for k in ("index", "file", "row_start", "row_stop")}
            e.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data),
                     n_usable=int(res.fit.sum()), seconds=time.perf_counter() - t0)
            prog.add(e)
            rows_done += r1 - r0
            computed += 1
            if pbar is not None:
                pbar.update(r1 - r0)
            if on_chunk is not None:
                on_chunk(c["index"])
            if stop_after is not None and computed >= int(stop_after):
                break
    finally:
        if pbar is not None:
            pbar.close()
    return computed, rows_done, time.perf_counter() - t_loop


def _progress_bar(plan: _Plan, done):
    from tqdm.auto import tqdm

    return tqdm(total=sum(c["row_stop"] - c["row_start"] for c in plan.mine),
                initial=sum(c["row_stop"] - c["row_start"] for c in plan.mine
                            if c["index"] in done),
                unit="gal", unit_scale=True, desc="infer")


def _chunk_bytes(res, sha: str, c: dict, store_samples: bool) -> bytes:
    """One chunk file (npz): its columns, optionally every draw, and its metadata."""
    cols = res.columns
    meta = {"config_sha256": sha, "index": c["index"], "row_start": c["row_start"],
            "row_stop": c["row_stop"], "columns": list(cols)}
    payload = {f"col_{k}": v for k, v in cols.items()}
    if store_samples:
        theta = np.asarray(res.samples.theta)
        th = np.full((len(res.fit),) + theta.shape[1:], np.nan, np.float32)
        th[res.fit] = theta
        payload["theta"] = th
    payload["__meta__"] = np.asarray(json.dumps(meta))
    buf = io.BytesIO()
    np.savez(buf, **payload)
    return buf.getvalue()


def _conclude(out, plan: _Plan, computed, rows_done, loop_s, t_start, finalize, keep_parts):
    parts = out + ".parts"
    complete = all(os.path.isfile(os.path.join(parts, c["file"])) for c in plan.chunks)
    finalized = False
    if complete and finalize:
        finalize_inference(out, keep_parts=keep_parts)
        finalized = True
    timings = {"total_s": time.perf_counter() - t_start, "loop_s": loop_s,
               "rows_computed": rows_done,
               "galaxies_per_s": rows_done / loop_s if rows_done and loop_s > 0 else None}
    return InferenceResult(out, parts, plan.n_rows, plan.n_chunks, plan.chunk_rows, computed,
                           complete, finalized, timings)


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
    tmp = temp_name(out)
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
                if "is_flag" in cols:  # --exact: fitted rows whose importance draws are unsure
                    stats["is_flagged"] = stats.get("is_flagged", 0) + \
                        int(cols["is_flag"][use].sum())
                stop += m
            if stop != n_rows:
                raise ValueError(f"{parts}: chunks hold {stop} rows, the catalog {n_rows}")
            f.attrs["format"] = INFER_FORMAT
            f.attrs["run"] = json.dumps(run)
            f.attrs["param_names"] = list(PARAM_NAMES)
            f.attrs["bands"] = list(config["bands"])
            f.attrs["n_rows"] = n_rows
            f.attrs["stats"] = json.dumps({**stats, "mean_acceptance": (
                stats["acceptance_sum"] / stats["n_usable"] if stats["n_usable"] else None)})
            f.attrs["sedflow_jax_version"] = str(package_version())
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
    parallel.barrier("sedflow_jax.infer.done")
    if jax.process_count() > 1 and jax.process_index() == 0:
        finalize_inference(out, keep_parts=keep_parts)
    parallel.barrier("sedflow_jax.infer.finalized")
    return res._replace(complete=True, finalized=True)
