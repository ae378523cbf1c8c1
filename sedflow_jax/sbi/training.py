"""Training an amortized posterior (SEDflow's conditional MAF) on a training set."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from .. import parallel
from ..nn import flow as F
from ..nn import train as T
from ..nn.data import ArrayData
from ..sim import prior as P
from ..sim.readers import ShardDataset
from .masks import BandDropout, TrainingSupport, normalize_group_drop
from .posterior import THETA_SPACES, AmortizedPosterior, LogitTheta, prior_from_dict

__all__ = ["train_posterior"]


def _grid_size(grid, n_rows: int) -> int:
    if grid is not None:
        return int(grid)
    return int(np.clip(np.sqrt(max(n_rows, 1)) / 6, 8, 24))


def train_posterior(data, out=None, *, flow_config: F.FlowConfig | None = None,
                    train_config=None, seed: int = 0, prior: P.Prior | None = None,
                    bands=None, resume: bool = False, band_dropout: float | None = None,
                    min_bands: int = 2, support_grid: int | None = None, mesh=None, devices=None,
                    theta_space: str = "box", group_drop: dict | None = None,
                    callback=None) -> tuple[AmortizedPosterior, object]:
    """Train SEDflow's flow on a training set and bundle it as an :class:`AmortizedPosterior`.

    data : a training-set folder written by :func:`sedflow_jax.simulation.simulate` (streamed
        from disk, kept rows only; prior and bands read from its manifest), or a dict with
        'theta' (n, 11) sampling-space targets and 'x' (n, d_x) plus ``prior`` and ``bands``.
    out : folder for the checkpoint, ``posterior.json`` and ``loss.png`` (None: not saved).
    band_dropout : None (default: a plain flow on x) or p in (0, 1]: a *mask-aware* flow
        conditioned on (x with masked bands filled, band mask), trained with random band
        dropout (:class:`sedflow_jax.masking.BandDropout`: with probability p a row loses 1 to
        n_bands - ``min_bands`` random bands, fresh every epoch). Its context has 3 nb + 1
        columns; use ``sample_batched(..., mask=...)``.
    group_drop : with ``band_dropout``: band groups missing together in a fraction of rows,
        ``{name: (bands, p)}`` with bands as indices or names, e.g. ``{"galex": (("galex_fuv",
        "galex_nuv"), 0.6)}`` (:class:`sedflow_jax.sbi.masks.BandDropout`); recorded in the
        posterior's ``meta['band_mask']['group_drop']``.
    callback : optional ``callback(epoch, train_loss, val_loss)`` after each epoch, returning True
        to stop (e.g. a wall-clock cap; see :func:`sedflow_jax.nn.train.fit`).
    theta_space : 'box' (default, SEDflow: the flow models the 11 sampling-space coordinates and
        draws outside the prior box are rejected) or 'logit' (the flow models
        logit((s - low) / (high - low)): every draw lies inside the box, acceptance is 1, and the
        flat priors' hard edges become smooth densities; see :func:`box_to_logit`).
    support_grid : cells per axis of the recorded training support in (mag, log sigma_mag)
        (default: sqrt(n_rows) / 6 clipped to [8, 24], so small training sets are not sparse).
    mesh : optional ``jax.sharding.Mesh`` for data-parallel training (see
        :func:`sedflow_jax.train.fit`); ``devices`` builds one instead: an int k (the first k
        local devices), ``'all'`` (every local device) or ``'global'`` (every device of a
        ``jax.distributed`` job); 1 means no mesh. Equal to one-device training at the same
        batch size up to float rounding.
    Returns (posterior, TrainResult).
    """
    if theta_space not in THETA_SPACES:
        raise ValueError(f"theta_space must be one of {THETA_SPACES}, got {theta_space!r}")
    if group_drop and band_dropout is None:
        raise ValueError("group_drop needs band_dropout (a mask-aware posterior)")
    if isinstance(data, (str, os.PathLike)):
        source, prior, bands, lo, hi, support, x_mean = _folder_source(data, support_grid)
    else:
        if prior is None or bands is None:
            raise ValueError("in-memory data needs prior= and bands=")
        source, lo, hi, support, x_mean = _array_source(data, bands, support_grid)
    if theta_space == "logit":
        source = LogitTheta(source, *P.sampling_bounds(prior))
    meta_mask = None
    if band_dropout is not None:
        source, meta_mask = _with_dropout(source, x_mean, bands, band_dropout, min_bands, seed,
                                          group_drop)
    fc = flow_config or F.FlowConfig.small(source.d_theta, source.d_context, seed=seed)
    tc = train_config or T.TrainConfig(seed=seed)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        tc = dataclasses.replace(tc, checkpoint_dir=str(Path(out) / "training"))
    res = T.fit(seed, tc, fc, source,
                resume_from=(str(Path(out) / "training") if (resume and out) else None),
                mesh=_training_mesh(mesh, devices), callback=callback)
    post = AmortizedPosterior(flow=res.flow, prior=prior, bands=tuple(bands),
                              x_lo=np.asarray(lo, float), x_hi=np.asarray(hi, float),
                              meta={"best_epoch": res.best_epoch,
                                    "best_val_loss": float(res.best_val_loss),
                                    "n_train": res.n_train, "n_val": res.n_val,
                                    "stopped_early": bool(res.stopped_early),
                                    "flow_config": fc.to_dict(),
                                    "support": support.to_dict(),
                                    "theta_space": theta_space,
                                    **({"band_mask": meta_mask} if meta_mask else {})})
    if out is not None:
        post.save(out)
        T.plot_loss(res.history, Path(out) / "loss.png", best_epoch=res.best_epoch)
    return post, res


def _folder_source(folder, support_grid):
    """A training-set folder streamed from disk: (source, prior, bands, x_lo, x_hi, support,
    x_mean), the x range, support and mean accumulated shard by shard."""
    source = ShardDataset(folder)
    man = source.manifest
    prior = prior_from_dict(man["config"]["prior"])
    bands = tuple(man["bands"])
    lo = np.full(source.d_context, np.inf)
    hi = np.full(source.d_context, -np.inf)
    tot, cnt = np.zeros(source.d_context), 0
    for i in range(len(source.entries)):
        _, x = source.load_shard(i)
        lo, hi = np.minimum(lo, x.min(0)), np.maximum(hi, x.max(0))
        tot, cnt = tot + x.sum(0, dtype=np.float64), cnt + x.shape[0]
    support = TrainingSupport.empty(lo, hi, bands, n_grid=_grid_size(support_grid, cnt))
    for i in range(len(source.entries)):
        support.accumulate(source.load_shard(i)[1])
    return source, prior, bands, lo, hi, support, tot / max(cnt, 1)


def _array_source(data, bands, support_grid):
    """In-memory {'theta', 'x'}: (source, x_lo, x_hi, support, x_mean)."""
    source = ArrayData(data["theta"], data["x"])
    support = TrainingSupport.from_x(source.x, bands, n_grid=_grid_size(support_grid, source.n))
    return (source, source.x.min(0), source.x.max(0), support,
            source.x.mean(0, dtype=np.float64))


def _with_dropout(source, x_mean, bands, p_drop, min_bands, seed, group_drop=None):
    """``source`` with random band dropout, and the ``band_mask`` record of the posterior."""
    bands = tuple(bands)
    nb = len(bands)
    fill = np.asarray(x_mean[:2 * nb], np.float32)
    groups = normalize_group_drop(group_drop, bands) if group_drop else None
    source = BandDropout(source, fill, p_drop=p_drop, min_bands=min_bands, seed=seed,
                         group_drop=groups)
    rec = {"fill": fill.tolist(), "p_drop": float(p_drop), "min_bands": int(min_bands),
           "layout": "[mags', sigma_mags', z, mask]"}
    if groups:
        rec["group_drop"] = {k: {"bands": [bands[i] for i in idx], "indices": list(idx),
                                 "p": p} for k, (idx, p) in groups.items()}
    return source, rec


def _training_mesh(mesh, devices):
    if devices is None:
        return mesh
    if mesh is not None:
        raise ValueError("give mesh= or devices=, not both")
    if isinstance(devices, (int, np.integer)) and int(devices) == 1:
        return None
    return parallel.make_mesh(None if devices == "all" else devices)
