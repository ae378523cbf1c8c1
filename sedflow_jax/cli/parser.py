"""The argument parser: one function per subcommand (``add_<name>(sub)``), shared option
helpers, and the ``--config`` / ``--dump-config`` group every subcommand has."""
from __future__ import annotations

import argparse

from .args import devices_type, host_args, model_args

#: each subcommand's ``func`` is "module:function" in sedflow_jax.cli, imported when it runs (so
#: ``--help`` and argument errors answer at once, without loading JAX)
DESCRIPTION = ("`sedflow-jax` command line: the PROVABGS SED model, SEDflow training sets, "
               "amortized posteriors for catalogs, MCMC, calibration and the demo.")


# ---------------------------------------------------------------------------------------------
# shared options
# ---------------------------------------------------------------------------------------------
def flag(p, name, help=None):
    """A ``--name / --no-name`` switch, off by default."""
    p.add_argument(name, action=argparse.BooleanOptionalAction, default=False, help=help)


def seed_arg(p):
    p.add_argument("--seed", type=int, default=0)


def config_args(p):
    """``--config FILE`` and ``--dump-config`` (every subcommand)."""
    g = p.add_argument_group("configuration file")
    g.add_argument("--config", default=None, metavar="FILE",
                   help="TOML file of option values (keys: long option names, e.g. "
                        "n-samples = 100), or a previous output (folder, table) to rerun "
                        "with its recorded configuration; flags given here override it")
    g.add_argument("--dump-config", action="store_true",
                   help="print the resolved configuration as TOML and exit")


# ---------------------------------------------------------------------------------------------
# subcommands
# ---------------------------------------------------------------------------------------------
def add_example(sub):
    """The `example` subcommand."""
    p = sub.add_parser("example", help="SED + photometry + derived properties of an example galaxy")
    model_args(p)
    p.add_argument("--theta", type=float, nargs=12, default=None)
    p.add_argument("--z", type=float, default=0.1)
    p.add_argument("--out", default="example_out")
    flag(p, "--overwrite")
    p.set_defaults(func="commands:cmd_example")
    return p


def add_photometry(sub):
    """The `photometry` subcommand."""
    p = sub.add_parser("photometry", help="theta -> nanomaggies / AB magnitudes")
    model_args(p)
    p.add_argument("--theta", type=float, nargs=12, default=None,
                   help="logmstar beta1..4 fburst tburst gamma1 gamma2 tau_bc tau_ism n_dust")
    p.add_argument("--z", type=float, default=None)
    p.add_argument("--input", help="table (FITS/ECSV/CSV) with the 12 parameter columns and z")
    p.add_argument("--z-column", default="z")
    p.add_argument("--output", help="write a table (format from the extension)")
    flag(p, "--overwrite")
    p.set_defaults(func="commands:cmd_photometry")
    return p


def add_simulate(sub):
    """The `simulate` subcommand."""
    p = sub.add_parser("simulate", help="generate a SEDflow training set (chunked, resumable)")
    model_args(p)
    p.add_argument("--n", type=int, required=True)
    seed_arg(p)
    p.add_argument("--out", required=True)
    p.add_argument("--chunk", type=int, default=100_000)
    p.add_argument("--prior", choices=["provabgs", "default_nmf"], default="provabgs")
    p.add_argument("--zmin", type=float, default=0.0)
    p.add_argument("--zmax", type=float, default=0.2)
    flag(p, "--include-flux")
    p.add_argument("--calibration-floor", action=argparse.BooleanOptionalAction, default=True,
                   help="per-row photometric-calibration floor in the noise model (default on: "
                        "default_noise_model(bands, calibration_floor=True), so catalogs whose "
                        "errors carry a floor, e.g. the NSA, lie inside the training support); "
                        "--no-calibration-floor: the fitted SDSS MODELFLUX noise as is "
                        "(SEDflow's setup)")
    p.add_argument("--block", type=int, default=4096,
                   help="rows per random block and compiled call (part of the configuration: "
                        "another block gives other rows); a multiple of --devices; GPUs: 65536")
    p.add_argument("--devices", type=devices_type, default=None,
                   help="split each block's photometry over N local devices (or 'all'); the "
                        "random draws do not change (values equal to ~1e-6)")
    flag(p, "--overwrite",
         help="replace a folder holding another training set (the same one resumes)")
    flag(p, "--quiet")
    host_args(p, "--out folder (shards)")
    p.set_defaults(func="commands:cmd_simulate")
    return p


