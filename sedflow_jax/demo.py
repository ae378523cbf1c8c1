"""`sedflow-jax demo`: the whole pipeline on the embedded grid, with figures and a summary.

Stages (each with a progress bar or a line of output): simulate a training set -> train the
flow -> a held-out mock catalog with known truths (FITS) -> posteriors for the whole catalog
-> NUTS on a few of its galaxies -> SBC / p-p calibration on fresh mocks -> corner and SED
figures -> ``summary.json`` + ``summary.md`` (timings, acceptance, calibration), each output
recording the run's configuration and the package version.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import jax
import numpy as np

from . import mcmc as M
from .eval import diagnostics as D
from .eval.validation import validate_posterior, validation_markdown
from .io import catalog as C
from .io.mocks import mock_catalog, mock_truths
from .nn import flow as F
from .nn import train as T
from .sbi.summary import summarize
from .sbi.training import train_posterior
from .sed.model import load_model
from .sed.params import PARAM_NAMES, SAMPLING_NAMES
from .sim.layout import to_conditioning
from .sim.simulate import simulate
from .version import __version__

#: sizes: small runs on a 2-core CPU in minutes; paper uses SEDflow's sizes (for a GPU). Both
#: train the flow in logit coordinates (every draw inside the prior box; override
#: ``theta_space='box'`` for SEDflow's rejection to the box)
SIZES = {
    "small": dict(n_train=400_000, blocks=5, hidden=128, batch_size=1024, learning_rate=1e-3,
                  max_epochs=30, patience=5, n_catalog=200, n_samples=2000, n_mcmc=1,
                  mcmc_chains=2, mcmc_samples=200, mcmc_warmup=300, mcmc_tree_depth=7,
                  n_test=300, n_test_samples=300, theta_space="logit"),
    "paper": dict(n_train=3_800_000, blocks=15, hidden=500, batch_size=512, learning_rate=5e-4,
                  max_epochs=1000, patience=20, n_catalog=1000, n_samples=10_000, n_mcmc=10,
                  mcmc_chains=4, mcmc_samples=1000, mcmc_warmup=1000, mcmc_tree_depth=10,
                  n_test=1000, n_test_samples=1000, theta_space="logit"),
}


def run_demo(out, size: str = "small", *, seed: int = 0, overrides: dict | None = None,
             progress: bool = True) -> dict:
    """Run every stage into folder ``out``; returns the summary dict (also written to disk)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}")
    cfg = dict(SIZES[size], **(overrides or {}))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fig_dir = out / "figures"
    fig_dir.mkdir(exist_ok=True)
    times = {}
    meta = {"sedflow_jax_version": __version__, "size": size, "seed": seed, "config": cfg,
            "jax_backend": jax.default_backend()}
    (out / "config.json").write_text(json.dumps(meta, indent=2))

    t = _stage(f"1/6 simulate {cfg['n_train']:,} training galaxies")
    model = load_model(z_max=0.2)
    sim = simulate(seed, cfg["n_train"], model, out=out / "trainset", progress=progress)
    times["simulate_s"] = time.perf_counter() - t

    t = _stage("2/6 train the flow")
    post, fit, fc = train_stage(out, cfg, size, seed, progress)
    times["train_s"] = time.perf_counter() - t

    t = _stage(f"3/6 mock catalog of {cfg['n_catalog']} held-out galaxies and their posteriors")
    key = jax.random.key(seed + 1_000_003)
    cs = catalog_stage(out, cfg, model, post, key)
    times["infer_s"] = time.perf_counter() - t
    times["infer_galaxies_per_s"] = cfg["n_catalog"] / cs.infer_time

    t = _stage(f"4/6 NUTS on {cfg['n_mcmc']} catalog galaxies (started from the flow's draws)")
    summ_mcmc = mcmc_stage(out, cfg, model, cs, seed, progress, fig_dir)
    times["mcmc_s"] = time.perf_counter() - t

    t = _stage(f"5/6 calibration (SBC, p-p) on {cfg['n_test']} fresh mock galaxies")
    val = validate_posterior(post, jax.random.fold_in(key, 2), cfg["n_test"],
                             cfg["n_test_samples"], model=model, out=fig_dir)
    times["validate_s"] = time.perf_counter() - t

    _stage("6/6 summary")
    summary = demo_summary(meta, sim, fit, fc, cs, summ_mcmc, val, times)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "summary.md").write_text(_markdown(summary))
    print(_markdown(summary))
    return summary


def _stage(name: str) -> float:
    print(f"[demo] {name} ...", flush=True)
    return time.perf_counter()


