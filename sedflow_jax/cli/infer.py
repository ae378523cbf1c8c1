"""`infer` (plain and ``--stream``) and `finalize`: posteriors for catalogs.

Wiring only: the flags become one :class:`~sedflow_jax.io.catalog.ColumnSpec`, resolved against
the catalog (short band names, NSA NMGY, SDSS MODELFLUX recognised; the columns used printed);
without ``--model`` the shipped posterior matching the catalog's bands is used
(:func:`~sedflow_jax.sbi.defaults.default_posterior`, printed); the plain run
calls :func:`~sedflow_jax.sbi.inference.infer_catalog`, ``--stream`` calls
:func:`~sedflow_jax.sbi.streaming.infer_catalog_streaming` (both fit rows with the same
:func:`~sedflow_jax.sbi.inference.infer_rows`); the outputs are written all-or-nothing.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from sedflow_jax.io import catalog as C
from sedflow_jax.io.tables import HDF5_EXTENSIONS, CatalogReader
from sedflow_jax.sbi import streaming as ST
from sedflow_jax.sbi.defaults import PosteriorNotFound, default_posterior, load_posterior
from sedflow_jax.mcmc.refine import Refiner
from sedflow_jax.sbi.importance import ExactOptions
from sedflow_jax.sbi.inference import infer_catalog
from sedflow_jax.sed.params import PARAM_NAMES
from sedflow_jax.util import atomic_output, atomic_write_json
from sedflow_jax.version import __version__

from .args import CLIError
from .common import get_model, host_split, mesh_from_args, refuse_existing, write_table
from .config import H5_CONFIG_ATTR, TABLE_CONFIG_KEY, record, table_record

FLAG_SLUGS = {1: "nonfinite", 2: "flux_le0", 4: "ivar_le0", 8: "z_range", 16: "sentinel",
              32: "low_snr", 64: "too_few_bands", 128: "noise_oos"}


# ---------------------------------------------------------------------------------------------
# shared by both paths
# ---------------------------------------------------------------------------------------------
def check_infer_args(a) -> None:
    """Refuse impossible sizes before any work (one line, exit 2)."""
    for flag, value, least in (("--n-samples", a.n_samples, 1), ("--max-rounds", a.max_rounds, 1),
                               ("--n-derived", a.n_derived, 0),
                               ("--chunk-rows", getattr(a, "chunk_rows", 1), 1),
                               ("--target-ess", getattr(a, "target_ess", 1), 1),
                               ("--is-n-initial", getattr(a, "is_n_initial", 10), 10),
                               ("--refine-steps", getattr(a, "refine_steps", 10), 10),
                               ("--is-adapt", getattr(a, "is_adapt", 0), 0)):
        if value is not None and value < least:
            raise CLIError(f"{flag} must be >= {least}, got {value}")
    if getattr(a, "exact", False) and a.is_n_max < a.is_n_initial:
        raise CLIError(f"--is-n-max ({a.is_n_max}) must be >= --is-n-initial ({a.is_n_initial})")
    if getattr(a, "refine", False) and not getattr(a, "exact", False):
        raise CLIError("--refine refines the importance-sampled galaxies: add --exact")


#: columns copied to the output when --keep-columns is not given (those the catalog has; an
#: NSA / SDSS catalog's Z when it has no z)
DEFAULT_KEEP_COLUMNS = ("id", "ID", "RA", "DEC", "z")


def keep_columns(a, colnames) -> list:
    """The --keep-columns to copy: the default list keeps those the catalog has; names given
    explicitly must all exist (an unknown name is refused, not silently dropped)."""
    if a.keep_columns is None:
        keep = [c for c in DEFAULT_KEEP_COLUMNS if c in colnames]
        return keep + ["Z"] if "z" not in colnames and "Z" in colnames else keep
    given = list(a.keep_columns)
    missing = [c for c in given if c not in colnames]
    if missing:
        raise CLIError(f"--keep-columns: {a.catalog} has no column(s) {missing} (it has "
                       f"{list(colnames)[:20]})")
    return given


def column_spec(a, colnames) -> C.ColumnSpec:
    """The catalog layout the flags describe (the one spec of both inference paths)."""
    return C.ColumnSpec(flux_fmt=a.flux_fmt, ivar_fmt=a.ivar_fmt, z_col=a.z_column,
                        vector_flux=a.vector_flux, vector_ivar=a.vector_ivar,
                        vector_bands=getattr(a, "vector_bands", None),
                        extinction=a.extinction, snr_floor=a.snr_floor,
                        calibration_error=a.calibration_error,
                        keep=keep_columns(a, colnames))


def explicit_model(a):
    """The --model posterior (a folder or a shipped name), or None when not given."""
    if a.model is None:
        return None
    try:
        return load_posterior(a.model)
    except PosteriorNotFound as exc:
        raise CLIError(f"--model {exc}") from None


def default_model(a, table, spec):
    """The shipped posterior matching the catalog's bands (one line says which); a.model is
    set to its name, so the recorded configuration reruns with it."""
    bands = C.catalog_bands(table, spec)
    try:
        name = default_posterior(bands)
        post = load_posterior(name)
    except PosteriorNotFound as exc:
        raise CLIError(str(exc)) from None
    print(f"model: {name} (shipped default for the catalog's bands {','.join(bands)})")
    a.model = name
    return post


def resolved_spec(spec, table, post) -> C.ColumnSpec:
    """``spec`` resolved against the catalog for the model's bands; one line says which
    columns were used when they are not the declared layout."""
    out = spec.resolve(table, post.bands)
    if out != spec:
        print(f"catalog: {out.describe(post.bands)}")
    return out


def derived_model(a, post):
    return get_model(None, post.bands, max(post.prior.zmax, 1e-3)) if a.n_derived > 0 else None


def exact_options(a, post):
    """The importance-sampling options of ``--exact`` (None without it)."""
    if not getattr(a, "exact", False):
        return None
    model = get_model(None, post.bands, max(post.prior.zmax, 1e-3))
    refine = None
    if getattr(a, "refine", False):
        warm = int(round(0.3 * a.refine_steps))
        refine = Refiner(model, sampler=a.refine_sampler,
                         num_chains=4 if a.refine_sampler == "nuts" else 30,
                         num_warmup=warm, num_samples=a.refine_steps - warm)
    adapt = {} if getattr(a, "is_adapt", None) is None else {"adapt": a.is_adapt}
    return ExactOptions(model=model, n_initial=a.is_n_initial, n_max=a.is_n_max,
                        target_ess=a.target_ess, refine=refine, **adapt)


def print_exact(is_flag, fit) -> None:
    """One line on the importance-sampled rows: how many are trustworthy."""
    k = int(np.sum(np.asarray(is_flag)[np.asarray(fit, bool)]))
    n = int(np.sum(fit))
    print(f"exact: {n - k} of {n} fitted rows trustworthy (k-hat < 0.7, ESS >= target); "
          f"{k} flagged is_flag=1 (see is_reason)")


def flag_meta(flag) -> dict:
    """FITS-friendly scalar counts of a flag column: n_rows, n_usable, n_flag_<reason>."""
    flag = np.asarray(flag, np.int64)
    d = {"n_rows": int(flag.size), "n_usable": int((flag == 0).sum())}
    for bit in sorted(C.FLAG_NAMES):
        d[f"n_flag_{FLAG_SLUGS.get(bit, f'bit{bit}')}"] = int(((flag & bit) > 0).sum())
    return d


def flagged_text(counts) -> str:
    """'name n, ...' of the nonzero flag counts of :func:`flag_meta`."""
    out = []
    for b in sorted(C.FLAG_NAMES):
        k = counts.get(f"n_flag_{FLAG_SLUGS.get(b, f'bit{b}')}")
        if k:
            out.append(f"{C.FLAG_NAMES[b]} {k}")
    return ", ".join(out)


def print_counts(counts, stats=None):
    line = (f"{counts['n_rows']} rows: {counts['n_usable']} usable; flagged: "
            f"{flagged_text(counts) or 'none'}")
    if stats:
        ma = stats.get("mean_acceptance")
        line += (f"; mean acceptance {ma:.3f}" if ma is not None else "") + \
            f"; low acceptance {stats.get('low_acceptance')}; out of support {stats.get('ood')}"
    print(line)


# ---------------------------------------------------------------------------------------------
# plain `infer`: one table in memory
# ---------------------------------------------------------------------------------------------
def cmd_infer(a):
    """Posterior samples and summaries for every usable row of a catalog."""
    check_infer_args(a)
    if a.stream:
        return infer_stream(a)
    refuse_existing(a.out, a.overwrite)
    refuse_existing(a.samples, a.overwrite, "--samples file")
    if a.devices not in (None, 1) or a.process_id is not None or a.num_processes is not None \
            or a.coordinator or a.distributed:
        raise CLIError("--devices, --process-id, --num-processes, --coordinator and "
                       "--distributed need --stream")
    fmt = table_format(a.out)
    for flag, path in (("--out", a.out), ("--samples", a.samples)):
        if path is not None and not Path(path).resolve().parent.is_dir():
            raise CLIError(f"{flag} {path}: folder {Path(path).parent} does not exist")
    post = explicit_model(a)
    catalog = C.read_table(a.catalog)
    spec = column_spec(a, catalog.colnames)
    post = post or default_model(a, catalog, spec)
    spec = resolved_spec(spec, catalog, post)
    res = infer_catalog(post, catalog, spec, key=a.seed,
                        n_samples=a.n_samples, n_derived=a.n_derived,
                        model=derived_model(a, post), derived=a.n_derived > 0,
                        noise_policy=a.noise_policy, max_rounds=a.max_rounds,
                        exact=exact_options(a, post))
    t, s = res.table, res.samples
    counts = flag_meta(t["flag"])
    if not res.rows.size:
        raise CLIError(f"{a.catalog}: no usable row of {len(t)} (flagged: "
                       f"{flagged_text(counts)}); nothing written")
    t.meta.clear()
    t.meta.update({"model": str(a.model), "n_samples": a.n_samples, "seed": a.seed,
                   "SJCOLS": res.photometry.layout,
                   "sedflow_jax_version": __version__, "flag_counts": res.photometry.counts,
                   **counts, TABLE_CONFIG_KEY: table_record(a)})
    with atomic_output(a.out, a.samples) as (tmp_out, tmp_samples):
        write_table(t, tmp_out, True, format=fmt)
        if tmp_samples is not None:
            write_samples(tmp_samples, s.theta, res.rows)
    print_counts(counts)
    if getattr(a, "exact", False):
        print_exact(t["is_flag"], t["fit"])
    print(f"wrote {a.out}; mean acceptance {np.mean(s.acceptance):.3f}; "
          f"low acceptance {int(s.low_acceptance.sum())}; out of support {int(s.ood.sum())}")


def table_format(path) -> str:
    """astropy's table format for an output path (from its extension), checked before work."""
    from astropy.io import registry
    from astropy.table import Table

    fmts = registry.identify_format("write", Table, str(path), None, [], {})
    if not fmts:
        raise CLIError(f"--out {path}: no table format for this extension (use .fits, .ecsv, "
                       ".csv, .h5, ...)")
    return sorted(fmts, key=lambda f: (not f.startswith(("fits", "ascii", "hdf5")), f))[0]


