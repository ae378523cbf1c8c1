"""`sedflow-jax` command line: thin wiring from arguments to the library, no science here."""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

import numpy as np

EXAMPLE_THETA = [10.5, 0.25, 0.25, 0.25, 0.25, 0.1, 2.0, 1e-3, 1e-3, 0.5, 0.5, -0.3]


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


# =============================================================================================
# configuration files: `--config FILE.toml`, the recorded config of a run, `--dump-config`
# =============================================================================================
#: name of the recorded configuration in output folders
CONFIG_NAME = "config.toml"
#: table meta key (FITS-safe: 8 characters) holding the recorded configuration as JSON
TABLE_CONFIG_KEY = "SJCONFIG"
#: HDF5 attribute of streaming-inference outputs holding the recorded configuration as JSON
H5_CONFIG_ATTR = "sedflow_cli_config"
_META_KEYS = ("command", "sedflow_jax_version")
_NOT_CONFIG = ("help", "config", "dump_config")
_HDF5_EXT = (".h5", ".hdf5", ".hdf", ".he5")


def _config_actions(subparser):
    """key -> argparse action for every configurable option of a subcommand (long option
    names with dashes or underscores, and the dest name)."""
    names = {}
    for act in subparser._actions:
        if act.dest in _NOT_CONFIG or act.dest is argparse.SUPPRESS:
            continue
        keys = [s[2:] for s in act.option_strings if s.startswith("--")] or [act.dest]
        for k in (*keys, act.dest):
            names[k] = act
            names[k.replace("-", "_")] = act
            names[k.replace("_", "-")] = act
    return names


def _config_key(act) -> str:
    """The key a recorded configuration uses for an action: its first long option name."""
    return next((s[2:] for s in act.option_strings if s.startswith("--")), act.dest)


def _convert_config_value(act, key, value, source):
    """A TOML value converted and checked as argparse would convert the flag."""
    where = f"{source}: {key!r}"
    if act.nargs == 0:  # flags (BooleanOptionalAction)
        if not isinstance(value, bool):
            raise CLIError(f"{where} must be true or false, got {value!r}")
        return value
    multi = act.nargs in ("+", "*") or isinstance(act.nargs, int)
    if isinstance(value, dict):
        raise CLIError(f"{where} must be a value or a list, not a table")
    if isinstance(value, list) and not multi:
        raise CLIError(f"{where} takes one value, got a list {value!r}")
    vals = value if isinstance(value, list) else [value]
    if isinstance(act.nargs, int) and len(vals) != act.nargs:
        raise CLIError(f"{where} needs {act.nargs} values, got {len(vals)}")
    if act.nargs == "+" and not vals:
        raise CLIError(f"{where} needs at least one value")
    out = []
    for v in vals:
        if isinstance(v, (dict, list)):
            raise CLIError(f"{where}: nested value {v!r}")
        if isinstance(v, bool) and act.type not in (None, str):
            raise CLIError(f"{where} must be a number, got {v!r}")
        s = v if isinstance(v, str) else repr(v) if isinstance(v, float) else str(v)
        try:
            c = act.type(s) if act.type is not None else s
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            raise CLIError(f"{where}: invalid value {v!r} ({exc})") from exc
        if act.choices is not None and c not in act.choices:
            raise CLIError(f"{where}: {v!r} is not one of {list(act.choices)}")
        out.append(c)
    return out if multi else out[0]


def _read_recorded_config(path: Path, command: str) -> dict:
    """The configuration recorded in a previous output: a folder (its config.toml), a table
    (meta SJCONFIG; a table written by `finalize` also holds its `infer` run's, SJINFER) or a
    streaming-inference HDF5 file (attribute sedflow_cli_config)."""
    if path.is_dir():
        cands = [path / CONFIG_NAME] + sorted(path.glob("config.host*.toml"))
        for c in cands:
            if c.is_file():
                return _read_toml(c)
        raise CLIError(f"--config {path}: a folder without a recorded {CONFIG_NAME}")
    if path.suffix.lower() in _HDF5_EXT:
        import h5py

        try:
            with h5py.File(path, "r") as f:
                if H5_CONFIG_ATTR in f.attrs:
                    return json.loads(f.attrs[H5_CONFIG_ATTR])
        except OSError as exc:
            raise CLIError(f"--config {path}: not a readable HDF5 file ({exc})") from exc
    from astropy.table import Table

    try:
        meta = Table.read(path, **({"path": "summary"} if path.suffix.lower() in _HDF5_EXT
                                   else {})).meta
    except Exception as exc:  # noqa: BLE001 -- any unreadable file: one clear message
        raise CLIError(f"--config {path}: not a TOML file, an output folder or a table "
                       f"({exc.__class__.__name__}: {exc})") from exc
    if TABLE_CONFIG_KEY not in meta:
        raise CLIError(f"--config {path}: the table holds no recorded configuration "
                       f"(meta {TABLE_CONFIG_KEY})")
    rec = json.loads(meta[TABLE_CONFIG_KEY])
    if rec.get("command") != command and command == "infer" and "SJINFER" in meta:
        rec = json.loads(meta["SJINFER"])
    return rec


def _read_toml(path: Path) -> dict:
    import tomllib

    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise CLIError(f"--config {path}: invalid TOML ({exc})") from exc


def load_config(path, command: str) -> dict:
    """Option values for subcommand ``command`` from ``path``: a TOML file whose keys are the
    subcommand's long option names (top-level keys, and/or a ``[command]`` table that
    overrides them; tables named after other subcommands are ignored), or a previous output
    holding a recorded configuration. Reserved keys: ``command`` (must match) and
    ``sedflow_jax_version`` (a mismatch is reported)."""
    p = Path(path)
    if not p.exists():
        raise CLIError(f"--config {p}: no such file")
    doc = _read_toml(p) if p.suffix.lower() == ".toml" else _read_recorded_config(p, command)
    doc = dict(doc)
    cmd = doc.pop("command", None)
    ver = doc.pop("sedflow_jax_version", None)
    if cmd is not None and cmd != command:
        raise CLIError(f"--config {p} records a `{cmd}` run, not `{command}`")
    if ver is not None:
        import sedflow_jax as sj

        if str(ver) != sj.__version__:
            print(f"sedflow-jax {command}: note: {p} was recorded with sedflow_jax {ver}, "
                  f"this is {sj.__version__}", file=sys.stderr)
    subs = set(SUBCOMMANDS) | {s.replace("-", "_") for s in SUBCOMMANDS}
    section = {}
    for name in (command, command.replace("-", "_")):
        if isinstance(doc.get(name), dict):
            section.update(doc.pop(name))
    flat = {k: v for k, v in doc.items() if not (isinstance(v, dict) and k in subs)}
    flat.update(section)
    return flat


