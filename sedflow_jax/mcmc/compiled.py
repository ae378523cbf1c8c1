"""Compiled helpers kept for reuse across galaxies: a small LRU cache keyed by the target's
log-density function and box, the batched log density, JAX's current float dtype."""
from __future__ import annotations

from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np

from .target import Target

__all__ = ["LRUCache", "COMPILED", "target_key", "evaluate_log_density", "float_dtype"]


class LRUCache:
    """Least-recently-used cache of built values (compiled functions, samplers)."""

    def __init__(self, max_size: int):
        self.max_size = int(max_size)
        self._items: OrderedDict = OrderedDict()

    def get(self, key, build):
        """The value for ``key``, built by ``build()`` on a miss (unhashable keys: not kept)."""
        try:
            hash(key)
        except TypeError:
            return build()
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        val = build()
        self._items[key] = val
        while len(self._items) > self.max_size:
            self._items.popitem(last=False)
        return val

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


#: compiled helpers per (log_density fn, bounds): vmapped log density, Adam fit
COMPILED = LRUCache(16)


def float_dtype():
    """JAX's default float dtype now (float32, or float64 under ``jax_enable_x64``)."""
    return jnp.result_type(float)


def target_key(target: Target) -> tuple:
    """What identifies a target's compiled code: its log-density function and its box."""
    return (target.log_density, target.low.tobytes(), target.high.tobytes(), target.log_coords)


def _batched_log_density(target: Target):
    def build():
        return jax.jit(jax.vmap(target.log_density, in_axes=(0, None)))  # x: (EVAL_BLOCK, d)

    return COMPILED.get(("logp",) + target_key(target), build)


#: rows per compiled call of :func:`evaluate_log_density`: every number of points pads to whole
#: blocks of this size, so one program per target serves them all (the SED-model log density
#: takes seconds to compile; a program per array shape recompiled it for every new count)
EVAL_BLOCK = 256


def evaluate_log_density(target: Target, x, batch: int = EVAL_BLOCK) -> np.ndarray:
    """log density of points x (..., d) (numpy float64; -inf outside; batched jit, ``batch``
    rows per compiled call)."""
    x = np.asarray(x, np.float32)
    shape = x.shape[:-1]
    flat = x.reshape(-1, target.dim)
    n = flat.shape[0]
    if n == 0:
        return np.zeros(shape)
    b = int(batch)
    nb = -(-n // b)
    pad = np.concatenate([flat, np.repeat(flat[-1:], nb * b - n, axis=0)])
    f = _batched_log_density(target)
    out = [f(blk, target.data) for blk in pad.reshape(nb, b, target.dim)]  # dispatched async
    return np.concatenate([np.asarray(o) for o in out])[:n].astype(np.float64).reshape(shape)
