"""Calibration of an amortized posterior on fresh mock galaxies (SEDflow's p-p / SBC test).

``validate_posterior`` draws ``n_test`` new galaxies from the prior (through the same noise model
as the training set), samples the posterior of each, and tests in the flow's 11-dim sampling
space whether the ranks of the truths are uniform (SBC) and whether credible intervals cover the
truth at their nominal rate. It writes figures, ``validation.json`` and ``validation.md``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from ..io import catalog as C
from ..io.mocks import mock_catalog, mock_truths
from ..sed.model import load_model
from ..sed.params import SAMPLING_NAMES
from ..sim.layout import to_conditioning
from ..util import as_key
from . import diagnostics as D


class ValidationResult(NamedTuple):
    """ranks (n, 11); sbc: dict of per-parameter chi2 / KS p-values; levels, coverage (L, 11);
    summary: JSON-ready dict; truths (n, 11) and samples (n, m, 11) in the sampling space."""

    ranks: np.ndarray
    sbc: dict
    levels: np.ndarray
    coverage: np.ndarray
    summary: dict
    truths: np.ndarray
    samples: np.ndarray


def validate_posterior(posterior, key, n_test: int = 1000, n_samples: int = 500, *, model=None,
                       out=None, alpha: float = 0.01, catalog=None) -> ValidationResult:
    """SBC ranks, uniformity p-values and coverage of ``posterior`` on ``n_test`` mock galaxies.

    A parameter "passes" when its chi-square and KS uniformity p-values are both >= ``alpha``.
    ``catalog``: optionally a mock catalog (with truths) to use instead of drawing one.
    """
    key = as_key(key)
    k_cat, k_post = jax.random.split(key)
    if model is None:
        model = load_model(filters=list(posterior.bands), z_max=posterior.prior.zmax)
    t0 = time.perf_counter()
    cat = catalog if catalog is not None else mock_catalog(
        k_cat, n_test, model=model, prior=posterior.prior)
    ph = C.read_photometry(cat, posterior.bands)
    x = to_conditioning(ph.flux, ph.sigma, ph.z)
    _, truth = mock_truths(cat)
    t1 = time.perf_counter()
    s = posterior.sample_batched(k_post, x, n_samples)
    t_sample = time.perf_counter() - t1
    full = s.n_accepted == n_samples  # galaxies whose posterior could not be filled are reported
    ranks = D.sbc_ranks(truth[full], s.s[full])
    sbc = D.sbc_uniformity(ranks, n_samples)
    levels, cov = D.coverage(truth[full], s.s[full])
    names = list(SAMPLING_NAMES)
    passed = (np.asarray(sbc["chi2_pvalue"]) >= alpha) & (np.asarray(sbc["ks_pvalue"]) >= alpha)
    summary = {
        "n_test": int(len(cat)), "n_samples": int(n_samples), "n_used": int(full.sum()),
        "n_low_acceptance": int(s.low_acceptance.sum()), "n_ood": int(s.ood.sum()),
        "mean_acceptance": float(np.mean(s.acceptance)),
        "alpha": alpha,
        "sbc": {n: {"chi2_pvalue": float(sbc["chi2_pvalue"][i]),
                    "ks_pvalue": float(sbc["ks_pvalue"][i]), "passed": bool(passed[i])}
                for i, n in enumerate(names)},
        "coverage_68": {n: float(np.interp(0.68, levels, cov[:, i])) for i, n in enumerate(names)},
        "coverage_95": {n: float(np.interp(0.95, levels, cov[:, i])) for i, n in enumerate(names)},
        "all_passed": bool(passed.all()),
        "timing_s": {"mock_catalog": t1 - t0, "sampling": t_sample,
                     "galaxies_per_s": len(cat) / t_sample},
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        D.plot_sbc(ranks, names, out / "sbc.png", m=n_samples)
        D.plot_coverage(levels, cov, names, out / "coverage.png", n=int(full.sum()))
        (out / "validation.json").write_text(json.dumps(summary, indent=2))
        (out / "validation.md").write_text(validation_markdown(summary))
    return ValidationResult(ranks, sbc, levels, cov, summary, truth, s.s)


def validation_markdown(summary: dict) -> str:
    lines = [f"# Posterior calibration on {summary['n_test']} mock galaxies",
             "",
             f"{summary['n_samples']} posterior samples per galaxy; mean acceptance "
             f"{summary['mean_acceptance']:.3f}; {summary['n_low_acceptance']} galaxies with low "
             f"acceptance, {summary['n_ood']} out of the training support.",
             "",
             "| parameter | SBC chi2 p | SBC KS p | 68% coverage | 95% coverage | uniform? |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, v in summary["sbc"].items():
        lines.append(f"| {name} | {v['chi2_pvalue']:.3g} | {v['ks_pvalue']:.3g} | "
                     f"{summary['coverage_68'][name]:.3f} | {summary['coverage_95'][name]:.3f} | "
                     f"{'yes' if v['passed'] else '**no**'} |")
    lines += ["", f"Uniformity not rejected (alpha = {summary['alpha']}) for all parameters: "
              f"**{summary['all_passed']}**."]
    return "\n".join(lines) + "\n"