def _apply_config(subparser, command, values, source):
    """Config values become the subparser's defaults (command-line flags still override)."""
    acts = _config_actions(subparser)
    unknown = [k for k in values if k not in acts]
    if unknown:
        valid = sorted({_config_key(a) for a in acts.values()})
        raise CLIError(f"{source}: unknown option(s) {unknown} for `{command}`; valid keys: "
                       f"{', '.join(valid)}")
    seen = {}
    for k, v in values.items():
        act = acts[k]
        if act.dest in seen:
            raise CLIError(f"{source}: {k!r} and {seen[act.dest]!r} are the same option")
        seen[act.dest] = k
        act.default = _convert_config_value(act, k, v, source)
        act.required = False


def resolved_config(a, command: str) -> dict:
    """Every option of a parsed run (None values left out), keyed by long option name."""
    sub = build_parser()._sj_subparsers[command]
    out = {}
    for act in sub._actions:
        if act.dest in _NOT_CONFIG or act.dest is argparse.SUPPRESS:
            continue
        v = getattr(a, act.dest, None)
        if v is None:
            continue
        if isinstance(v, (tuple, list)):
            v = [str(x) if isinstance(x, Path) else x for x in v]
        elif isinstance(v, Path):
            v = str(v)
        out[_config_key(act)] = v
    return out


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if v != v:
            return "nan"
        if v in (float("inf"), float("-inf")):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a valid TOML basic string


def _toml_key(k: str) -> str:
    import re

    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def dump_config(values: dict, command: str, *, comment: str = "") -> str:
    """TOML text of a run's configuration (readable back with ``--config``)."""
    import sedflow_jax as sj

    lines = [f"# sedflow-jax {command} configuration{(' ' + comment) if comment else ''}",
             f"# reproduce: sedflow-jax {command} --config THIS_FILE  (flags override it)",
             f"command = {_toml_value(command)}",
             f"sedflow_jax_version = {_toml_value(sj.__version__)}"]
    lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def _record(a) -> dict:
    """What is stored with an output: command, package version and every option."""
    import sedflow_jax as sj

    return {"command": a.command, "sedflow_jax_version": sj.__version__,
            **resolved_config(a, a.command)}