def write_samples(path, theta, rows) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        f["theta"] = theta
        f["rows"] = rows
        f.attrs["param_names"] = list(PARAM_NAMES)


# ---------------------------------------------------------------------------------------------
# `infer --stream` and `finalize`
# ---------------------------------------------------------------------------------------------
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


def check_stream_out(a, out: Path) -> None:
    if out.suffix.lower() not in HDF5_EXTENSIONS:
        raise CLIError(f"--stream writes one HDF5 file: give --out NAME.h5, not {out.name} "
                       "(then `sedflow-jax finalize NAME.h5 --out TABLE` exports any table "
                       "format)")
    if a.samples:
        raise CLIError("--samples FILE is for runs without --stream; with --stream use "
                       "--store-samples (the draws go to samples/theta in --out)")
    if not Path(a.catalog).exists():
        raise CLIError(f"--catalog {a.catalog}: no such file")


def refuse_stream_existing(a, out: Path, multi: bool) -> None:
    parts = Path(str(out) + ".parts")
    if not (a.resume or a.overwrite or multi) and (out.exists() or parts.exists()):
        raise CLIError(f"{out if out.exists() else parts} exists (use --resume to continue a "
                       "killed run or reuse a finished one, --overwrite to start again)")


def infer_stream(a):
    """`infer --stream`: chunked, resumable, over devices / hosts, into one HDF5 file."""
    out = Path(a.out)
    check_stream_out(a, out)
    hosts, dist = host_split(a)
    multi = hosts is not None and hosts[1] > 1
    refuse_stream_existing(a, out, multi)
    post = explicit_model(a)
    cat = CatalogReader(a.catalog)
    try:
        spec = column_spec(a, list(cat.colnames))
        post = post or default_model(a, cat, spec)
        spec = resolved_spec(spec, cat, post)
    finally:
        cat.close()
    kw = dict(n_samples=a.n_samples, key=a.seed, chunk_rows=a.chunk_rows,
              max_rounds=a.max_rounds, model=derived_model(a, post), n_derived=a.n_derived,
              store_samples=a.store_samples, noise_policy=a.noise_policy,
              exact=exact_options(a, post), overwrite=a.overwrite, progress=not a.quiet,
              mesh=mesh_from_args(a))
    if dist:
        res = ST.infer_distributed(post, a.catalog, out, spec=spec, keep_parts=a.keep_parts,
                                   **kw)
    else:
        res = ST.infer_catalog_streaming(post, a.catalog, out, spec, hosts=hosts,
                                         keep_parts=a.keep_parts if a.keep_parts else None,
                                         **kw)
    report_stream(a, res, out, hosts, multi)