def train_stage(out: Path, cfg: dict, size: str, seed: int, progress: bool):
    """Train the flow on ``out/trainset`` into ``out/model``: (posterior, fit, flow config)."""
    fc = F.FlowConfig.small(11, 11, seed=seed).replace(n_blocks=cfg["blocks"], hidden=cfg["hidden"])
    if size == "paper":
        fc = F.FlowConfig.paper(seed=seed)
    tc = T.TrainConfig(seed=seed, batch_size=cfg["batch_size"], patience=cfg["patience"],
                       learning_rate=cfg["learning_rate"],
                       max_epochs=cfg["max_epochs"], progress=progress)
    post, fit = train_posterior(str(out / "trainset"), out / "model", flow_config=fc,
                                train_config=tc, seed=seed,
                                theta_space=cfg["theta_space"])
    return post, fit, fc


class CatalogStage(NamedTuple):
    """The held-out mock catalog, its photometry and the flow's posterior draws."""

    cat: Any
    ph: Any
    smp: Any
    infer_time: float


def catalog_stage(out: Path, cfg: dict, model, post, key) -> CatalogStage:
    """A mock catalog with known truths (``mock_catalog.fits``) and the flow's posteriors for
    all of it (``posteriors.fits`` with the truths beside, ``posterior_samples.h5``)."""
    cat = mock_catalog(jax.random.fold_in(key, 0), cfg["n_catalog"], model=model)
    cat.meta.update({"sedflow_jax_version": __version__})
    cat.write(out / "mock_catalog.fits", overwrite=True)
    ph = C.read_photometry(cat, post.bands)
    x = to_conditioning(ph.flux, ph.sigma, ph.z)
    t_inf = time.perf_counter()
    smp = post.sample_batched(jax.random.fold_in(key, 1), x, cfg["n_samples"])
    t_inf = time.perf_counter() - t_inf
    table = summarize(smp, model=model, z=ph.z, n_derived=200)
    for name in PARAM_NAMES:
        table[f"{name}_true"] = cat[name]
    table["z"] = cat["z"]
    table.meta.update({"sedflow_jax_version": __version__, "n_samples": cfg["n_samples"]})
    table.write(out / "posteriors.fits", overwrite=True)
    with h5py.File(out / "posterior_samples.h5", "w") as f:
        f["theta"] = smp.theta
        f.attrs["param_names"] = list(PARAM_NAMES)
    return CatalogStage(cat, ph, smp, t_inf)


def mcmc_stage(out: Path, cfg: dict, model, cs: CatalogStage, seed: int, progress: bool,
               fig_dir: Path):
    """NUTS on the first catalog galaxies, started from the flow's draws (``out/mcmc``), and
    corner (flow vs NUTS) and SED figures of each; returns the MCMC summary table."""
    rows = list(range(cfg["n_mcmc"]))
    flow_init = {r: cs.smp.draws(r)[0] for r in rows}
    summ_mcmc, results = M.run_mcmc_catalog(
        cs.cat, rows, "nuts", out / "mcmc", model=model, key=seed, return_results=True,
        progress=progress, init_samples={r: v for r, v in flow_init.items() if len(v)},
        num_chains=cfg["mcmc_chains"], num_warmup=cfg["mcmc_warmup"],
        num_samples=cfg["mcmc_samples"], max_tree_depth=cfg["mcmc_tree_depth"])
    _, truths = mock_truths(cs.cat)
    for r in rows:
        res = results.get(r)
        if res is None:
            continue
        flow_s, flow_theta = cs.smp.draws(r)
        D.plot_corner({"SEDflow (flow)": flow_s, "NUTS": res.flat_samples},
                      list(SAMPLING_NAMES), truths[r], fig_dir / f"corner_galaxy{r}.png")
        D.plot_sed_fit(model, flow_theta, float(cs.cat["z"][r]),
                       cs.ph.flux[r], cs.ph.sigma[r], fig_dir / f"sed_galaxy{r}.png")
    return summ_mcmc


