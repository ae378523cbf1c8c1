"""Does the training set's noise cover real catalogs' noise? (issue "Ready for real catalogs", 0)

Simulates a training set twice (in memory, default prior, SDSS ugriz model, ``load_model(z_max=
0.2)``): with the fitted SDSS MODELFLUX noise model as is, and with the calibration floor of
:func:`sedflow_jax.sim.noise.with_calibration_floor`. For each, builds
:class:`sedflow_jax.sbi.masks.TrainingSupport` from the kept rows' x and prints the fraction of
real catalog rows inside the support per band, for the real SDSS catalog
``examples/data/sdss_main_10k.fits`` (MODELFLUX, extinction corrected, 0.01 < z < 0.2) read

- as is ("SDSS": MODELFLUX_IVAR errors, no calibration floor), and
- "NSA-like": sigma_mag := max(sigma_mag, floor_b), floors u 0.05, g 0.02, r 0.02, i 0.02,
  z 0.03 mag (the NSA's NMGY_IVAR floors).

Usage::

    python benchmarks/noise_support.py [--n 200000] [--n-grid 24] [--p-zero 0.5]
        [--floor-max 0.08 0.05 0.05 0.05 0.05] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import sedflow_jax
from sedflow_jax.io.catalog import read_photometry
from sedflow_jax.sbi.masks import TrainingSupport, support_fractions
from sedflow_jax.sed.units import MAG_PER_LN, SDSS_BANDS
from sedflow_jax.sim import noise as N
from sedflow_jax.sim.layout import to_conditioning

BANDS = SDSS_BANDS
NSA_FLOORS = np.array([N.NSA_FLOOR_MAG[b] for b in BANDS])  # mag
CATALOG = Path(__file__).resolve().parents[1] / "examples" / "data" / "sdss_main_10k.fits"


def catalog_x(path, floors=None):
    """x (n, 11) of the catalog's usable rows (masked bands NaN); with ``floors`` (5,) [mag]
    each band's sigma_mag is raised to at least its floor (NSA convention)."""
    ph = read_photometry(str(path), BANDS, vector_flux="MODELFLUX", vector_ivar="MODELFLUX_IVAR",
                         extinction="EXTINCTION", z_col="Z", z_range=(0.01, 0.2),
                         mask_bands=True)
    rows = ph.flag == 0
    flux = np.where(ph.mask, ph.flux, np.nan)[rows]
    sigma = np.where(ph.mask, ph.sigma, np.nan)[rows]
    if floors is not None:
        smag = np.maximum(MAG_PER_LN * sigma / flux, floors)
        sigma = smag * flux / MAG_PER_LN
    return to_conditioning(flux, sigma, ph.z[rows])


def training_x(model, noise, n, seed, block):
    """Kept training contexts x (m, 11) of ``n`` simulated rows, and the run's seconds."""
    t0 = time.perf_counter()
    res = sedflow_jax.simulate(seed, n, model, noise=noise, block=block, progress=False)
    x = np.asarray(res.x)[np.asarray(res.keep, bool)]
    return x, time.perf_counter() - t0


def sigma_quantiles(x, nb=len(BANDS)):
    """{band: (1 %, 50 %, 99 %) quantiles of sigma_mag} of x (n, 2 nb + 1)."""
    return {b: np.nanpercentile(x[:, nb + i], [1, 50, 99]).round(4).tolist()
            for i, b in enumerate(BANDS)}


def run(args) -> dict:
    floor = N.with_calibration_floor(N.default_noise_model(BANDS),
                                     args.floor_max if args.floor_max else None, args.p_zero)
    cats = {"SDSS": catalog_x(CATALOG), "NSA-like": catalog_x(CATALOG, NSA_FLOORS)}
    out = {"n": args.n, "n_grid": args.n_grid, "noise_floor": floor.floor_dict(),
           "catalog_rows": {k: int(v.shape[0]) for k, v in cats.items()},
           "catalog_sigma_q": {k: sigma_quantiles(v) for k, v in cats.items()}, "fractions": {}}
    model = sedflow_jax.load_model(z_max=0.2)
    for name, noise in (("no floor", N.default_noise_model(BANDS)), ("floor", floor)):
        x, secs = training_x(model, noise, args.n, args.seed, args.block)
        sup = TrainingSupport.from_x(x, BANDS, n_grid=args.n_grid)
        out["fractions"][name] = {c: support_fractions(sup, xc) for c, xc in cats.items()}
        out[f"train_sigma_q ({name})"] = sigma_quantiles(x)
        print(f"[{name}] {x.shape[0]} kept training rows of {args.n} in {secs:.0f} s", flush=True)
    return out


def table(out: dict) -> str:
    """Markdown table: training noise x catalog convention -> % inside per band."""
    head = "| training | catalog | " + " | ".join(b[-1] for b in BANDS) + " | all bands |"
    lines = [head, "|" + "---|" * (len(BANDS) + 3)]
    for tr, per in out["fractions"].items():
        for cat, fr in per.items():
            vals = " | ".join(f"{100 * fr[b]:.1f}" for b in BANDS)
            lines.append(f"| {tr} | {cat} | {vals} | {100 * fr['all_bands']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000, help="simulated rows per training set")
    ap.add_argument("--n-grid", type=int, default=24, help="TrainingSupport grid cells per axis")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--block", type=int, default=4096)
    ap.add_argument("--p-zero", type=float, default=N.RECOMMENDED_FLOOR_P_ZERO,
                    help="probability of a row without floor")
    ap.add_argument("--floor-max", type=float, nargs=len(BANDS), default=None,
                    help="floor range maxima u g r i z [mag] (default: the recommended ones)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    out = run(args)
    print(json.dumps({k: v for k, v in out.items() if k != "fractions"}, indent=1))
    print(table(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