def add_merge_manifests(sub):
    """The `merge-manifests` subcommand."""
    p = sub.add_parser("merge-manifests", help="join the per-host manifests of a training set")
    p.add_argument("dir", nargs="?", default=None, help="the training-set folder")
    p.add_argument("--from", dest="sources", nargs="+", default=None, metavar="HOSTDIR",
                   help="first copy the shards and manifest parts of these folders (hosts "
                        "without a shared file system) into DIR")
    flag(p, "--verify", help="check every shard's sha256 (always done with --from)")
    p.set_defaults(func="commands:cmd_merge_manifests")
    return p


def add_train(sub):
    """The `train` subcommand."""
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
    seed_arg(p)
    flag(p, "--resume", help="continue from the last checkpoint")
    p.add_argument("--devices", type=devices_type, default=None,
                   help="data-parallel training over N local devices (or 'all'); "
                        "--batch-size is the global batch")
    p.add_argument("--band-dropout", type=float, default=None, metavar="P",
                   help="train a mask-aware posterior (band masks at inference: rows missing a "
                        "band are still fit): with probability P a row loses random bands, "
                        "fresh every epoch. Default 0.5 (off, with a note, for a training set "
                        "of at most --min-bands bands); 0 = a plain flow (SEDflow's setup)")
    p.add_argument("--min-bands", type=int, default=2,
                   help="bands a row keeps at least under --band-dropout")
    p.add_argument("--theta-space", choices=["box", "logit"], default="logit",
                   help="logit (default): the flow models logit coordinates of the prior box, "
                        "every draw is inside the prior (acceptance 1, best measured); box: "
                        "the flow models the sampling-space point, draws outside the prior are "
                        "rejected (SEDflow's exact setup, with --band-dropout 0)")
    flag(p, "--overwrite")
    flag(p, "--quiet")
    p.set_defaults(func="commands:cmd_train")
    return p