def _write_config(folder, a, name: str = CONFIG_NAME) -> Path:
    """Write the resolved configuration of this run into an output folder (atomically)."""
    cfg = _record(a)
    cfg.pop("command"), cfg.pop("sedflow_jax_version")
    text = dump_config(cfg, a.command, comment=f"(cwd {os.getcwd()})")
    p = Path(folder) / name
    tmp = p.with_name(f"{p.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, p)
    return p


def _table_record(a) -> str:
    return json.dumps(_record(a), allow_nan=True)


def _write_table(t, path, overwrite):
    """astropy Table.write, FITS header warnings (long keys, dict meta) silenced."""
    import warnings

    kw = {"path": "summary", "serialize_meta": True} if str(path).lower().endswith(
        _HDF5_EXT) else {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*HIERARCH.*")
        warnings.filterwarnings("ignore", message=".*cannot be added to FITS Header.*")
        warnings.filterwarnings("ignore", category=UserWarning, module="astropy")
        t.write(path, overwrite=overwrite, **kw)


def _refuse_existing(path, overwrite, what="output", hint="use --overwrite"):
    if path is not None and Path(path).exists() and not overwrite:
        raise CLIError(f"{what} {path} exists ({hint})")


def _devices_type(s):
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


def _mesh(a):
    """--devices -> a 1-d mesh over local devices (None for one device / not given)."""
    dev = getattr(a, "devices", None)
    if dev is None or dev == 1:
        return None
    from sedflow_jax import parallel as par

    try:
        return par.make_mesh(None if dev == "all" else dev)
    except ValueError as exc:
        raise CLIError(f"--devices {dev}: {exc}") from exc


def _host_args(ap, what):
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


def _hosts(a):
    """-> (hosts for simulate / infer_catalog_streaming or None, jax.distributed job?)."""
    p, n = a.process_id, a.num_processes
    if n is not None and p is not None and not 0 <= p < n:
        raise CLIError(f"need 0 <= --process-id < --num-processes, got {p} and {n}")
    if a.coordinator or a.distributed:
        from sedflow_jax import parallel as par

        try:
            pidx, pcount = par.initialize(a.coordinator, num_processes=n, process_id=p)
        except Exception as exc:  # noqa: BLE001 -- connection errors of any kind
            raise CLIError(f"jax.distributed.initialize failed: {exc}") from exc
        return (pidx, pcount), True
    if (p is None) != (n is None):
        raise CLIError("give both --process-id and --num-processes (or --coordinator / "
                       "--distributed for a jax.distributed job)")
    return ((p, n) if n is not None and n > 1 else None), False


def _out_dir(path, overwrite):
    p = Path(path)
    if p.exists() and any(p.iterdir()) and not overwrite:
        raise CLIError(f"output folder {p} exists and is not empty (use --overwrite)")
    p.mkdir(parents=True, exist_ok=True)
    return p


def _model_args(ap):
    ap.add_argument("--grid", default=None, help="SSP grid: .npz (ours) or .h5 (DSPS); default: shipped BC03")
    ap.add_argument("--filters", nargs="+", default=None,
                    help="filter names (default sdss_u..sdss_z); shipped, speclite names")
    ap.add_argument("--z-max", type=float, default=1.0, help="largest redshift the model accepts")


@functools.lru_cache(maxsize=4)
def _cached_model(grid, filters, z_max):
    """load_model, memoised: several commands run in one process (tests, scripts calling
    ``main``) share the model and hence its compiled kernels."""
    import sedflow_jax as sj

    return sj.load_model(grid=grid, filters=None if filters is None else list(filters),
                         z_max=z_max)


def _get_model(grid=None, filters=None, z_max=1.0):
    return _cached_model(grid, None if filters is None else tuple(filters), float(z_max))


def _load_model(a):
    return _get_model(a.grid, a.filters, a.z_max)


def cmd_photometry(a):
    """theta -> nanomaggies and AB magnitudes (one galaxy from flags, or a table of them)."""
    from astropy.table import Table

    from sedflow_jax.model import PARAM_NAMES

    _refuse_existing(a.output, a.overwrite, "--output")
    model = _load_model(a)
    if a.input:
        t = Table.read(a.input)
        missing = [c for c in (*PARAM_NAMES, a.z_column) if c not in t.colnames]
        if missing:
            raise CLIError(f"{a.input}: missing columns {missing}")
        theta = np.column_stack([np.asarray(t[c], float) for c in PARAM_NAMES])
        z = np.asarray(t[a.z_column], float)
    else:
        if a.theta is None or a.z is None:
            raise CLIError("give --theta (12 values) and --z, or --input TABLE")
        theta, z = np.asarray([a.theta], float), np.asarray([a.z], float)
    f = np.asarray(model.photometry(theta, z), float)
    mag = 22.5 - 2.5 * np.log10(f)
    if a.output:
        out = Table()
        out[a.z_column] = z
        for i, name in enumerate(PARAM_NAMES):
            out[name] = theta[:, i]
        for j, band in enumerate(model.filter_names):
            out[f"flux_{band}"] = f[:, j]
            out[f"flux_{band}"].unit = "nanomaggy"
            out[f"mag_{band}"] = mag[:, j]
        out.meta.update(_provenance(model))
        out.meta[TABLE_CONFIG_KEY] = _table_record(a)
        _write_table(out, a.output, a.overwrite)
        print(f"wrote {len(out)} rows to {a.output}")
    else:
        print(f"{'band':>10s} {'nanomaggies':>14s} {'AB mag':>8s}")
        for j, band in enumerate(model.filter_names):
            print(f"{band:>10s} {f[0, j]:14.6g} {mag[0, j]:8.4f}")


def _provenance(model):
    import sedflow_jax as sj

    return {"sedflow_jax_version": sj.__version__, "ssp_grid": model.grid.name,
            "filters": list(model.filter_names), "model_config": repr(model.config)}


def cmd_example(a):
    """The main job for now: SED, photometry and derived properties of an example galaxy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from astropy.table import Table

    from sedflow_jax.model import PARAM_NAMES

    out = _out_dir(a.out, a.overwrite)
    a.filters = a.filters or ["galex_fuv", "galex_nuv", "sdss_u", "sdss_g", "sdss_r", "sdss_i", "sdss_z"]
    _write_config(out, a)
    model = _load_model(a)
    theta = np.asarray(a.theta or EXAMPLE_THETA, float)
    f = np.asarray(model.photometry(theta, a.z), float)
    mag = 22.5 - 2.5 * np.log10(f)
    d = model.derived(theta, a.z)
    sed = model.sed(theta, a.z)
    print(model)
    print("theta:", ", ".join(f"{n}={v:g}" for n, v in zip(PARAM_NAMES, theta)), f"z={a.z}")
    print(f"{'band':>10s} {'nanomaggies':>14s} {'AB mag':>8s}")
    for j, band in enumerate(model.filter_names):
        print(f"{band:>10s} {f[j]:14.6g} {mag[j]:8.4f}")
    props = {k: float(v) for k, v in d._asdict().items()}
    for k, v in props.items():
        print(f"{k:>20s} = {v:.5g}")

    wave = np.asarray(sed.wave_obs, float)
    flux = np.asarray(sed.flux_lambda, float)
    t = Table({"wave_obs": wave, "flux_lambda": flux})
    t["wave_obs"].unit = "Angstrom"
    t["flux_lambda"].unit = "1e-17 erg / (s cm2 Angstrom)"
    t.meta.update(_provenance(model))
    t.write(out / "example_sed.ecsv", overwrite=True)
    with open(out / "example_galaxy.json", "w") as fh:
        json.dump({"theta": dict(zip(PARAM_NAMES, theta.tolist())), "z": a.z,
                   "nanomaggies": dict(zip(model.filter_names, f.tolist())),
                   "ab_mag": dict(zip(model.filter_names, mag.tolist())),
                   "derived": props, **_provenance(model)}, fh, indent=2)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    sel = (wave > 1200) & (wave < 12000)
    c_ang = 2.99792458e18
    # f_nu in nanomaggies for the spectrum, to sit on the same axis as the photometry
    fnu_nmgy = flux[sel] * 1e-17 * wave[sel] ** 2 / c_ang / 3631e-23 * 1e9
    ax.plot(wave[sel], fnu_nmgy, lw=0.6, color="k", label="model SED")
    ax2 = ax.twinx()
    for i, (flt, fj) in enumerate(zip(model.filters, f)):
        ax2.fill_between(flt.wave, flt.response / flt.response.max(), alpha=0.15, color=f"C{i}")
        ax.scatter([flt.effective_wavelength], [fj], zorder=5, s=30, color=f"C{i}")
        ax.annotate(flt.name, (flt.effective_wavelength, fj), textcoords="offset points",
                    xytext=(0, 8), ha="center", fontsize=8)
    ax2.set_ylim(0, 4)
    ax2.set_yticks([])
    ax.set_yscale("log")
    ax.set_xlabel("observed wavelength [Å]")
    ax.set_ylabel("f_ν [nanomaggies]")
    ax.set_title(f"log M*={theta[0]:g}, z={a.z:g}: SED and synthetic photometry")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "example_sed.png", dpi=120)
    print(f"wrote {out / 'example_sed.png'}, example_sed.ecsv, example_galaxy.json")


def cmd_simulate(a):
    """Training set: prior -> photometry -> noise -> x, chunked to disk, resumable; split over
    local devices (--devices) and over hosts (--process-id/--num-processes, --coordinator)."""
    from sedflow_jax import prior as P
    from sedflow_jax import simulation as S

    if a.n <= 0:
        raise CLIError(f"--n must be > 0, got {a.n}")
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a folder")
    if out.is_dir() and not a.overwrite:
        # resuming (same configuration) and other hosts' files are fine; foreign files are not
        ours = [f for f in out.iterdir() if f.name.startswith(("manifest", "shard_", "config"))]
        if any(out.iterdir()) and not ours:
            raise CLIError(f"output folder {out} exists and does not hold a sedflow-jax "
                           "training set (use --overwrite, or another --out)")
    hosts, dist = _hosts(a)
    mesh = _mesh(a)
    pr = P.provabgs_prior(zmin=a.zmin, zmax=a.zmax) if a.prior == "provabgs" else \
        P.default_nmf_prior(zmin=a.zmin, zmax=a.zmax)
    model = _get_model(a.grid, a.filters, a.zmax)
    multi = hosts is not None and hosts[1] > 1
    kw = dict(out=out, chunk=a.chunk, block=a.block, overwrite=a.overwrite,
              include_flux=a.include_flux, progress=not a.quiet, mesh=mesh)
    if dist:
        from sedflow_jax import parallel as par

        res, merged = par.simulate_distributed(a.seed, a.n, model, pr, **kw)
    else:
        res = S.simulate(a.seed, a.n, model, pr, hosts=hosts, **kw)
        merged = S.read_manifest(out) if (out / S.MANIFEST_NAME).exists() else None
    # recorded after the run: a refused run must not replace the folder's record
    _write_config(out, a, f"config.host{hosts[0]}.toml" if multi else CONFIG_NAME)
    t = res.timings
    who = f"host {hosts[0]} of {hosts[1]}: " if multi else ""
    print(f"{who}{res.n_requested} rows -> {res.out}: kept {res.n_kept}, dropped "
          f"{res.n_dropped} {res.dropped}; {t.get('galaxies_per_s') or float('nan'):.0f} "
          "galaxies/s" + (f"; {t.get('rows_computed', 0)} rows computed here" if multi else ""))
    if multi:
        print("training set complete: manifest.json written" if merged is not None and
              merged.get("complete") else "other hosts still running: when all are done, "
              f"`sedflow-jax merge-manifests {out}` (or the last host) writes manifest.json")


def cmd_merge_manifests(a):
    """Join the per-host manifest parts of a training set into manifest.json."""
    import shutil

    from sedflow_jax import parallel as par
    from sedflow_jax import simulation as S

    if a.dir is None:
        raise CLIError("give the training-set folder: sedflow-jax merge-manifests DIR")
    dest = Path(a.dir)
    for src in a.sources or []:
        src = Path(src)
        if not src.is_dir():
            raise CLIError(f"--from {src}: not a folder")
        if src.resolve() == dest.resolve():
            continue
        files = sorted(src.glob("shard_*.npz")) + sorted(src.glob("manifest.host*.json"))
        if not files:
            raise CLIError(f"--from {src}: no shard_*.npz / manifest.host*.json files")
        dest.mkdir(parents=True, exist_ok=True)
        for f in files:
            target = dest / f.name
            if target.exists():
                same = S._sha256_file(target) == S._sha256_file(f)
                if not same and f.name.startswith("shard_"):
                    raise CLIError(f"{target} exists and differs from {f}: the folders hold "
                                   "different training sets")
                if same:
                    continue
                if f.name.startswith("manifest.host"):
                    raise CLIError(f"{target} exists and differs from {f}: two folders hold "
                                   "the same host's part (remove the stale one)")
            tmp = dest / f"{f.name}.tmp-{os.getpid()}"
            shutil.copyfile(f, tmp)
            os.replace(tmp, target)
    if not dest.is_dir():
        raise CLIError(f"{dest}: no such folder")
    m = par.merge_manifests(dest, verify=a.verify or bool(a.sources))
    print(f"merged {len(m['hosts']['parts'])} host part(s): {len(m['shards'])} shards, "
          f"{m['n_rows_done']} rows (kept {m['n_kept']}, dropped {m['n_dropped']}) -> "
          f"{dest / S.MANIFEST_NAME}")


def cmd_train(a):
    """Train SEDflow's flow on a training-set folder (data-parallel over --devices)."""
    from sedflow_jax import flow as F
    from sedflow_jax import simulation as S
    from sedflow_jax import train as T
    from sedflow_jax.posterior import train_posterior

    out = _out_dir(a.out, a.overwrite or a.resume)
    mesh = _mesh(a)
    fc = None
    if a.preset == "paper" or a.blocks or a.hidden:
        src = S.ShardDataset(a.data)  # the flow's dimensions come from the training set
        dims = (src.d_theta, src.d_context)
        if a.band_dropout is not None:  # mask-aware context: + one 0/1 mask column per band
            from sedflow_jax.masking import _n_bands_from_x

            dims = (src.d_theta, src.d_context + _n_bands_from_x(src.d_context))
        if a.preset == "paper":
            fc = F.FlowConfig.paper(*dims)
        else:
            fc = F.FlowConfig.small(*dims, seed=a.seed)
        fc = fc.replace(**{k: v for k, v in (("n_blocks", a.blocks), ("hidden", a.hidden)) if v})
    tc = T.TrainConfig(seed=a.seed, batch_size=a.batch_size, learning_rate=a.lr,
                       patience=a.patience, max_epochs=a.max_epochs, progress=not a.quiet)
    _write_config(out, a)
    post, res = train_posterior(a.data, out, flow_config=fc, train_config=tc, seed=a.seed,
                                resume=a.resume, mesh=mesh, band_dropout=a.band_dropout,
                                min_bands=a.min_bands, theta_space=a.theta_space)
    print(f"trained on {res.n_train} rows (val {res.n_val}); best epoch {res.best_epoch}, "
          f"val loss {res.best_val_loss:.4f}; stopped early: {res.stopped_early}; -> {out}")


def cmd_infer(a):
    """Posterior samples and summaries for every usable row of a catalog."""
    import jax
    from astropy.table import hstack

    import sedflow_jax as sj
    from sedflow_jax import catalog as C
    from sedflow_jax.posterior import AmortizedPosterior, summarize

    if a.stream:
        return _infer_stream(a)
    _refuse_existing(a.out, a.overwrite)
    _refuse_existing(a.samples, a.overwrite, "--samples file")
    if a.devices not in (None, 1) or a.process_id is not None or a.num_processes is not None \
            or a.coordinator or a.distributed:
        raise CLIError("--devices, --process-id, --num-processes, --coordinator and "
                       "--distributed need --stream")
    post = AmortizedPosterior.load(a.model)
    zr = (post.prior.zmin, post.prior.zmax)
    from sedflow_jax.masking import noise_ood_rows, prepare_catalog, scatter_rows

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
    model = _get_model(None, post.bands, max(zr[1], 1e-3))
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
                      **_flag_meta(ph.flag), TABLE_CONFIG_KEY: _table_record(a)})
    _write_table(full, a.out, a.overwrite)
    if a.samples:
        import h5py

        with h5py.File(a.samples, "w") as f:
            f["theta"] = s.theta
            f["rows"] = np.flatnonzero(use)
            f.attrs["param_names"] = list(sj.PARAM_NAMES)
    print(f"wrote {a.out}; mean acceptance {np.mean(s.acceptance):.3f}; "
          f"low acceptance {int(s.low_acceptance.sum())}; out of support {int(s.ood.sum())}")


