"""Streaming catalog inference: catalogs too large for memory, in chunks written to a work
folder (resumable, split over devices and hosts), assembled into one HDF5 file."""
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
from ..sed.params import N_PARAMS, PARAM_NAMES
from ..sim.layout import to_conditioning
from ..sim.simulate import tables_sha256
from ..util import (as_key, atomic_write_bytes, atomic_write_json, canonical_json, jsonable,
                    package_version, sha256_arrays, temp_name, utc_now)
from .sampling import RowSampler, reject_to_box
from .summary import DERIVED, derived_samples, nanpercentile_rows

__all__ = ["INFER_FORMAT", "InferenceResult", "infer_catalog_streaming", "finalize_inference",
           "read_inference", "infer_distributed"]


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


def _chunk_summary(posterior, samples, *, use, flag, z, rows, model, n_derived, z_fill,
                   chunk_rows, keep):
    """Per-row output columns of one chunk (all rows, unusable ones NaN / 0 / False)."""
    m = use.shape[0]
    cols = {name: keep[name] for name in keep}
    cols["row"] = rows.astype(np.int64)
    th = np.full((m, samples.theta.shape[1], N_PARAMS), np.nan, np.float32)
    th[use] = samples.theta
    with np.errstate(all="ignore"):
        q = nanpercentile_rows(th, [16, 50, 84])
    for i, name in enumerate(PARAM_NAMES):
        cols[f"{name}_p50"] = q[1][:, i].astype(np.float64)
        cols[f"{name}_p16"] = q[0][:, i].astype(np.float64)
        cols[f"{name}_p84"] = q[2][:, i].astype(np.float64)
    if model is not None:
        # fixed shape (chunk_rows, k, 12) -> one compilation for every chunk
        zz = np.where(use & (z > 0) & (z <= model.config.z_max), z, z_fill)
        thp, _ = parallel.pad_rows(th, chunk_rows) if m < chunk_rows else (th, m)
        zp, _ = parallel.pad_rows(zz, chunk_rows) if m < chunk_rows else (zz, m)
        der = derived_samples(model, thp, zp, n_derived)
        with np.errstate(all="ignore"):
            for name in DERIVED:
                v = np.where(use[:, None], der[name][:m], np.nan)
                qq = nanpercentile_rows(v[..., None], [16, 50, 84])[..., 0]
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
    t_start = time.perf_counter()
    n_samples, chunk_rows = int(n_samples), int(chunk_rows)
    if n_samples < 1 or chunk_rows < 1 or int(max_rounds) < 1:
        raise ValueError("n_samples, chunk_rows and max_rounds must be >= 1")
    pidx, pcount = parallel.resolve_hosts(hosts)
    multi = pcount > 1
    if finalize is None:
        finalize = True
    if keep_parts is None:
        keep_parts = multi
    if mesh is not None:
        parallel.mesh_size(mesh, local=True)
    key = as_key(key)
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
    cat = CatalogReader(catalog, hdu=hdu, hdf5_path=hdf5_path)
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
                "model_tables_sha256": tables_sha256(model.tables)},
        }
        config = json.loads(json.dumps(jsonable(config)))
        config_sha = hashlib.sha256(canonical_json(config).encode()).hexdigest()
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
        atomic_write_json(run_path, {"config": config, "config_sha256": config_sha,
                                "n_rows": n_rows, "n_chunks": n_chunks})

        done = _done_chunks(parts, mine, config_sha)
        todo = [c for c in mine if c["index"] not in done]
        prog_path = os.path.join(parts, _progress_name(pidx, pcount))
        entries = dict(done)

        def write_progress():
            atomic_write_json(prog_path, {"config_sha256": config_sha, "process_index": pidx,
                                     "process_count": pcount, "n_chunks": n_chunks,
                                     "assigned": [c["index"] for c in mine],
                                     "chunks": [entries[i] for i in sorted(entries)],
                                     "updated": utc_now()})

        write_progress()
        pbar = None
        if progress and todo:
            from tqdm.auto import tqdm

            pbar = tqdm(total=sum(c["row_stop"] - c["row_start"] for c in mine),
                        initial=sum(c["row_stop"] - c["row_start"] for c in mine
                                    if c["index"] in done),
                        unit="gal", unit_scale=True, desc="infer")
        sampler = RowSampler(posterior.flow, n_samples, mesh=mesh, max_rows=max_rows) \
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
                x = to_conditioning(ph.flux, ph.sigma, ph.z)
                use = ph.flag == 0
                rows = np.arange(r0, r1, dtype=np.int64)
                smp = reject_to_box(posterior, sampler, key, x[use], rows[use], n_samples,
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
                atomic_write_bytes(os.path.join(parts, c["file"]), data)
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