def report_stream(a, res, out: Path, hosts, multi: bool) -> None:
    rec = record(a)
    who = f"host {hosts[0]} of {hosts[1]}: " if multi else ""
    if os.path.isdir(res.parts):
        name = f"config.host{hosts[0]}.json" if multi else "config.json"
        atomic_write_json(os.path.join(res.parts, name), rec, sort_keys=True)
    print(f"{who}{res.chunks_computed} chunk(s) of {res.chunk_rows} rows computed here; "
          f"{res.n_chunks} in all for {res.n_rows} rows")
    parts = Path(str(out) + ".parts")
    if res.finalized and out.exists():
        import h5py

        counts = annotate_h5(out, rec)
        with h5py.File(out, "r") as f:
            stats = json.loads(f.attrs["stats"])
        print_counts(counts, stats)
        if "is_flagged" in stats:
            print(f"exact: {stats['is_flagged']} of {stats['n_usable']} fitted rows flagged "
                  "is_flag=1 (k-hat >= 0.7 or ESS < target; see is_reason)")
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
    rec, counts = assemble(a, h5, parts)
    t, _ = ST.read_inference(h5)
    stats = t.meta["stats"]
    print_counts(counts, stats)
    if a.out is not None:
        export_table(a, t, stats, counts, rec)


def assemble(a, h5: Path, parts: Path):
    """-> (recorded `infer` configuration or None, flag counts) of an assembled output."""
    if parts.is_dir():
        rec = parts_record(parts)
        ST.finalize_inference(h5, keep_parts=a.keep_parts)
        counts = annotate_h5(h5, rec)
        print(f"assembled {h5}" + ("" if a.keep_parts else f"; removed {parts}"))
        return rec, counts
    if not h5.is_file():
        raise CLIError(f"{a.path}: neither a streaming-inference output nor its .parts folder")
    import h5py

    with h5py.File(h5, "r") as f:
        rec = json.loads(f.attrs[H5_CONFIG_ATTR]) if H5_CONFIG_ATTR in f.attrs else None
        counts = json.loads(f.attrs["flag_counts"]) if "flag_counts" in f.attrs else None
    if counts is None:
        counts = annotate_h5(h5, rec)
    print(f"{h5} is already assembled")
    return rec, counts


def export_table(a, t, stats, counts, rec) -> None:
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