_FLAG_SLUGS = {1: "nonfinite", 2: "flux_le0", 4: "ivar_le0", 8: "z_range", 16: "sentinel",
               32: "low_snr", 64: "too_few_bands", 128: "noise_oos"}


def _flag_meta(flag) -> dict:
    """FITS-friendly scalar counts of a flag column: n_rows, n_usable, n_flag_<reason>."""
    from sedflow_jax import catalog as C

    flag = np.asarray(flag, np.int64)
    d = {"n_rows": int(flag.size), "n_usable": int((flag == 0).sum())}
    for bit in sorted(C.FLAG_NAMES):
        d[f"n_flag_{_FLAG_SLUGS.get(bit, f'bit{bit}')}"] = int(((flag & bit) > 0).sum())
    return d


def _h5_flags(path) -> np.ndarray:
    """The flag column of a streaming-inference output, read in slices."""
    import h5py

    with h5py.File(path, "r") as f:
        d = f["summary"]
        step = 1 << 20
        return np.concatenate([d.fields("flag")[i:i + step] for i in range(0, d.shape[0], step)]
                              or [np.zeros(0, np.int64)])


def _annotate_h5(path, record):
    """Add the recorded CLI configuration and per-flag counts to a finished HDF5 output."""
    import h5py

    counts = _flag_meta(_h5_flags(path))
    with h5py.File(path, "a") as f:
        if record is not None:
            f.attrs[H5_CONFIG_ATTR] = json.dumps(record, allow_nan=True)
        f.attrs["flag_counts"] = json.dumps(counts)
    return counts


