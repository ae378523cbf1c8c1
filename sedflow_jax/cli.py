"""`sedflow-jax` command line: thin wiring from arguments to the library, no science here."""
from __future__ import annotations

import argparse
import json
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
    return ap


def main(argv=None):
    from sedflow_jax.model import ModelInputError
    from sedflow_jax.photometry import FilterError
    from sedflow_jax.ssp import SSPGridError

    a = build_parser().parse_args(argv)
    try:
        a.func(a)
    except (CLIError, ModelInputError, FilterError, SSPGridError, FileNotFoundError) as exc:
        print(f"sedflow-jax {a.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
