"""`infer` (plain and ``--stream``) and `finalize`: posteriors for catalogs."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from sedflow_jax.io.tables import HDF5_EXTENSIONS, CatalogReader
from sedflow_jax.sbi import streaming as ST
from sedflow_jax.util import atomic_write_json

from .common import CLIError, get_model, host_split, mesh_from_args, refuse_existing, write_table
from .config import H5_CONFIG_ATTR, TABLE_CONFIG_KEY, record, table_record


def cmd_infer(a):
    """Posterior samples and summaries for every usable row of a catalog."""
    import jax
    from astropy.table import hstack

    import sedflow_jax as sj
    from sedflow_jax.io import catalog as C
    from sedflow_jax.sbi.posterior import AmortizedPosterior
    from sedflow_jax.sbi.summary import summarize

    if a.stream:
        return infer_stream(a)
    refuse_existing(a.out, a.overwrite)
    refuse_existing(a.samples, a.overwrite, "--samples file")
    if a.devices not in (None, 1) or a.process_id is not None or a.num_processes is not None \
            or a.coordinator or a.distributed:
        raise CLIError("--devices, --process-id, --num-processes, --coordinator and "
                       "--distributed need --stream")
    post = AmortizedPosterior.load(a.model)
    zr = (post.prior.zmin, post.prior.zmax)
    from sedflow_jax.sbi.inference import noise_ood_rows, prepare_catalog, scatter_rows

    catalog = C.read_table(a.catalog)  # read once: photometry and the kept columns
    read_kw = {k: v for k, v in (("vector_flux", a.vector_flux), ("vector_ivar", a.vector_ivar),
                                 ("extinction", a.extinction)) if v}
    ph, x, use, mrep = prepare_catalog(post, catalog, snr_floor=a.snr_floor,
                                       noise_policy=a.noise_policy, flux_fmt=a.flux_fmt,
                                       ivar_fmt=a.ivar_fmt, z_col=a.z_column, **read_kw)
    print(f"{len(use)} rows: {int(use.sum())} usable ({mrep['n_rows_fit_with_masked_bands']} "
          "with masked bands); flagged: "
          + ", ".join(f"{k} {v}" for k, v in mrep["row_flag_counts"].items() if v))
    if not use.any():
        raise CLIError(f"{a.catalog}: no usable row of {len(use)} (flagged: "
                       + ", ".join(f"{k} {v}" for k, v in ph.counts.items() if k != "usable"
                                   and v) + "); nothing written")
    key = jax.random.key(a.seed)
    s = post.sample_batched(key, x[use], a.n_samples, max_rounds=a.max_rounds,
                            mask=ph.mask[use] if post.mask_aware else None)
    model = get_model(None, post.bands, max(zr[1], 1e-3))
    summ = summarize(s, model=model if a.n_derived > 0 else None, z=ph.z[use],
                     n_derived=a.n_derived)
    full = scatter_rows(summ, use, len(use))
    full["flag"] = ph.flag
    full["n_bands_used"] = ph.mask.sum(1)
    full["ood"] |= ((ph.flag & (C.FLAG_Z_RANGE | C.FLAG_NOISE_OOS)) > 0) | noise_ood_rows(ph)
    keep_cols = [c for c in a.keep_columns if c in catalog.colnames]
    if keep_cols:
        full = hstack([catalog[keep_cols], full])
    full.meta.update({"model": str(a.model), "n_samples": a.n_samples, "seed": a.seed,
                      "sedflow_jax_version": sj.__version__, "flag_counts": ph.counts,
                      **flag_meta(ph.flag), TABLE_CONFIG_KEY: table_record(a)})
    write_table(full, a.out, a.overwrite)
    if a.samples:
        import h5py

        with h5py.File(a.samples, "w") as f:
            f["theta"] = s.theta
            f["rows"] = np.flatnonzero(use)
            f.attrs["param_names"] = list(sj.PARAM_NAMES)
    print(f"wrote {a.out}; mean acceptance {np.mean(s.acceptance):.3f}; "
          f"low acceptance {int(s.low_acceptance.sum())}; out of support {int(s.ood.sum())}")


FLAG_SLUGS = {1: "nonfinite", 2: "flux_le0", 4: "ivar_le0", 8: "z_range", 16: "sentinel",
               32: "low_snr", 64: "too_few_bands", 128: "noise_oos"}


def flag_meta(flag) -> dict:
    """FITS-friendly scalar counts of a flag column: n_rows, n_usable, n_flag_<reason>."""
    from sedflow_jax.io import catalog as C

    flag = np.asarray(flag, np.int64)
    d = {"n_rows": int(flag.size), "n_usable": int((flag == 0).sum())}
    for bit in sorted(C.FLAG_NAMES):
        d[f"n_flag_{FLAG_SLUGS.get(bit, f'bit{bit}')}"] = int(((flag & bit) > 0).sum())
    return d


def h5_flags(path) -> np.ndarray:
    """The flag column of a streaming-inference output, read in slices."""
    import h5py

    with h5py.File(path, "r") as f:
        d = f["summary"]
        step = 1 << 20
        return np.concatenate([d.fields("flag")[i:i + step] for i in range(0, d.shape[0], step)]
                              or [np.zeros(0, np.int64)])


def annotate_h5(path, record):
    """Add the recorded CLI configuration and per-flag counts to a finished HDF5 output."""
    import h5py

    counts = flag_meta(h5_flags(path))
    with h5py.File(path, "a") as f:
        if record is not None:
            f.attrs[H5_CONFIG_ATTR] = json.dumps(record, allow_nan=True)
        f.attrs["flag_counts"] = json.dumps(counts)
    return counts


def print_counts(counts, stats=None):
    from sedflow_jax.io import catalog as C

    flagged = []
    for b in sorted(C.FLAG_NAMES):
        k = counts.get(f"n_flag_{FLAG_SLUGS.get(b, f'bit{b}')}")
        if k:
            flagged.append(f"{C.FLAG_NAMES[b]} {k}")
    line = (f"{counts['n_rows']} rows: {counts['n_usable']} usable; flagged: "
            f"{', '.join(flagged) or 'none'}")
    if stats:
        ma = stats.get("mean_acceptance")
        line += (f"; mean acceptance {ma:.3f}" if ma is not None else "") + \
            f"; low acceptance {stats.get('low_acceptance')}; out of support {stats.get('ood')}"
    print(line)


def infer_stream(a):
    """`infer --stream`: chunked, resumable, over devices / hosts, into one HDF5 file."""
    from sedflow_jax.sbi.posterior import AmortizedPosterior

    out = Path(a.out)
    if out.suffix.lower() not in HDF5_EXTENSIONS:
        raise CLIError(f"--stream writes one HDF5 file: give --out NAME.h5, not {out.name} "
                       "(then `sedflow-jax finalize NAME.h5 --out TABLE` exports any table "
                       "format)")
    if a.samples:
        raise CLIError("--samples FILE is for runs without --stream; with --stream use "
                       "--store-samples (the draws go to samples/theta in --out)")
    if not Path(a.catalog).exists():
        raise CLIError(f"--catalog {a.catalog}: no such file")
    parts = Path(str(out) + ".parts")
    hosts, dist = host_split(a)
    multi = hosts is not None and hosts[1] > 1
    if not (a.resume or a.overwrite or multi) and (out.exists() or parts.exists()):
        raise CLIError(f"{out if out.exists() else parts} exists (use --resume to continue a "
                       "killed run or reuse a finished one, --overwrite to start again)")
    post = AmortizedPosterior.load(a.model)
    cat = CatalogReader(a.catalog)
    try:
        colnames = list(cat.colnames)
    finally:
        cat.close()
    keep = [c for c in a.keep_columns if c in colnames]
    zmax = post.prior.zmax
    model = get_model(None, post.bands, max(zmax, 1e-3)) if a.n_derived > 0 else None
    kw = dict(n_samples=a.n_samples, key=a.seed, chunk_rows=a.chunk_rows,
              max_rounds=a.max_rounds, model=model, n_derived=a.n_derived,
              store_samples=a.store_samples, keep_columns=keep, flux_fmt=a.flux_fmt,
              ivar_fmt=a.ivar_fmt, z_col=a.z_column, overwrite=a.overwrite,
              progress=not a.quiet)
    mesh = mesh_from_args(a)
    if dist:
        res = ST.infer_distributed(post, a.catalog, out, mesh=mesh, keep_parts=a.keep_parts,
                                    **kw)
    else:
        res = ST.infer_catalog_streaming(post, a.catalog, out, mesh=mesh, hosts=hosts,
                                          keep_parts=a.keep_parts if a.keep_parts else None,
                                          **kw)
    rec = record(a)
    who = f"host {hosts[0]} of {hosts[1]}: " if multi else ""
    if os.path.isdir(res.parts):
        name = f"config.host{hosts[0]}.json" if multi else "config.json"
        atomic_write_json(os.path.join(res.parts, name), rec, sort_keys=True)
    print(f"{who}{res.chunks_computed} chunk(s) of {res.chunk_rows} rows computed here; "
          f"{res.n_chunks} in all for {res.n_rows} rows")
    if res.finalized and out.exists():
        import h5py

        counts = annotate_h5(out, rec)
        with h5py.File(out, "r") as f:
            stats = json.loads(f.attrs["stats"])
        print_counts(counts, stats)
        print(f"wrote {out}; export a table with `sedflow-jax finalize {out} --out TABLE`")
    else:
        print(f"{parts}: not all chunks are done yet; rerun the missing hosts (or this command "
              f"with --resume), then `sedflow-jax finalize {out}`")


def parts_record(parts: Path):
    for name in ["config.json"] + sorted(p.name for p in parts.glob("config.host*.json")):
        p = parts / name
        if p.is_file():
            try:
                return json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                continue
    return None


def cmd_finalize(a):
    """Assemble a streaming inference's chunk files into its HDF5 output; export a table."""
    if a.path is None:
        raise CLIError("give the inference output: sedflow-jax finalize OUT.h5 (or OUT.h5.parts)")
    p = Path(a.path)
    h5 = Path(str(p)[: -len(".parts")]) if p.name.endswith(".parts") else p
    parts = Path(str(h5) + ".parts")
    if a.out is not None:
        refuse_existing(a.out, a.overwrite)
        if Path(a.out).resolve() == h5.resolve():
            raise CLIError(f"--out {a.out} is the HDF5 output itself; choose another path")
    if parts.is_dir():
        rec = parts_record(parts)
        ST.finalize_inference(h5, keep_parts=a.keep_parts)
        counts = annotate_h5(h5, rec)
        print(f"assembled {h5}" + ("" if a.keep_parts else f"; removed {parts}"))
    elif h5.is_file():
        import h5py

        with h5py.File(h5, "r") as f:
            rec = json.loads(f.attrs[H5_CONFIG_ATTR]) if H5_CONFIG_ATTR in f.attrs else None
            counts = json.loads(f.attrs["flag_counts"]) if "flag_counts" in f.attrs else None
        if counts is None:
            counts = annotate_h5(h5, rec)
        print(f"{h5} is already assembled")
    else:
        raise CLIError(f"{a.path}: neither a streaming-inference output nor its .parts folder")
    t, _ = ST.read_inference(h5)
    stats = t.meta["stats"]
    print_counts(counts, stats)
    if a.out is not None:
        for c in t.colnames:
            if t[c].dtype.kind == "S":
                t[c] = np.char.decode(np.asarray(t[c]), "utf-8")
        run = t.meta.pop("run")
        t.meta.clear()
        t.meta.update({"sedflow_jax_version": run.get("sedflow_jax_version") or
                       record(a)["sedflow_jax_version"],
                       "n_samples": run["config"]["n_samples"], "stats": json.dumps(stats),
                       "run_config_sha256": run["config_sha256"], **counts,
                       TABLE_CONFIG_KEY: table_record(a)})
        if rec is not None:
            t.meta["SJINFER"] = json.dumps(rec, allow_nan=True)
        write_table(t, a.out, a.overwrite)
        print(f"wrote {a.out} ({len(t)} rows)")