def _print_counts(counts, stats=None):
    from sedflow_jax import catalog as C

    flagged = []
    for b in sorted(C.FLAG_NAMES):
        k = counts.get(f"n_flag_{_FLAG_SLUGS.get(b, f'bit{b}')}")
        if k:
            flagged.append(f"{C.FLAG_NAMES[b]} {k}")
    line = (f"{counts['n_rows']} rows: {counts['n_usable']} usable; flagged: "
            f"{', '.join(flagged) or 'none'}")
    if stats:
        ma = stats.get("mean_acceptance")
        line += (f"; mean acceptance {ma:.3f}" if ma is not None else "") + \
            f"; low acceptance {stats.get('low_acceptance')}; out of support {stats.get('ood')}"
    print(line)


def _infer_stream(a):
    """`infer --stream`: chunked, resumable, over devices / hosts, into one HDF5 file."""
    from sedflow_jax import parallel as par
    from sedflow_jax.posterior import AmortizedPosterior

    out = Path(a.out)
    if out.suffix.lower() not in _HDF5_EXT:
        raise CLIError(f"--stream writes one HDF5 file: give --out NAME.h5, not {out.name} "
                       "(then `sedflow-jax finalize NAME.h5 --out TABLE` exports any table "
                       "format)")
    if a.samples:
        raise CLIError("--samples FILE is for runs without --stream; with --stream use "
                       "--store-samples (the draws go to samples/theta in --out)")
    if not Path(a.catalog).exists():
        raise CLIError(f"--catalog {a.catalog}: no such file")
    parts = Path(str(out) + ".parts")
    hosts, dist = _hosts(a)
    multi = hosts is not None and hosts[1] > 1
    if not (a.resume or a.overwrite or multi) and (out.exists() or parts.exists()):
        raise CLIError(f"{out if out.exists() else parts} exists (use --resume to continue a "
                       "killed run or reuse a finished one, --overwrite to start again)")
    post = AmortizedPosterior.load(a.model)
    cat = par._Catalog(a.catalog)
    try:
        colnames = list(cat.colnames)
    finally:
        cat.close()
    keep = [c for c in a.keep_columns if c in colnames]
    zmax = post.prior.zmax
    model = _get_model(None, post.bands, max(zmax, 1e-3)) if a.n_derived > 0 else None
    kw = dict(n_samples=a.n_samples, key=a.seed, chunk_rows=a.chunk_rows,
              max_rounds=a.max_rounds, model=model, n_derived=a.n_derived,
              store_samples=a.store_samples, keep_columns=keep, flux_fmt=a.flux_fmt,
              ivar_fmt=a.ivar_fmt, z_col=a.z_column, overwrite=a.overwrite,
              progress=not a.quiet)
    mesh = _mesh(a)
    if dist:
        res = par.infer_distributed(post, a.catalog, out, mesh=mesh, keep_parts=a.keep_parts,
                                    **kw)
    else:
        res = par.infer_catalog_streaming(post, a.catalog, out, mesh=mesh, hosts=hosts,
                                          keep_parts=a.keep_parts if a.keep_parts else None,
                                          **kw)
    rec = _record(a)
    who = f"host {hosts[0]} of {hosts[1]}: " if multi else ""
    if os.path.isdir(res.parts):
        name = f"config.host{hosts[0]}.json" if multi else "config.json"
        par._atomic_json(os.path.join(res.parts, name), rec)
    print(f"{who}{res.chunks_computed} chunk(s) of {res.chunk_rows} rows computed here; "
          f"{res.n_chunks} in all for {res.n_rows} rows")
    if res.finalized and out.exists():
        import h5py

        counts = _annotate_h5(out, rec)
        with h5py.File(out, "r") as f:
            stats = json.loads(f.attrs["stats"])
        _print_counts(counts, stats)
        print(f"wrote {out}; export a table with `sedflow-jax finalize {out} --out TABLE`")
    else:
        print(f"{parts}: not all chunks are done yet; rerun the missing hosts (or this command "
              f"with --resume), then `sedflow-jax finalize {out}`")


