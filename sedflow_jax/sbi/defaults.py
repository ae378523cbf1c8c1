"""Use without training: the shipped amortized posteriors, found by name or by a catalog's bands.

The package ships trained models in ``sedflow_jax/data/posteriors/<name>/`` (each a saved
:class:`~sedflow_jax.sbi.posterior.AmortizedPosterior`: ``posterior.json`` + checkpoint):
``sdss_ugriz`` (SDSS u g r i z) and ``galex_sdss`` (GALEX FUV NUV + SDSS u g r i z). The
environment variable ``SEDFLOW_JAX_POSTERIORS`` (or ``registry=``) points at another folder of
model folders instead.

Choice rule of :func:`default_posterior` (and so of ``load_posterior(bands=...)`` and of
``sedflow-jax infer`` without ``--model``): a model matches when the catalog provides every one
of its bands; among matches the one using the most bands wins (ties: :data:`PREFERRED` order,
then name). So a u g r i z catalog gets ``sdss_ugriz``, one that also has FUV and NUV gets
``galex_sdss``; one with FUV but no NUV gets ``sdss_ugriz``. Rows missing a band are the
mask-aware model's business (the band is masked), not the choice's.
"""
from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

from ..io.catalog import canonical_band
from .posterior import AmortizedPosterior

__all__ = ["ENV_VAR", "PREFERRED", "PosteriorNotFound", "available_posteriors",
           "default_posterior", "load_posterior", "posterior_registry"]

#: environment variable naming a folder of model folders used instead of the shipped ones
ENV_VAR = "SEDFLOW_JAX_POSTERIORS"
#: tie-break order of the shipped models (equal numbers of matching bands)
PREFERRED = ("galex_sdss", "sdss_ugriz")


class PosteriorNotFound(ValueError):
    """No model of that name or path, or none matching the bands (one line, lists those
    available)."""


def posterior_registry(registry=None) -> Path:
    """The folder holding model folders: ``registry``, else ``$SEDFLOW_JAX_POSTERIORS``, else the
    shipped ``sedflow_jax/data/posteriors`` (found with importlib.resources)."""
    if registry is not None:
        return Path(registry)
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    return Path(str(resources.files("sedflow_jax") / "data" / "posteriors"))


def available_posteriors(registry=None) -> dict:
    """{name: bands} of the model folders in the registry (those with a readable
    ``posterior.json``), sorted by name; {} when there are none."""
    root = posterior_registry(registry)
    out = {}
    if not root.is_dir():
        return out
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            info = json.loads((d / "posterior.json").read_text())
            out[d.name] = tuple(info["bands"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


def _listing(models: dict) -> str:
    return "; ".join(f"{k} ({','.join(v)})" for k, v in models.items()) or "none installed"


def default_posterior(bands, registry=None) -> str:
    """The name of the model for a catalog providing ``bands`` (model or short names: ``u``,
    ``FUV``): the module's choice rule. :class:`PosteriorNotFound` lists the models when none
    matches."""
    have = {canonical_band(b) for b in bands}
    models = available_posteriors(registry)
    match = [k for k, v in models.items() if set(v) <= have]
    if not match:
        where = posterior_registry(registry)
        raise PosteriorNotFound(
            f"no shipped posterior matches the catalog's bands {sorted(have) or 'none'} "
            f"(available in {where}: {_listing(models)}); give a model (--model PATH)")
    rank = {k: i for i, k in enumerate(PREFERRED)}
    return sorted(match, key=lambda k: (-len(models[k]), rank.get(k, len(rank)), k))[0]


def load_posterior(name_or_path=None, bands=None, *, registry=None) -> AmortizedPosterior:
    """An :class:`~sedflow_jax.sbi.posterior.AmortizedPosterior` ready to use.

    name_or_path : a model folder (``AmortizedPosterior.load``), or the name of a shipped model
        (``'sdss_ugriz'``, ``'galex_sdss'``: ``sedflow_jax/data/posteriors/<name>``), or None:
        the shipped model whose bands best match ``bands`` (the module's choice rule).
    bands : the bands a catalog provides (with name_or_path None), e.g.
        :func:`sedflow_jax.io.catalog.catalog_bands` of it.
    registry : a folder of model folders instead of the shipped one (also
        ``$SEDFLOW_JAX_POSTERIORS``).
    Raises :class:`PosteriorNotFound` (a ValueError) naming the models available.
    """
    if name_or_path is None:
        if bands is None:
            raise PosteriorNotFound("give a model name or path, or the catalog's bands "
                                    f"(available: {_listing(available_posteriors(registry))})")
        name_or_path = default_posterior(bands, registry)
    p = Path(name_or_path)
    if p.is_dir():
        return AmortizedPosterior.load(p)
    folder = posterior_registry(registry) / str(name_or_path)
    if os.sep not in str(name_or_path) and (folder / "posterior.json").is_file():
        return AmortizedPosterior.load(folder)
    raise PosteriorNotFound(f"{name_or_path}: neither a model folder nor a shipped model "
                            f"(available: {_listing(available_posteriors(registry))})")
