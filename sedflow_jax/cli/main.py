"""`sedflow-jax` command line: thin wiring from arguments to the library, no science here."""
from __future__ import annotations

import os
import sys

import importlib

from .args import CLIError, CommandFailed
from .config import apply_config, dump_config, load_config, resolved_config
from .parser import build_parser


def main(argv=None):
    """Run one subcommand; returns the exit code: 0 done, 1 the work failed (e.g. every
    galaxy of an MCMC run), 2 a user error (one line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((t for t in argv if not t.startswith("-")), None)
    try:
        a = parse(argv, command)
        if a.dump_config:
            sys.stdout.write(dump_config(resolved_config(a, a.command), a.command))
            return 0
        command_function(a.func)(a)
    except CommandFailed as exc:
        print(f"sedflow-jax {command}: {exc}", file=sys.stderr)
        return 1
    except (CLIError, OSError, ValueError, KeyError) as exc:  # the package's input errors
        # (CatalogError, ModelInputError, FilterError, SSPGridError) are ValueErrors
        if os.environ.get("SEDFLOW_JAX_DEBUG"):
            raise
        print(f"sedflow-jax {command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def command_function(spec: str):
    """The function a subcommand runs, from its ``"module:function"`` name in
    :mod:`sedflow_jax.cli` (imported only now: ``--help`` never loads JAX)."""
    module, name = spec.split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)


def parse(argv, command):
    """Parse the command line; with --config, the file's values are the defaults (so flags
    given on the command line override them)."""
    ap = build_parser()
    if command not in ap.sj_subparsers or any(t in ("-h", "--help") for t in argv):
        return _with_subparser(ap.parse_args(argv), ap)
    # first pass, nothing required: where is the config file? (abbreviations work too)
    pre = build_parser()
    for act in pre.sj_subparsers[command]._actions:
        act.required = False
    ns, _ = pre.parse_known_args(argv)
    if ns.config is not None:
        values = load_config(ns.config, command)
        apply_config(ap.sj_subparsers[command], command, values, f"--config {ns.config}")
    return _with_subparser(ap.parse_args(argv), ap)


def _with_subparser(a, ap):
    """The parsed namespace with its subcommand's parser attached (``a.subparser``: the
    recorded configuration lists that parser's options)."""
    if getattr(a, "command", None) in ap.sj_subparsers:
        a.subparser = ap.sj_subparsers[a.command]
    return a
