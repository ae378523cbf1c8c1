"""Starting points of the samplers: a MAP fit (Adam in the unconstrained space from the best of
many prior draws), balls around the MAP and the other distinct optima, prior draws, or given
points / posterior draws (e.g. the flow's)."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..util import as_key
from .compiled import COMPILED, evaluate_log_density, float_dtype, target_key
from .target import Target

__all__ = ["find_map", "initial_points"]


def _adam_fit(target: Target, steps: int, lr: float):
    """``fit(y0 (m, d), data) -> (best y (m, d), its loss (m,))``: ``steps`` Adam steps from each
    start, keeping the best point seen. One compiled step, looped on the host: a ``lax.scan``
    over the steps compiled ~4x longer (~11 s for the SED model) for a loop that runs < 1 s."""
    def build():
        tx = optax.adam(lr)

        def loss(y, data):
            x, _ = target.constrain(y)
            lp = target.log_density(x, data)
            return -jnp.where(jnp.isfinite(lp), lp, -1e30)

        vg = jax.vmap(jax.value_and_grad(loss), in_axes=(0, None))

        @jax.jit
        def step(carry, data):
            y, st, best_y, best_l = carry
            l, g = vg(y, data)
            g = jnp.where(jnp.isfinite(g), g, 0.0)
            better = l < best_l
            best_y = jnp.where(better[:, None], y, best_y)
            best_l = jnp.where(better, l, best_l)
            upd, st = tx.update(g, st, y)
            return optax.apply_updates(y, upd), st, best_y, best_l

        return tx, step

    # the step does not depend on the number of steps: one compiled step per (target, lr)
    tx, step = COMPILED.get(("adam", lr) + target_key(target), build)

    def fit(y0, data):
        carry = (y0, tx.init(y0), y0, jnp.full(y0.shape[:1], jnp.inf, y0.dtype))
        for _ in range(steps + 1):  # the last call only scores the end point
            carry = step(carry, data)
        return carry[2], carry[3]

    return fit


def find_map(key, target: Target, *, n_starts: int = 256, n_opt: int = 16, steps: int = 1000,
             lr: float = 0.05, return_all: bool = False):
    """MAP estimate by Adam in the unconstrained space (PROVABGS uses Nelder-Mead).

    ``n_starts`` prior draws are scored; the best ``n_opt`` are optimised for ``steps`` Adam
    steps (learning rate ``lr``, vmapped); returns ``(x_map (d,), log_density_map)``, or with
    ``return_all`` every optimised end point ``(x (n_opt, d), log_density (n_opt,))``, best
    first.
    """
    key = as_key(key)
    x0 = target.interior(target.sample_prior(key, n_starts))
    lp0 = evaluate_log_density(target, x0)
    order = np.argsort(-np.nan_to_num(lp0, nan=-np.inf))[:max(1, min(n_opt, n_starts))]
    y0 = jnp.asarray(target.unconstrain(x0[order]), float_dtype())
    y, loss = _adam_fit(target, int(steps), float(lr))(y0, target.data)
    y, loss = np.asarray(y), np.asarray(loss)
    lp = -np.where(np.isfinite(loss), loss, np.inf)
    if return_all:
        o = np.argsort(-lp)
        x = np.asarray(target.constrain(jnp.asarray(y[o]))[0], np.float64)
        return x, lp[o]
    i = int(np.argmax(lp))
    x = np.asarray(target.constrain(jnp.asarray(y[i]))[0], np.float64)
    return x, float(lp[i])


def _distinct_modes(target: Target, x, lp, dlp: float, tol: float = 0.05):
    """End points within ``dlp`` of the best log density, de-duplicated (distance < ``tol``
    prior-scale units in the box): (k, d), best first."""
    keep = []
    for xi, li in zip(x, lp):
        if not np.isfinite(li) or li < lp[0] - dlp:
            continue
        if all(np.max(np.abs(xi - xk) / target.scale()) > tol for xk in keep):
            keep.append(xi)
    return np.stack(keep) if keep else x[:1]


def initial_points(key, target: Target, n: int, init="optimize", *, ball: float = 1e-3,
                   map_kw: Optional[dict] = None, mode_dlp: float = 5.0):
    """``n`` starting points (n, d) inside the support, and a dict describing them.

    init : ``'optimize'`` -- balls of radius ``ball`` x prior std around the MAP
    (:func:`find_map`) and around every other distinct optimum found within ``mode_dlp`` of
    its log density (chains / walkers dealt to them in turn, best first: PROVABGS's start for a
    unimodal posterior, and every mode represented when the optimiser finds several; set
    ``mode_dlp=0`` for the MAP only), redrawn inside the support; ``'prior'`` -- prior draws;
    an array (m, d) -- starting points / posterior draws (e.g. the flow's): n rows are picked at random
    (without replacement when m >= n; used as given when m == n).
    """
    key = as_key(key)
    k1, k2 = jax.random.split(key)
    info = {}
    if isinstance(init, str):
        if init == "prior":
            x = target.sample_prior(k1, n)
            info["init"] = "prior"
        elif init == "optimize":
            xs, lps = find_map(k1, target, return_all=True, **(map_kw or {}))
            modes = _distinct_modes(target, xs, lps, mode_dlp)
            info.update(init="optimize", x_map=xs[0], log_density_map=float(lps[0]),
                        n_modes=int(len(modes)))
            x = _ball(k2, target, xs[0], n, ball)
            for j in range(1, len(modes)):
                sel = np.arange(n) % len(modes) == j
                if sel.any():
                    x[sel] = _ball(jax.random.fold_in(k2, j), target, modes[j], int(sel.sum()),
                                   ball)
        else:
            raise ValueError(f"init must be 'optimize', 'prior' or an array, got {init!r}")
    else:
        arr = np.asarray(init, np.float64)
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2 or arr.shape[1] != target.dim:
            raise ValueError(f"init array must have shape (m, {target.dim}), got {arr.shape}")
        good = arr[target.in_support(arr)]
        if good.shape[0] == 0:
            raise ValueError("no initial point lies inside the support")
        if good.shape[0] == n:
            x = good
        else:
            rng = np.random.default_rng(np.asarray(jax.random.key_data(k1)).ravel()[-1])
            idx = rng.choice(good.shape[0], size=n, replace=good.shape[0] < n)
            x = good[idx]
            if good.shape[0] < n:  # duplicates: jitter them apart
                x = x + 1e-6 * target.scale() * rng.standard_normal(x.shape)
        info["init"] = "samples"
    return target.interior(x), info


def _ball(key, target, centre, n, radius):
    centre = target.interior(centre)
    sc = target.scale() * radius
    out = np.empty((n, target.dim))
    filled = 0
    for t in range(50):
        key, k = jax.random.split(key)
        cand = centre + sc * np.asarray(jax.random.normal(k, (4 * n, target.dim)), np.float64)
        cand = cand[target.in_support(cand)]
        take = cand[: n - filled]
        out[filled:filled + len(take)] = take
        filled += len(take)
        if filled == n:
            break
    if filled < n:
        out[filled:] = centre
    return out