def add_infer(sub):
    """The `infer` subcommand."""
    p = sub.add_parser("infer", help="posteriors for a catalog (astropy Table in and out)")
    p.add_argument("--model", default=None,
                   help="a trained model folder or a shipped model's name (sdss_ugriz, "
                        "galex_sdss); default: the shipped model matching the catalog's bands "
                        "(all its bands in the catalog, the most bands wins; printed)")
    p.add_argument("--catalog", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--samples", default=None, help="also write all samples to this HDF5 file")
    p.add_argument("--n-samples", type=int, default=10_000)
    p.add_argument("--n-derived", type=int, default=500)
    seed_arg(p)
    p.add_argument("--keep-columns", nargs="*", default=None,
                   help="catalog columns copied to the output (default: id ID RA DEC z, those the "
                        "catalog has, or Z without z); a name the catalog lacks is refused")
    catalog_read_args(p)
    p.add_argument("--max-rounds", type=int, default=20,
                   help="rejection rounds for draws outside the prior box")
    exact_args(p)
    stream_args(p)
    host_args(p, "catalog chunks (with --stream)")
    flag(p, "--overwrite")
    p.set_defaults(func="infer:cmd_infer")
    return p


def catalog_read_args(p):
    """How `infer` reads a catalog's photometry (columns, extinction, noise policy)."""
    p.add_argument("--flux-fmt", default="flux_{band}",
                   help="flux column of each band [nanomaggies] ({band} = model band name, "
                        "or its short name in any case: flux_u, flux_FUV). Without column "
                        "flags NSA NMGY/NMGY_IVAR (FUV,NUV,u,g,r,i,z) and SDSS "
                        "MODELFLUX/MODELFLUX_IVAR (+ EXTINCTION) are recognised by name; the "
                        "columns used are printed; an ambiguous catalog is refused")
    p.add_argument("--ivar-fmt", default="flux_ivar_{band}",
                   help="inverse-variance column of each band [nanomaggies^-2]")
    p.add_argument("--z-column", default="z", help="redshift column (Z is found too)")
    p.add_argument("--vector-flux", default=None, help="SDSS-style (n, n_elements) flux column "
                   "(e.g. MODELFLUX, NMGY) instead of --flux-fmt")
    p.add_argument("--vector-ivar", default=None, help="its inverse variance (MODELFLUX_IVAR)")
    p.add_argument("--vector-bands", default=None, metavar="B1,B2,...",
                   help="the band of each element of --vector-flux, e.g. FUV,NUV,u,g,r,i,z: "
                        "the model takes its bands' elements (default: NSA / SDSS order for "
                        "NMGY / MODELFLUX of 7 / 5 elements, else the model's bands)")
    p.add_argument("--extinction", default=None, help="Galactic extinction [mag] column "
                   "(vector, or a format like A_{band}); fluxes are dereddened ('none': not "
                   "even an auto-detected MODELFLUX's EXTINCTION)")
    p.add_argument("--snr-floor", type=float, default=None, help="bands with flux*sqrt(ivar) "
                   "below this are masked (mask-aware model) or flag the row")
    calibration_error_arg(p)
    p.add_argument("--noise-policy", default="auto", choices=["auto", "mask", "flag", "ood"],
                   help="bands outside the training (mag, sigma) support: mask the band, flag "
                        "the row (not fit), or fit it marked ood (auto: mask for mask-aware "
                        "models, else ood)")


def calibration_error_arg(p):
    """--calibration-error (infer and mcmc)."""
    p.add_argument("--calibration-error", default="auto", metavar="auto|none|MAG|B=MAG,...",
                   help="photometric calibration error [mag] added to the catalog's sigma in "
                        "quadrature (auto: SDSS 2%% in u, 1%% in griz, Padmanabhan et al. 2008; "
                        "GALEX 0.05 mag FUV, 0.03 mag NUV; none: the catalog's errors as given)")


def exact_args(p):
    """`infer --exact`: importance-sampled exact posteriors."""
    g = p.add_argument_group("exact posteriors (importance sampling with the flow as proposal)")
    flag(g, "--exact", help="reweight flow draws by prior x exact likelihood / proposal density "
                            "(PSIS); summaries and --samples from the resampled draws; adds "
                            "is_ess, is_efficiency, is_efficiency_flow, is_pareto_k, is_n_draws, "
                            "is_flag (1 = not trustworthy: k-hat >= 0.7 or ESS < target), "
                            "is_reason")
    g.add_argument("--target-ess", type=float, default=500.0,
                   help="effective sample size to reach per galaxy (with --exact)")
    g.add_argument("--is-n-initial", type=int, default=2000,
                   help="proposal draws of the first round; doubled until the target (--exact)")
    g.add_argument("--is-n-max", type=int, default=64000,  # sbi.importance.DEFAULT_N_MAX
                   help="most proposal draws per galaxy (--exact); short of the target: is_flag")
    g.add_argument("--is-adapt", type=int, default=None,
                   help="rounds of per-galaxy proposal adaptation (a Student-t refitted to the "
                        "weighted draws; 0 = the flow's defensive mixture only; default "
                        "sbi.importance.DEFAULT_ADAPT) (--exact)")
    flag(g, "--refine", help="with --exact: rerun each flagged galaxy by short MCMC started "
                             "from its importance draws (columns refined, refine_rhat, "
                             "refine_ess; is_flag 0 when it converged)")
    g.add_argument("--refine-sampler", default="ess", choices=["ess", "aies", "nuts"],
                   help="the MCMC of --refine (ess / aies: 30 walkers, nuts: 4 chains; "
                        "converged: R-hat < 1.05 and bulk ESS >= 200 in every coordinate)")
    g.add_argument("--refine-steps", type=int, default=1000,
                   help="steps per walker / chain of --refine, the first 30 %% warm-up")


def stream_args(p):
    """`infer --stream`: chunked, resumable inference over devices and hosts."""
    g = p.add_argument_group("streaming (catalogs larger than memory, resumable)")
    flag(g, "--stream", help="read the catalog in chunks, write one file per chunk, assemble "
                             "an HDF5 --out; draws keyed by catalog row (see docs/scaling.md)")
    g.add_argument("--chunk-rows", type=int, default=16384, help="catalog rows per chunk")
    flag(g, "--resume", help="continue a killed --stream run (chunks on disk are kept)")
    flag(g, "--store-samples", help="also store every draw in --out (samples/theta)")
    flag(g, "--keep-parts", help="keep the chunk files after assembling")
    g.add_argument("--devices", type=devices_type, default=None,
                   help="split each chunk's sampling over N local devices (or 'all')")
    flag(g, "--quiet")


def add_finalize(sub):
    """The `finalize` subcommand."""
    p = sub.add_parser("finalize", help="assemble a streaming inference (infer --stream) and "
                                        "export its summary table")
    p.add_argument("path", nargs="?", default=None,
                   help="the --stream output OUT.h5 (or its work folder OUT.h5.parts)")
    p.add_argument("--out", default=None,
                   help="also write the summary as a table (format from the extension: .fits, "
                        ".ecsv, .csv, .h5, ...)")
    flag(p, "--keep-parts")
    flag(p, "--overwrite")
    p.set_defaults(func="infer:cmd_finalize")
    return p


def add_validate(sub):
    """The `validate` subcommand."""
    p = sub.add_parser("validate", help="SBC / p-p calibration of a trained model on mocks")
    p.add_argument("--model", required=True, help="a trained model folder or a shipped "
                                                  "model's name (sdss_ugriz, galex_sdss)")
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--n-samples", type=int, default=1000)
    seed_arg(p)
    p.add_argument("--out", default="validation")
    flag(p, "--overwrite")
    p.set_defaults(func="commands:cmd_validate")
    return p


def add_mcmc(sub):
    """The `mcmc` subcommand."""
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
    calibration_error_arg(p)
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
    seed_arg(p)
    flag(p, "--resume")
    flag(p, "--overwrite")
    p.set_defaults(func="commands:cmd_mcmc")
    return p


def add_demo(sub):
    """The `demo` subcommand."""
    p = sub.add_parser("demo", help="simulate, train, infer, MCMC and validate, with figures")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--size", choices=["small", "paper"], default="small")
    seed_arg(p)
    flag(p, "--overwrite")
    flag(p, "--quiet")
    p.set_defaults(func="commands:cmd_demo")
    return p


#: the subcommands, in the order ``--help`` lists them
SUBCOMMAND_BUILDERS = (add_example, add_photometry, add_simulate, add_merge_manifests, add_train,
                       add_infer, add_finalize, add_validate, add_mcmc, add_demo)


def build_parser():
    """The ``sedflow-jax`` parser; ``ap.sj_subparsers`` maps each subcommand to its parser."""
    ap = argparse.ArgumentParser(prog="sedflow-jax", description=DESCRIPTION)
    sub = ap.add_subparsers(dest="command", required=True)
    for add in SUBCOMMAND_BUILDERS:
        config_args(add(sub))
    ap.sj_subparsers = dict(sub.choices)
    return ap