def _parts_record(parts: Path):
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
    from sedflow_jax import parallel as par

    if a.path is None:
        raise CLIError("give the inference output: sedflow-jax finalize OUT.h5 (or OUT.h5.parts)")
    p = Path(a.path)
    h5 = Path(str(p)[: -len(".parts")]) if p.name.endswith(".parts") else p
    parts = Path(str(h5) + ".parts")
    if a.out is not None:
        _refuse_existing(a.out, a.overwrite)
        if Path(a.out).resolve() == h5.resolve():
            raise CLIError(f"--out {a.out} is the HDF5 output itself; choose another path")
    if parts.is_dir():
        rec = _parts_record(parts)
        par.finalize_inference(h5, keep_parts=a.keep_parts)
        counts = _annotate_h5(h5, rec)
        print(f"assembled {h5}" + ("" if a.keep_parts else f"; removed {parts}"))
    elif h5.is_file():
        import h5py

        with h5py.File(h5, "r") as f:
            rec = json.loads(f.attrs[H5_CONFIG_ATTR]) if H5_CONFIG_ATTR in f.attrs else None
            counts = json.loads(f.attrs["flag_counts"]) if "flag_counts" in f.attrs else None
        if counts is None:
            counts = _annotate_h5(h5, rec)
        print(f"{h5} is already assembled")
    else:
        raise CLIError(f"{a.path}: neither a streaming-inference output nor its .parts folder")
    t, _ = par.read_inference(h5)
    stats = t.meta["stats"]
    _print_counts(counts, stats)
    if a.out is not None:
        for c in t.colnames:
            if t[c].dtype.kind == "S":
                t[c] = np.char.decode(np.asarray(t[c]), "utf-8")
        run = t.meta.pop("run")
        t.meta.clear()
        t.meta.update({"sedflow_jax_version": run.get("sedflow_jax_version") or
                       _record(a)["sedflow_jax_version"],
                       "n_samples": run["config"]["n_samples"], "stats": json.dumps(stats),
                       "run_config_sha256": run["config_sha256"], **counts,
                       TABLE_CONFIG_KEY: _table_record(a)})
        if rec is not None:
            t.meta["SJINFER"] = json.dumps(rec, allow_nan=True)
        _write_table(t, a.out, a.overwrite)
        print(f"wrote {a.out} ({len(t)} rows)")


def cmd_validate(a):
    """p-p / SBC calibration of a trained model on fresh mock galaxies."""
    from sedflow_jax.posterior import AmortizedPosterior
    from sedflow_jax.validation import validate_posterior

    out = _out_dir(a.out, a.overwrite)
    _write_config(out, a)
    post = AmortizedPosterior.load(a.model)
    res = validate_posterior(post, a.seed, a.n_test, a.n_samples, out=out)
    print((out / "validation.md").read_text())
    print(f"wrote {out}/sbc.png, coverage.png, validation.json")
    return res


def _default_compile_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sedflow-jax", "xla")


def _enable_compile_cache(path) -> None:
    """A persistent XLA compilation cache for this process, unless one is set already.

    NumPyro retraces its sampling loop on every run, so without it every galaxy of a catalog
    recompiles the sampler: measured on 2 CPU cores, ~4 s per galaxy for ESS (30 walkers x
    600 steps: 13.6 s -> 9.5 s) and ~7 s for sequential NUTS. (Parallel NUTS chains embed the
    galaxy's data in the program, so they compile per galaxy anyway.)
    """
    import jax

    if path is None or str(path).lower() == "none" or jax.config.jax_compilation_cache_dir:
        return
    Path(path).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def cmd_mcmc(a):
    """NUTS / ESS / AIES on catalog rows: samples, ArviZ netCDF, R-hat/ESS summary."""
    from sedflow_jax import mcmc as M

    try:
        lo, _, hi = a.rows.partition(":")
        rows = list(range(int(lo or 0), int(hi))) if _ else [int(lo)]
    except ValueError as exc:
        raise CLIError(f"--rows must look like 0:10 or 3, got {a.rows!r}") from exc
    if Path(a.out).exists() and any(Path(a.out).iterdir()) and not (a.overwrite or a.resume):
        raise CLIError(f"{a.out} exists and is not empty (use --resume or --overwrite)")
    kw = {k: v for k, v in (("num_chains", a.chains), ("num_samples", a.samples),
                            ("num_warmup", a.warmup)) if v is not None}
    if a.max_tree_depth is not None:
        if a.sampler != "nuts":
            raise CLIError("--max-tree-depth is a NUTS option")
        if a.max_tree_depth < 1:
            raise CLIError(f"--max-tree-depth must be >= 1, got {a.max_tree_depth}")
        kw["max_tree_depth"] = a.max_tree_depth
    n_chains = a.chains if a.chains is not None else M.default_num_chains(a.sampler)
    n_dev = a.cpu_devices if a.cpu_devices is not None else (
        n_chains if a.sampler == "nuts" else 1)
    if n_dev < 1:
        raise CLIError(f"--cpu-devices must be >= 1, got {n_dev}")
    if n_dev > 1:
        import warnings

        with warnings.catch_warnings():  # too late when JAX already ran (library use): keep
            warnings.simplefilter("ignore", RuntimeWarning)
            n_have = M.set_cpu_devices(n_dev)
        if a.sampler == "nuts":
            how = ("in parallel" if M.default_chain_method("nuts", n_chains) == "parallel"
                   else "one after another")
            print(f"NUTS: {n_chains} chains {how} ({n_have} JAX devices)")
    _enable_compile_cache(a.compile_cache or _default_compile_cache())
    model = _get_model(None, a.filters, a.z_max) if a.filters else None
    Path(a.out).mkdir(parents=True, exist_ok=True)
    _write_config(a.out, a)
    t = M.run_mcmc_catalog(a.catalog, rows, a.sampler, a.out, model=model, key=a.seed,
                           gamma_density=a.gamma_density, resume=a.resume, **kw)
    ok = int((t["status"] == "ok").sum())
    print(f"{ok}/{len(t)} galaxies fit with {a.sampler}; summary in {a.out}/summary.ecsv")


