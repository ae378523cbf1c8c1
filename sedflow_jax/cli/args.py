"""What the parser needs and nothing heavier (argparse only): the two user-facing exception
types and the option groups several subcommands share. ``sedflow-jax --help`` imports only this
and :mod:`sedflow_jax.cli.parser`; a command's module (and JAX) loads when the command runs."""
from __future__ import annotations

import argparse


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


class CommandFailed(Exception):
    """The command ran but its work failed (e.g. every galaxy of an MCMC run): printed as one
    line, exit code 1."""


def devices_type(s):
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


def host_args(ap, what):
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


def model_args(ap):
    ap.add_argument("--grid", default=None,
                    help="SSP grid: .npz (ours) or .h5 (DSPS); default: shipped BC03")
    ap.add_argument("--filters", nargs="+", default=None,
                    help="filter names (default sdss_u..sdss_z); shipped, speclite names")
    ap.add_argument("--z-max", type=float, default=1.0, help="largest redshift the model accepts")
