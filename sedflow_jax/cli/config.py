"""Config files of the CLI: ``--config FILE.toml``, the configuration recorded beside every
output, ``--dump-config``."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tomllib
from pathlib import Path

import numpy as np

from sedflow_jax.io.tables import HDF5_EXTENSIONS
from sedflow_jax.util import atomic_write_bytes
from sedflow_jax.version import __version__

from .args import CLIError


#: name of the recorded configuration in output folders
SUBCOMMANDS = ("example", "photometry", "simulate", "merge-manifests", "train", "infer",
               "finalize", "validate", "mcmc", "demo")
CONFIG_NAME = "config.toml"


#: table meta key (FITS-safe: 8 characters) holding the recorded configuration as JSON
TABLE_CONFIG_KEY = "SJCONFIG"


#: HDF5 attribute of streaming-inference outputs holding the recorded configuration as JSON
H5_CONFIG_ATTR = "sedflow_cli_config"


META_KEYS = ("command", "sedflow_jax_version")


NOT_CONFIG = ("help", "config", "dump_config")


def config_actions(subparser):
    """key -> argparse action for every configurable option of a subcommand (long option
    names with dashes or underscores, and the dest name)."""
    names = {}
    for act in subparser._actions:
        if act.dest in NOT_CONFIG or act.dest is argparse.SUPPRESS:
            continue
        keys = [s[2:] for s in act.option_strings if s.startswith("--")] or [act.dest]
        for k in (*keys, act.dest):
            names[k] = act
            names[k.replace("-", "_")] = act
            names[k.replace("_", "-")] = act
    return names


def config_key(act) -> str:
    """The key a recorded configuration uses for an action: its first long option name."""
    return next((s[2:] for s in act.option_strings if s.startswith("--")), act.dest)


def convert_config_value(act, key, value, source):
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


def read_recorded_config(path: Path, command: str) -> dict:
    """The configuration recorded in a previous output: a folder (its config.toml), a table
    (meta SJCONFIG; a table written by `finalize` also holds its `infer` run's, SJINFER) or a
    streaming-inference HDF5 file (attribute sedflow_cli_config)."""
    if path.is_dir():
        cands = [path / CONFIG_NAME] + sorted(path.glob("config.host*.toml"))
        for c in cands:
            if c.is_file():
                return read_toml(c)
        raise CLIError(f"--config {path}: a folder without a recorded {CONFIG_NAME}")
    if path.suffix.lower() in HDF5_EXTENSIONS:
        import h5py

        try:
            with h5py.File(path, "r") as f:
                if H5_CONFIG_ATTR in f.attrs:
                    return json.loads(f.attrs[H5_CONFIG_ATTR])
        except OSError as exc:
            raise CLIError(f"--config {path}: not a readable HDF5 file ({exc})") from exc
    from astropy.table import Table  # astropy loads only when a table is read

    try:
        meta = Table.read(path, **({"path": "summary"} if path.suffix.lower() in HDF5_EXTENSIONS
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


def read_toml(path: Path) -> dict:
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
    doc = read_toml(p) if p.suffix.lower() == ".toml" else read_recorded_config(p, command)
    doc = dict(doc)
    cmd = doc.pop("command", None)
    ver = doc.pop("sedflow_jax_version", None)
    if cmd is not None and cmd != command:
        raise CLIError(f"--config {p} records a `{cmd}` run, not `{command}`")
    if ver is not None and str(ver) != __version__:
        print(f"sedflow-jax {command}: note: {p} was recorded with sedflow_jax {ver}, "
              f"this is {__version__}", file=sys.stderr)
    subs = set(SUBCOMMANDS) | {s.replace("-", "_") for s in SUBCOMMANDS}
    section = {}
    for name in (command, command.replace("-", "_")):
        if isinstance(doc.get(name), dict):
            section.update(doc.pop(name))
    flat = {k: v for k, v in doc.items() if not (isinstance(v, dict) and k in subs)}
    flat.update(section)
    return flat


def apply_config(subparser, command, values, source):
    """Config values become the subparser's defaults (command-line flags still override)."""
    acts = config_actions(subparser)
    unknown = [k for k in values if k not in acts]
    if unknown:
        valid = sorted({config_key(a) for a in acts.values()})
        raise CLIError(f"{source}: unknown option(s) {unknown} for `{command}`; valid keys: "
                       f"{', '.join(valid)}")
    seen = {}
    for k, v in values.items():
        act = acts[k]
        if act.dest in seen:
            raise CLIError(f"{source}: {k!r} and {seen[act.dest]!r} are the same option")
        seen[act.dest] = k
        act.default = convert_config_value(act, k, v, source)
        act.required = False


def resolved_config(a, command: str) -> dict:
    """Every option of a parsed run (None values left out), keyed by long option name.
    ``a`` carries its subparser (``a.subparser``, set by :func:`sedflow_jax.cli.main.parse`)."""
    sub = a.subparser
    out = {}
    for act in sub._actions:
        if act.dest in NOT_CONFIG or act.dest is argparse.SUPPRESS:
            continue
        v = getattr(a, act.dest, None)
        if v is None:
            continue
        if isinstance(v, (tuple, list)):
            v = [str(x) if isinstance(x, Path) else x for x in v]
        elif isinstance(v, Path):
            v = str(v)
        out[config_key(act)] = v
    return out


def toml_value(v) -> str:
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
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a valid TOML basic string


def toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def dump_config(values: dict, command: str, *, comment: str = "") -> str:
    """TOML text of a run's configuration (readable back with ``--config``)."""
    lines = [f"# sedflow-jax {command} configuration{(' ' + comment) if comment else ''}",
             f"# reproduce: sedflow-jax {command} --config THIS_FILE  (flags override it)",
             f"command = {toml_value(command)}",
             f"sedflow_jax_version = {toml_value(__version__)}"]
    lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def record(a) -> dict:
    """What is stored with an output: command, package version and every option."""
    return {"command": a.command, "sedflow_jax_version": __version__,
            **resolved_config(a, a.command)}


def write_config(folder, a, name: str = CONFIG_NAME) -> Path:
    """Write the resolved configuration of this run into an output folder (atomically)."""
    cfg = record(a)
    cfg.pop("command"), cfg.pop("sedflow_jax_version")
    text = dump_config(cfg, a.command, comment=f"(cwd {os.getcwd()})")
    p = Path(folder) / name
    atomic_write_bytes(p, text.encode())
    return p


def table_record(a) -> str:
    return json.dumps(record(a), allow_nan=True)