def demo_summary(meta: dict, sim, fit, fc, cs: CatalogStage, summ_mcmc, val,
                 times: dict) -> dict:
    """The run's summary: configuration, training set, flow, catalog acceptance, MCMC,
    calibration and timings (what ``summary.json`` holds)."""
    acc = np.asarray(cs.smp.acceptance)
    ok = np.asarray(summ_mcmc["status"]) == "ok"
    return {
        **meta,
        "training_set": {"n_requested": sim.n_requested, "n_kept": sim.n_kept,
                         "dropped": sim.dropped},
        "training": {"best_epoch": fit.best_epoch, "epochs": fit.epochs,
                     "best_val_loss": float(fit.best_val_loss),
                     "stopped_early": bool(fit.stopped_early),
                     "flow": dataclasses.asdict(fc)},
        "catalog": {"n": len(cs.cat), "mean_acceptance": float(acc.mean()),
                    "min_acceptance": float(acc.min()),
                    "n_low_acceptance": int(cs.smp.low_acceptance.sum()),
                    "n_ood": int(cs.smp.ood.sum()), "flag_counts": cs.ph.counts},
        "mcmc": {"n": len(summ_mcmc), "n_ok": int(ok.sum()),
                 "time_per_galaxy_s": float(np.mean(np.asarray(summ_mcmc["time_s"])[ok]))
                 if ok.any() else None,
                 "rhat_max": float(np.nanmax(summ_mcmc["rhat_max"])) if ok.any() else None},
        "calibration": val.summary,
        "timings_s": times,
    }


def _markdown(s: dict) -> str:
    t = s["timings_s"]
    c = s["catalog"]
    lines = [
        f"# sedflow-jax demo ({s['size']}, seed {s['seed']}, v{s['sedflow_jax_version']}, "
        f"{s['jax_backend']})", "",
        f"* training set: {s['training_set']['n_requested']:,} simulated, "
        f"{s['training_set']['n_kept']:,} kept (dropped by reason: {s['training_set']['dropped']})"
        f" in {t['simulate_s']:.1f} s",
        f"* flow: best epoch {s['training']['best_epoch']} of {s['training']['epochs']}, "
        f"validation loss {s['training']['best_val_loss']:.3f}, early stop "
        f"{s['training']['stopped_early']}, {t['train_s']:.0f} s",
        f"* catalog: {c['n']} mock galaxies, posteriors at "
        f"{t['infer_galaxies_per_s']:.1f} galaxies/s; mean acceptance {c['mean_acceptance']:.3f} "
        f"(min {c['min_acceptance']:.3f}); low acceptance {c['n_low_acceptance']}; "
        f"out of support {c['n_ood']}",
        f"* NUTS: {s['mcmc']['n_ok']}/{s['mcmc']['n']} galaxies, "
        f"{s['mcmc']['time_per_galaxy_s'] or float('nan'):.1f} s per galaxy, max R-hat "
        f"{s['mcmc']['rhat_max'] or float('nan'):.3f}",
        "", "Figures: `figures/sbc.png`, `figures/coverage.png`, `figures/corner_galaxy*.png`, "
        "`figures/sed_galaxy*.png`.", "",
    ]
    return "\n".join(lines) + validation_markdown(s["calibration"]) + _verdict(s)


def _verdict(s: dict) -> str:
    """A plain statement of what the calibration and the MCMC check show, and why."""
    cal = s["calibration"]
    bad = [n for n, v in cal["sbc"].items() if not v["passed"]]
    out = ["", "## Verdict", ""]
    if not bad:
        out.append("SBC uniformity is not rejected for any parameter: the amortized posteriors "
                   "are calibrated at this size.")
    else:
        over = [n for n in bad if cal["coverage_95"][n] < 0.95 - 2 * np.sqrt(0.05 * 0.95 /
                                                                           max(cal["n_used"], 1))]
        under = [n for n in bad if n not in over]
        cfg = s["config"]
        out.append(f"SBC uniformity is rejected (alpha = {cal['alpha']}) for {len(bad)} of "
                   f"{len(cal['sbc'])} parameters: {', '.join(bad)}.")
        if over:
            out.append(f"Over-confident (95 % coverage below nominal): {', '.join(over)}.")
        if under:
            out.append(f"Biased or under-confident ranks: {', '.join(under)}.")
        out.append(f"Why: this {s['size']} run trains a {cfg['blocks']}-block x {cfg['hidden']} "
                   f"flow on {s['training_set']['n_kept']:,} galaxies for at most "
                   f"{cfg['max_epochs']} epochs (stopped at {s['training']['epochs']}, "
                   f"early stop {s['training']['stopped_early']}) -- sized for a 2-core CPU in "
                   "minutes, not for calibration; SEDflow trains 15 x 500 on ~10^6 galaxies to "
                   "convergence (`--size paper`, on a GPU). Narrow posteriors that miss the truth "
                   "too often are the signature of an under-trained flow.")
    r = s["mcmc"].get("rhat_max")
    if r is not None and r > 1.01:
        out.append(f"The NUTS check is short (R-hat max {r:.2f} > 1.01): an illustration of the "
                   "comparison, not a converged reference; `--size paper` runs 4 chains x 1000 "
                   "draws after 1000 warm-up steps.")
    return "\n".join(out) + "\n"
