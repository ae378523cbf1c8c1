"""`sedflow-jax` command line: thin wiring from arguments to the library, no science here."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

EXAMPLE_THETA = [10.5, 0.25, 0.25, 0.25, 0.25, 0.1, 2.0, 1e-3, 1e-3, 0.5, 0.5, -0.3]


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


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


def _load_model(a):
    import sedflow_jax as sj

    return sj.load_model(grid=a.grid, filters=a.filters, z_max=a.z_max)


def cmd_photometry(a):
    """theta -> nanomaggies and AB magnitudes (one galaxy from flags, or a table of them)."""
    from astropy.table import Table

    from sedflow_jax.model import PARAM_NAMES

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
        out.write(a.output, overwrite=a.overwrite)
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
    """Training set: prior -> photometry -> noise -> x, chunked to disk, resumable."""
    from sedflow_jax import prior as P
    from sedflow_jax.simulation import simulate

    if a.n <= 0:
        raise CLIError(f"--n must be > 0, got {a.n}")
    pr = P.provabgs_prior(zmin=a.zmin, zmax=a.zmax) if a.prior == "provabgs" else \
        P.default_nmf_prior(zmin=a.zmin, zmax=a.zmax)
    import sedflow_jax as sj

    model = sj.load_model(grid=a.grid, filters=a.filters, z_max=a.zmax)
    res = simulate(a.seed, a.n, model, pr, out=a.out, chunk=a.chunk, overwrite=a.overwrite,
                   include_flux=a.include_flux, progress=not a.quiet)
    t = res.timings
    print(f"{res.n_requested} rows -> {res.out}: kept {res.n_kept}, dropped {res.n_dropped} "
          f"{res.dropped}; {t.get('galaxies_per_s', float('nan')):.0f} galaxies/s")


def cmd_train(a):
    """Train SEDflow's flow on a training-set folder."""
    from sedflow_jax import flow as F
    from sedflow_jax import train as T
    from sedflow_jax.posterior import train_posterior

    out = _out_dir(a.out, a.overwrite or a.resume)
    fc = None
    if a.preset == "paper":
        fc = F.FlowConfig.paper()
    elif a.blocks or a.hidden:
        fc = F.FlowConfig.small(11, 11, seed=a.seed).replace(
            **{k: v for k, v in (("n_blocks", a.blocks), ("hidden", a.hidden)) if v})
    tc = T.TrainConfig(seed=a.seed, batch_size=a.batch_size, learning_rate=a.lr,
                       patience=a.patience, max_epochs=a.max_epochs, progress=not a.quiet)
    post, res = train_posterior(a.data, out, flow_config=fc, train_config=tc, seed=a.seed,
                                resume=a.resume)
    print(f"trained on {res.n_train} rows (val {res.n_val}); best epoch {res.best_epoch}, "
          f"val loss {res.best_val_loss:.4f}; stopped early: {res.stopped_early}; -> {out}")


def cmd_infer(a):
    """Posterior samples and summaries for every usable row of a catalog."""
    import jax
    from astropy.table import Table, hstack

    import sedflow_jax as sj
    from sedflow_jax import catalog as C
    from sedflow_jax.posterior import AmortizedPosterior, summarize

    if Path(a.out).exists() and not a.overwrite:
        raise CLIError(f"{a.out} exists (use --overwrite)")
    post = AmortizedPosterior.load(a.model)
    zr = (post.prior.zmin, post.prior.zmax)
    ph = C.read_photometry(a.catalog, post.bands, z_range=zr)
    x = C.to_conditioning(ph.flux, ph.sigma, ph.z)
    use = ph.flag == 0
    print(f"{len(use)} rows: {ph.counts['usable']} usable; flagged: "
          + ", ".join(f"{k} {v}" for k, v in ph.counts.items() if k != "usable" and v))
    key = jax.random.key(a.seed)
    s = post.sample_batched(key, x[use], a.n_samples)
    model = sj.load_model(filters=list(post.bands), z_max=max(zr[1], 1e-3))
    summ = summarize(s, model=model, z=ph.z[use], n_derived=a.n_derived)
    full = Table()
    for col in summ.colnames:
        v = np.asarray(summ[col])
        arr = np.full((len(use),) + v.shape[1:], np.nan if v.dtype.kind == "f" else 0,
                      dtype=v.dtype if v.dtype.kind != "b" else bool)
        arr[use] = v
        full[col] = arr
    full["flag"] = ph.flag
    full["ood"] |= (ph.flag & C.FLAG_Z_RANGE) > 0
    keep_cols = [c for c in a.keep_columns if c in Table.read(a.catalog).colnames]
    if keep_cols:
        full = hstack([Table.read(a.catalog)[keep_cols], full])
    full.meta.update({"model": str(a.model), "n_samples": a.n_samples, "seed": a.seed,
                      "sedflow_jax_version": sj.__version__, "flag_counts": ph.counts})
    full.write(a.out, overwrite=a.overwrite)
    if a.samples:
        import h5py

        with h5py.File(a.samples, "w") as f:
            f["theta"] = s.theta
            f["rows"] = np.flatnonzero(use)
            f.attrs["param_names"] = list(sj.PARAM_NAMES)
    print(f"wrote {a.out}; mean acceptance {np.mean(s.acceptance):.3f}; "
          f"low acceptance {int(s.low_acceptance.sum())}; out of support {int(s.ood.sum())}")