def cmd_demo(a):
    """The whole pipeline on the embedded grid (see sedflow_jax.demo)."""
    from sedflow_jax.demo import run_demo

    out = _out_dir(a.out, a.overwrite)
    _write_config(out, a)
    run_demo(out, a.size, seed=a.seed, progress=not a.quiet)


def build_parser():
    ap = argparse.ArgumentParser(prog="sedflow-jax", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("example", help="SED + photometry + derived properties of an example galaxy")
    _model_args(p)
    p.add_argument("--theta", type=float, nargs=12, default=None)
    p.add_argument("--z", type=float, default=0.1)
    p.add_argument("--out", default="example_out")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False)
    p.set_defaults(func=cmd_example)

    p = sub.add_parser("photometry", help="theta -> nanomaggies / AB magnitudes")
    _model_args(p)
    p.add_argument("--theta", type=float, nargs=12, default=None,
                   help="logmstar beta1..4 fburst tburst gamma1 gamma2 tau_bc tau_ism n_dust")
    p.add_argument("--z", type=float, default=None)
    p.add_argument("--input", help="table (FITS/ECSV/CSV) with the 12 parameter columns and z")
    p.add_argument("--z-column", default="z")
    p.add_argument("--output", help="write a table (format from the extension)")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False)
    p.set_defaults(func=cmd_photometry)

    p = sub.add_parser("simulate", help="generate a SEDflow training set (chunked, resumable)")
    _model_args(p)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--chunk", type=int, default=100_000)
    p.add_argument("--prior", choices=["provabgs", "default_nmf"], default="provabgs")
    p.add_argument("--zmin", type=float, default=0.0)
    p.add_argument("--zmax", type=float, default=0.2)
    p.add_argument("--include-flux", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--block", type=int, default=4096,
                   help="rows per random block and compiled call (part of the configuration: "
                        "another block gives other rows); a multiple of --devices; GPUs: 65536")
    p.add_argument("--devices", type=_devices_type, default=None,
                   help="split each block's photometry over N local devices (or 'all'); the "
                        "random draws do not change (values equal to ~1e-6)")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="replace a folder holding another training set (the same one resumes)")
    p.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=False)
    _host_args(p, "--out folder (shards)")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("merge-manifests", help="join the per-host manifests of a training set")
    p.add_argument("dir", nargs="?", default=None, help="the training-set folder")
    p.add_argument("--from", dest="sources", nargs="+", default=None, metavar="HOSTDIR",
                   help="first copy the shards and manifest parts of these folders (hosts "
                        "without a shared file system) into DIR")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=False,
                   help="check every shard's sha256 (always done with --from)")
    p.set_defaults(func=cmd_merge_manifests)

    p = sub.add_parser("train", help="train the SEDflow posterior on a training-set folder")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--preset", choices=["small", "paper"], default="small")
    p.add_argument("--blocks", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--patience", type=int, default=20)
    p.add_argument("--max-epochs", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False, help="continue from the last checkpoint")
    p.add_argument("--devices", type=_devices_type, default=None,
                   help="data-parallel training over N local devices (or 'all'); "
                        "--batch-size is the global batch")
    p.add_argument("--band-dropout", type=float, default=None, metavar="P",
                   help="train a mask-aware posterior (band masks at inference): with "
                        "probability P a row loses random bands, fresh every epoch")
    p.add_argument("--min-bands", type=int, default=2,
                   help="bands a row keeps at least under --band-dropout")
    p.add_argument("--theta-space", choices=["box", "logit"], default="box",
                   help="box: the flow models the sampling-space point, draws outside the prior "
                        "are rejected (SEDflow); logit: the flow models logit coordinates, every "
                        "draw is inside the prior (acceptance 1)")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=False)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("infer", help="posteriors for a catalog (astropy Table in and out)")
    p.add_argument("--model", required=True)
    p.add_argument("--catalog", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--samples", default=None, help="also write all samples to this HDF5 file")
    p.add_argument("--n-samples", type=int, default=10_000)
    p.add_argument("--n-derived", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-columns", nargs="*", default=["id", "ID", "RA", "DEC", "z"])
    p.add_argument("--flux-fmt", default="flux_{band}",
                   help="flux column of each band [nanomaggies] ({band} = model band name)")
    p.add_argument("--ivar-fmt", default="flux_ivar_{band}",
                   help="inverse-variance column of each band [nanomaggies^-2]")
    p.add_argument("--z-column", default="z", help="redshift column")
    p.add_argument("--vector-flux", default=None, help="SDSS-style (n, n_bands) flux column "
                   "(e.g. MODELFLUX) instead of --flux-fmt")
    p.add_argument("--vector-ivar", default=None, help="its inverse variance (MODELFLUX_IVAR)")
    p.add_argument("--extinction", default=None, help="Galactic extinction [mag] column "
                   "(vector, or a format like A_{band}); fluxes are dereddened")
    p.add_argument("--snr-floor", type=float, default=None, help="bands with flux*sqrt(ivar) "
                   "below this are masked (mask-aware model) or flag the row")
    p.add_argument("--noise-policy", default="auto", choices=["auto", "mask", "flag", "ood"],
                   help="bands outside the training (mag, sigma) support: mask the band, flag "
                        "the row (not fit), or fit it marked ood (auto: mask for mask-aware "
                        "models, else ood)")
    p.add_argument("--max-rounds", type=int, default=20,
                   help="rejection rounds for draws outside the prior box")
    g = p.add_argument_group("streaming (catalogs larger than memory, resumable)")
    g.add_argument("--stream", action=argparse.BooleanOptionalAction, default=False,
                   help="read the catalog in chunks, write one file per chunk, assemble an "
                        "HDF5 --out; draws keyed by catalog row (see docs/scaling.md)")
    g.add_argument("--chunk-rows", type=int, default=16384, help="catalog rows per chunk")
    g.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                   help="continue a killed --stream run (chunks on disk are kept)")
    g.add_argument("--store-samples", action=argparse.BooleanOptionalAction, default=False,
                   help="also store every draw in --out (samples/theta)")
    g.add_argument("--keep-parts", action=argparse.BooleanOptionalAction, default=False,
                   help="keep the chunk files after assembling")
    g.add_argument("--devices", type=_devices_type, default=None,
                   help="split each chunk's sampling over N local devices (or 'all')")
    g.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=False)
    _host_args(p, "catalog chunks (with --stream)")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False)
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser("finalize", help="assemble a streaming inference (infer --stream) and "
                                        "export its summary table")
    p.add_argument("path", nargs="?", default=None,
                   help="the --stream output OUT.h5 (or its work folder OUT.h5.parts)")
    p.add_argument("--out", default=None,
                   help="also write the summary as a table (format from the extension: .fits, "
                        ".ecsv, .csv, .h5, ...)")
    p.add_argument("--keep-parts", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False)
    p.set_defaults(func=cmd_finalize)

    p = sub.add_parser("validate", help="SBC / p-p calibration of a trained model on mocks")
    p.add_argument("--model", required=True)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--n-samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="validation")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("mcmc", help="NUTS / ESS / AIES fits of catalog rows")
    p.add_argument("--catalog", required=True)
    p.add_argument("--rows", default="0:10", help="START:STOP or a single row")
    p.add_argument("--sampler", choices=["nuts", "ess", "aies"], default="nuts")
    p.add_argument("--out", required=True)
    p.add_argument("--filters", nargs="+", default=None)
    p.add_argument("--z-max", type=float, default=0.2)
    p.add_argument("--chains", type=int, default=None)
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--gamma-density", choices=["loguniform", "flat"], default="loguniform")
    p.add_argument("--max-tree-depth", type=int, default=None,
                   help="NUTS: at most 2^depth - 1 leapfrog steps per draw (default 10)")
    p.add_argument("--cpu-devices", type=int, default=None,
                   help="split the CPU into this many JAX devices so NUTS chains run in "
                        "parallel (default: one per chain for NUTS, 1 for the ensembles, "
                        "which run ~30%% slower on a split CPU; 1 = chains one after another)")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="persistent XLA compilation cache, so galaxies after the first reuse "
                        "the compiled sampler (default: $XDG_CACHE_HOME/sedflow-jax/xla, i.e. "
                        "~/.cache/sedflow-jax/xla; 'none' = off; a cache JAX already has "
                        "configured is kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False)
    p.set_defaults(func=cmd_mcmc)

    p = sub.add_parser("demo", help="simulate, train, infer, MCMC and validate, with figures")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--size", choices=["small", "paper"], default="small")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=False)
    p.set_defaults(func=cmd_demo)

    for name, sp in sub.choices.items():
        g = sp.add_argument_group("configuration file")
        g.add_argument("--config", default=None, metavar="FILE",
                       help="TOML file of option values (keys: long option names, e.g. "
                            "n-samples = 100), or a previous output (folder, table) to rerun "
                            "with its recorded configuration; flags given here override it")
        g.add_argument("--dump-config", action="store_true",
                       help="print the resolved configuration as TOML and exit")
    ap._sj_subparsers = dict(sub.choices)
    return ap


