"""The other subcommands: example, photometry, simulate, merge-manifests, train, validate,
mcmc, demo. Each wires arguments to library calls."""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import jax
import numpy as np
from astropy.table import Table

from sedflow_jax import mcmc as M
from sedflow_jax.demo import run_demo
from sedflow_jax.eval.validation import validate_posterior
from sedflow_jax.io import catalog as C
from sedflow_jax.nn import flow as F
from sedflow_jax.nn import train as T
from sedflow_jax.sbi.defaults import load_posterior
from sedflow_jax.sbi.training import train_posterior
from sedflow_jax.sed.params import PARAM_NAMES
from sedflow_jax.sed.units import (AB_FNU_CGS, C_ANGSTROM_S, GALEX_BANDS, NMGY_ZERO_POINT,
                                   SDSS_BANDS)
from sedflow_jax.sim import prior as P
from sedflow_jax.sim import simulate as S
from sedflow_jax.sim.layout import n_bands_from_x
from sedflow_jax.sim.noise import default_noise_model
from sedflow_jax.sim.readers import ShardDataset
from sedflow_jax.util import sha256_file
from sedflow_jax.version import __version__

from .args import CLIError, CommandFailed
from .common import (EXAMPLE_THETA, get_model, host_split, load_model, mesh_from_args, out_dir,
                     refuse_existing, write_table)
from .config import CONFIG_NAME, TABLE_CONFIG_KEY, table_record, write_config


def ab_mag(nmgy):
    """AB magnitudes of fluxes in nanomaggies (numpy float64)."""
    return NMGY_ZERO_POINT - 2.5 * np.log10(np.asarray(nmgy, float))


def cmd_photometry(a):
    """theta -> nanomaggies and AB magnitudes (one galaxy from flags, or a table of them)."""
    refuse_existing(a.output, a.overwrite, "--output")
    model = load_model(a)
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
    mag = ab_mag(f)
    if a.output:
        out = Table()
        out[a.z_column] = z
        for i, name in enumerate(PARAM_NAMES):
            out[name] = theta[:, i]
        for j, band in enumerate(model.filter_names):
            out[f"flux_{band}"] = f[:, j]
            out[f"flux_{band}"].unit = "nanomaggy"
            out[f"mag_{band}"] = mag[:, j]
        out.meta.update(provenance(model))
        out.meta[TABLE_CONFIG_KEY] = table_record(a)
        write_table(out, a.output, a.overwrite)
        print(f"wrote {len(out)} rows to {a.output}")
    else:
        print(f"{'band':>10s} {'nanomaggies':>14s} {'AB mag':>8s}")
        for j, band in enumerate(model.filter_names):
            print(f"{band:>10s} {f[0, j]:14.6g} {mag[0, j]:8.4f}")


def provenance(model):
    return {"sedflow_jax_version": __version__, "ssp_grid": model.grid.name,
            "filters": list(model.filter_names), "model_config": repr(model.config)}


def cmd_example(a):
    """The main job for now: SED, photometry and derived properties of an example galaxy."""
    out = out_dir(a.out, a.overwrite)
    a.filters = a.filters or list(GALEX_BANDS + SDSS_BANDS)
    write_config(out, a)
    model = load_model(a)
    theta = np.asarray(a.theta or EXAMPLE_THETA, float)
    f = np.asarray(model.photometry(theta, a.z), float)
    mag = ab_mag(f)
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
    t.meta.update(provenance(model))
    t.write(out / "example_sed.ecsv", overwrite=True)
    with open(out / "example_galaxy.json", "w") as fh:
        json.dump({"theta": dict(zip(PARAM_NAMES, theta.tolist())), "z": a.z,
                   "nanomaggies": dict(zip(model.filter_names, f.tolist())),
                   "ab_mag": dict(zip(model.filter_names, mag.tolist())),
                   "derived": props, **provenance(model)}, fh, indent=2)
    plot_example(model, wave, flux, f, theta, a.z, out / "example_sed.png")
    print(f"wrote {out / 'example_sed.png'}, example_sed.ecsv, example_galaxy.json")