def cmd_validate(a):
    """p-p / SBC calibration of a trained model on fresh mock galaxies."""
    from sedflow_jax.posterior import AmortizedPosterior
    from sedflow_jax.validation import validate_posterior

    out = _out_dir(a.out, a.overwrite)
    post = AmortizedPosterior.load(a.model)
    res = validate_posterior(post, a.seed, a.n_test, a.n_samples, out=out)
    print((out / "validation.md").read_text())
    print(f"wrote {out}/sbc.png, coverage.png, validation.json")
    return res


def cmd_mcmc(a):
    """NUTS / ESS / AIES on catalog rows: samples, ArviZ netCDF, R-hat/ESS summary."""
    import sedflow_jax as sj
    from sedflow_jax.mcmc import run_mcmc_catalog

    try:
        lo, _, hi = a.rows.partition(":")
        rows = list(range(int(lo or 0), int(hi))) if _ else [int(lo)]
    except ValueError as exc:
        raise CLIError(f"--rows must look like 0:10 or 3, got {a.rows!r}") from exc
    if Path(a.out).exists() and any(Path(a.out).iterdir()) and not (a.overwrite or a.resume):
        raise CLIError(f"{a.out} exists and is not empty (use --resume or --overwrite)")
    model = sj.load_model(filters=a.filters, z_max=a.z_max) if a.filters else None
    kw = {k: v for k, v in (("num_chains", a.chains), ("num_samples", a.samples),
                            ("num_warmup", a.warmup)) if v is not None}
    t = run_mcmc_catalog(a.catalog, rows, a.sampler, a.out, model=model, key=a.seed,
                         gamma_density=a.gamma_density, resume=a.resume, **kw)
    ok = int((t["status"] == "ok").sum())
    print(f"{ok}/{len(t)} galaxies fit with {a.sampler}; summary in {a.out}/summary.ecsv")


def cmd_demo(a):
    """The whole pipeline on the embedded grid (see sedflow_jax.demo)."""
    from sedflow_jax.demo import run_demo

    out = _out_dir(a.out, a.overwrite)
    run_demo(out, a.size, seed=a.seed, progress=not a.quiet)


def build_parser():
    ap = argparse.ArgumentParser(prog="sedflow-jax", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("example", help="SED + photometry + derived properties of an example galaxy")
    _model_args(p)
    p.add_argument("--theta", type=float, nargs=12, default=None)
    p.add_argument("--z", type=float, default=0.1)
    p.add_argument("--out", default="example_out")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_example)

    p = sub.add_parser("photometry", help="theta -> nanomaggies / AB magnitudes")
    _model_args(p)
    p.add_argument("--theta", type=float, nargs=12, default=None,
                   help="logmstar beta1..4 fburst tburst gamma1 gamma2 tau_bc tau_ism n_dust")
    p.add_argument("--z", type=float, default=None)
    p.add_argument("--input", help="table (FITS/ECSV/CSV) with the 12 parameter columns and z")
    p.add_argument("--z-column", default="z")
    p.add_argument("--output", help="write a table (format from the extension)")
    p.add_argument("--overwrite", action="store_true")
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
    p.add_argument("--include-flux", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_simulate)

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
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
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
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser("validate", help="SBC / p-p calibration of a trained model on mocks")
    p.add_argument("--model", required=True)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--n-samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="validation")
    p.add_argument("--overwrite", action="store_true")
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_mcmc)

    p = sub.add_parser("demo", help="simulate, train, infer, MCMC and validate, with figures")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--size", choices=["small", "paper"], default="small")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)
    return ap


def main(argv=None):
    from sedflow_jax.model import ModelInputError
    from sedflow_jax.photometry import FilterError
    from sedflow_jax.catalog import CatalogError
    from sedflow_jax.ssp import SSPGridError

    a = build_parser().parse_args(argv)
    try:
        a.func(a)
    except (CLIError, ModelInputError, FilterError, SSPGridError, CatalogError,
            FileNotFoundError, PermissionError, NotADirectoryError, ValueError, KeyError) as exc:
        if os.environ.get("SEDFLOW_JAX_DEBUG"):
            raise
        print(f"sedflow-jax {a.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