SUBCOMMANDS = ("example", "photometry", "simulate", "merge-manifests", "train", "infer",
               "finalize", "validate", "mcmc", "demo")


def main(argv=None):
    from sedflow_jax.model import ModelInputError
    from sedflow_jax.photometry import FilterError
    from sedflow_jax.catalog import CatalogError
    from sedflow_jax.ssp import SSPGridError

    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((t for t in argv if not t.startswith("-")), None)
    try:
        a = _parse(argv, command)
        if a.dump_config:
            sys.stdout.write(dump_config(resolved_config(a, a.command), a.command))
            return 0
        a.func(a)
    except (CLIError, ModelInputError, FilterError, SSPGridError, CatalogError, OSError,
            ValueError, KeyError) as exc:
        if os.environ.get("SEDFLOW_JAX_DEBUG"):
            raise
        print(f"sedflow-jax {command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _parse(argv, command):
    """Parse the command line; with --config, the file's values are the defaults (so flags
    given on the command line override them)."""
    ap = build_parser()
    if command not in ap._sj_subparsers or any(t in ("-h", "--help") for t in argv):
        return ap.parse_args(argv)
    # first pass, nothing required: where is the config file? (abbreviations work too)
    pre = build_parser()
    for act in pre._sj_subparsers[command]._actions:
        act.required = False
    ns, _ = pre.parse_known_args(argv)
    if ns.config is not None:
        values = load_config(ns.config, command)
        _apply_config(ap._sj_subparsers[command], command, values, f"--config {ns.config}")
    return ap.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