def plot_example(model, wave, flux_lambda, phot, theta, z, path):
    """The example's SED (f_nu in nanomaggies, on the photometry's axis), its synthetic
    photometry and the filter curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    sel = (wave > 1200) & (wave < 12000)
    fnu_nmgy = flux_lambda[sel] * 1e-17 * wave[sel] ** 2 / C_ANGSTROM_S / AB_FNU_CGS * 1e9
    ax.plot(wave[sel], fnu_nmgy, lw=0.6, color="k", label="model SED")
    ax2 = ax.twinx()
    for i, (flt, fj) in enumerate(zip(model.filters, phot)):
        ax2.fill_between(flt.wave, flt.response / flt.response.max(), alpha=0.15, color=f"C{i}")
        ax.scatter([flt.effective_wavelength], [fj], zorder=5, s=30, color=f"C{i}")
        ax.annotate(flt.name, (flt.effective_wavelength, fj), textcoords="offset points",
                    xytext=(0, 8), ha="center", fontsize=8)
    ax2.set_ylim(0, 4)
    ax2.set_yticks([])
    ax.set_yscale("log")
    ax.set_xlabel("observed wavelength [Å]")
    ax.set_ylabel("f_ν [nanomaggies]")
    ax.set_title(f"log M*={theta[0]:g}, z={z:g}: SED and synthetic photometry")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_simulate(a):
    """Training set: prior -> photometry -> noise -> x, chunked to disk, resumable; split over
    local devices (--devices) and over hosts (--process-id/--num-processes, --coordinator)."""
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
    hosts, dist = host_split(a)
    mesh = mesh_from_args(a)
    pr = P.provabgs_prior(zmin=a.zmin, zmax=a.zmax) if a.prior == "provabgs" else \
        P.default_nmf_prior(zmin=a.zmin, zmax=a.zmax)
    model = get_model(a.grid, a.filters, a.zmax)
    # --calibration-floor (default): the recommended floor; off: the fitted noise as is
    noise = default_noise_model(model.filter_names, calibration_floor=True) \
        if a.calibration_floor else None
    multi = hosts is not None and hosts[1] > 1
    kw = dict(out=out, chunk=a.chunk, block=a.block, overwrite=a.overwrite,
              include_flux=a.include_flux, progress=not a.quiet, mesh=mesh)
    if dist:
        res, merged = S.simulate_distributed(a.seed, a.n, model, pr, noise, **kw)
    else:
        res = S.simulate(a.seed, a.n, model, pr, noise, hosts=hosts, **kw)
        merged = S.read_manifest(out) if (out / S.MANIFEST_NAME).exists() else None
    # recorded after the run: a refused run must not replace the folder's record
    write_config(out, a, f"config.host{hosts[0]}.toml" if multi else CONFIG_NAME)
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
                same = sha256_file(target) == sha256_file(f)
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
    m = S.merge_manifests(dest, verify=a.verify or bool(a.sources))
    print(f"merged {len(m['hosts']['parts'])} host part(s): {len(m['shards'])} shards, "
          f"{m['n_rows_done']} rows (kept {m['n_kept']}, dropped {m['n_dropped']}) -> "
          f"{dest / S.MANIFEST_NAME}")


#: `train --band-dropout` default (a mask-aware flow: rows missing bands are still fit)
DEFAULT_BAND_DROPOUT = 0.5


def band_dropout(a):
    """The band-dropout probability to train with (None: a plain flow). Unset: 0.5 when the
    training set has more than --min-bands bands, else off with a note; a.band_dropout is set
    to the value used, so the recorded configuration holds it."""
    if a.band_dropout is None:
        try:
            nb = n_bands_from_x(len(S.read_manifest(a.data)["x_names"]))
        except (OSError, ValueError, KeyError, TypeError):
            nb = None  # unreadable: train_posterior names the problem
        a.band_dropout = DEFAULT_BAND_DROPOUT if nb is None or nb > a.min_bands else 0.0
        if not a.band_dropout:
            print(f"note: band dropout off: the training set has {nb} band(s), not more than "
                  f"--min-bands {a.min_bands}")
    return a.band_dropout if a.band_dropout else None


def cmd_train(a):
    """Train SEDflow's flow on a training-set folder (data-parallel over --devices). Defaults:
    logit theta space and band dropout 0.5 (``--theta-space box --band-dropout 0``: SEDflow)."""
    out = out_dir(a.out, a.overwrite or a.resume)
    mesh = mesh_from_args(a)
    dropout = band_dropout(a)
    fc = None
    if a.preset == "paper" or a.blocks or a.hidden:
        src = ShardDataset(a.data)  # the flow's dimensions come from the training set
        dims = (src.d_theta, src.d_context)
        if dropout is not None:  # mask-aware context: + one 0/1 mask column per band
            dims = (src.d_theta, src.d_context + n_bands_from_x(src.d_context))
        if a.preset == "paper":
            fc = F.FlowConfig.paper(*dims)
        else:
            fc = F.FlowConfig.small(*dims, seed=a.seed)
        fc = fc.replace(**{k: v for k, v in (("n_blocks", a.blocks), ("hidden", a.hidden)) if v})
    tc = T.TrainConfig(seed=a.seed, batch_size=a.batch_size, learning_rate=a.lr,
                       patience=a.patience, max_epochs=a.max_epochs, progress=not a.quiet)
    write_config(out, a)
    post, res = train_posterior(a.data, out, flow_config=fc, train_config=tc, seed=a.seed,
                                resume=a.resume, mesh=mesh, band_dropout=dropout,
                                min_bands=a.min_bands, theta_space=a.theta_space)
    print(f"trained on {res.n_train} rows (val {res.n_val}); best epoch {res.best_epoch}, "
          f"val loss {res.best_val_loss:.4f}; stopped early: {res.stopped_early}; -> {out}")


def cmd_validate(a):
    """p-p / SBC calibration of a trained model on fresh mock galaxies."""
    out = out_dir(a.out, a.overwrite)
    write_config(out, a)
    post = load_posterior(a.model)
    res = validate_posterior(post, a.seed, a.n_test, a.n_samples, out=out)
    print((out / "validation.md").read_text())
    print(f"wrote {out}/sbc.png, coverage.png, validation.json")
    return res


def default_compile_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sedflow-jax", "xla")


def enable_compile_cache(path) -> None:
    """A persistent XLA compilation cache for this process, unless one is set already.

    NumPyro retraces its sampling loop on every run, so without it every galaxy of a catalog
    recompiles the sampler: measured on 2 CPU cores, ~4 s per galaxy for ESS (30 walkers x
    600 steps: 13.6 s -> 9.5 s) and ~7 s for sequential NUTS. (Parallel NUTS chains embed the
    galaxy's data in the program, so they compile per galaxy anyway.)
    """
    if path is None or str(path).lower() == "none" or jax.config.jax_compilation_cache_dir:
        return
    Path(path).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def parse_rows(text: str) -> list:
    """``--rows``: ``START:STOP`` or a single row."""
    try:
        lo, colon, hi = text.partition(":")
        return list(range(int(lo or 0), int(hi))) if colon else [int(lo)]
    except ValueError as exc:
        raise CLIError(f"--rows must look like 0:10 or 3, got {text!r}") from exc


def mcmc_run_kw(a) -> dict:
    """The runner's keywords from the flags (only those given)."""
    kw = {k: v for k, v in (("num_chains", a.chains), ("num_samples", a.samples),
                            ("num_warmup", a.warmup)) if v is not None}
    if a.max_tree_depth is not None:
        if a.sampler != "nuts":
            raise CLIError("--max-tree-depth is a NUTS option")
        if a.max_tree_depth < 1:
            raise CLIError(f"--max-tree-depth must be >= 1, got {a.max_tree_depth}")
        kw["max_tree_depth"] = a.max_tree_depth
    return kw


def split_cpu(a) -> None:
    """--cpu-devices (default: one per NUTS chain, 1 for the ensembles)."""
    n_chains = a.chains if a.chains is not None else M.default_num_chains(a.sampler)
    n_dev = a.cpu_devices if a.cpu_devices is not None else (
        n_chains if a.sampler == "nuts" else 1)
    if n_dev < 1:
        raise CLIError(f"--cpu-devices must be >= 1, got {n_dev}")
    if n_dev <= 1:
        return
    with warnings.catch_warnings():  # too late when JAX already ran (library use): keep
        warnings.simplefilter("ignore", RuntimeWarning)
        n_have = M.set_cpu_devices(n_dev)
    if a.sampler == "nuts":
        how = ("in parallel" if M.default_chain_method("nuts", n_chains) == "parallel"
               else "one after another")
        print(f"NUTS: {n_chains} chains {how} ({n_have} JAX devices)")


def cmd_mcmc(a):
    """NUTS / ESS / AIES on catalog rows: samples, ArviZ netCDF, R-hat/ESS summary. Exits 1
    when every galaxy failed."""
    rows = parse_rows(a.rows)
    if Path(a.out).exists() and any(Path(a.out).iterdir()) and not (a.overwrite or a.resume):
        raise CLIError(f"{a.out} exists and is not empty (use --resume or --overwrite)")
    kw = mcmc_run_kw(a)
    cal = C.calibration_error_mag(a.filters or C.SDSS_BANDS, a.calibration_error)  # checked early
    split_cpu(a)
    enable_compile_cache(a.compile_cache or default_compile_cache())
    model = get_model(None, a.filters, a.z_max) if a.filters else None
    Path(a.out).mkdir(parents=True, exist_ok=True)
    write_config(a.out, a)
    t = M.run_mcmc_catalog(a.catalog, rows, a.sampler, a.out, model=model, key=a.seed,
                           gamma_density=a.gamma_density, resume=a.resume,
                           calibration_error=a.calibration_error, **kw)
    if cal.any():
        bands = t.meta["bands"]
        per_band = C.calibration_error_mag(bands, a.calibration_error)
        print("sigma: the catalog's with a calibration error added in quadrature ("
              + ", ".join(f"{b} {c:.3g}" for b, c in zip(bands, per_band)) + " mag)")
    n, ok = len(t), int((t["status"] == "ok").sum()) if len(t) else 0
    failed = n - ok
    where = f"{a.out}/summary.ecsv"
    print(f"{ok}/{n} galaxies fit with {a.sampler}; {failed} failed"
          + (f": see {where} status" if failed else f"; summary in {where}"))
    if n and not ok:
        raise CommandFailed(f"every galaxy failed ({n} of {n}); the errors are in {where} "
                            "(column error)")


def cmd_demo(a):
    """The whole pipeline on the embedded grid (see sedflow_jax.demo)."""
    out = out_dir(a.out, a.overwrite)
    write_config(out, a)
    run_demo(out, a.size, seed=a.seed, progress=not a.quiet)
