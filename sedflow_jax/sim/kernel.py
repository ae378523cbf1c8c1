"""The jitted block kernel of :func:`sedflow_jax.sim.simulate.simulate` and its drop flags.

Block ``b`` of a training set is computed from ``jax.random.fold_in(key, b)`` by one compiled
function of fixed shape (:func:`simulate_block`), so a row depends only on (key, block, row in
block). :class:`BlockRunner` keeps the device busy: it dispatches the blocks of the next shard
before the host writes the current one.
"""
from __future__ import annotations

import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import parallel
from . import noise as noise_mod
from . import prior as prior_mod
from .layout import to_conditioning

__all__ = ["DROP_REASONS", "DROP_BITS", "keep_mask", "count_flags", "Block", "simulate_block",
           "BlockRunner"]

#: drop reasons in priority order; bit i of ``flags`` is reason i
DROP_REASONS = (
    "model_flux_invalid",
    "sigma_nonpositive",
    "out_of_range",
    "noisy_flux_nonpositive",
    "x_nonfinite",
)
#: reason -> its bit in ``flags``
DROP_BITS = {r: 1 << i for i, r in enumerate(DROP_REASONS)}


def keep_mask(range_cut: bool) -> int:
    """The bits of ``flags`` that drop a row (``out_of_range`` only with ``range_cut``)."""
    m = 0
    for r in DROP_REASONS:
        if r == "out_of_range" and not range_cut:
            continue
        m |= DROP_BITS[r]
    return m


def count_flags(flags: np.ndarray, keep: np.ndarray, keep_bits: int) -> dict:
    """Per-row flags -> counts: ``dropped`` by first *active* reason, ``flagged`` overlapping."""
    flags = np.asarray(flags, np.uint8)
    flagged = {r: int(np.count_nonzero(flags & DROP_BITS[r])) for r in DROP_REASONS}
    dropped = {}
    rest = ~np.asarray(keep, bool)
    for r in DROP_REASONS:
        hit = rest & ((flags & (DROP_BITS[r] & keep_bits)) != 0)
        dropped[r] = int(np.count_nonzero(hit))
        rest = rest & ~hit
    return {"n_rows": int(flags.size), "n_kept": int(np.count_nonzero(keep)),
            "n_dropped": int(flags.size - np.count_nonzero(keep)),
            "dropped": dropped, "flagged": flagged}


class Block(NamedTuple):
    """The rows of one block, as :func:`simulate_block` returns them."""

    theta_s: Any  # (B, 11)
    theta: Any  # (B, 12)
    z: Any  # (B,)
    x: Any  # (B, 2 nb + 1)
    flags: Any  # (B,) uint8
    flux_model: Any  # (B, nb)
    flux: Any  # (B, nb)
    sigma: Any  # (B, nb)


@functools.partial(jax.jit, static_argnames=("phot", "prior", "block", "key_impl"))
def simulate_block(key_data, b, tables, noise, *, phot, prior, block, key_impl):
    """Rows of block ``b``: every output depends only on (key, b, row within the block)."""
    key = jax.random.wrap_key_data(key_data, impl=key_impl)
    kb = jax.random.fold_in(key, b)
    k_theta, k_z, k_noise = jax.random.split(kb, 3)
    s = prior_mod.sample_sampling(k_theta, prior, block)
    theta = prior_mod.from_sampling(s)
    z = prior_mod.sample_redshift(k_z, prior, block)
    f = phot(theta, z, tables)
    noisy = noise_mod.add_noise(k_noise, noise, f, range_cut=False)
    fhat, sig = noisy.flux, noisy.sigma
    pos = fhat > 0
    x = to_conditioning(fhat, sig, z, xp=jnp)

    model_ok = (jnp.all(jnp.isfinite(f) & (f > 0), axis=-1) & jnp.isfinite(z)
                & jnp.all(jnp.isfinite(theta), axis=-1))
    conds = (
        ~model_ok,
        ~noisy.sigma_ok,
        ~noisy.in_range,
        ~jnp.all(pos, axis=-1),
        ~jnp.all(jnp.isfinite(x), axis=-1),
    )
    flags = jnp.zeros((block,), jnp.uint8)
    for i, c in enumerate(conds):
        flags = flags | (c.astype(jnp.uint8) << i)
    return Block(s, theta, z, x, flags, f, fhat, sig)


class BlockRunner:
    """Computes planned shards (dicts with ``row_start/row_stop/block_start/block_stop``) block
    by block, optionally splitting the photometry over a mesh of this process's devices."""

    def __init__(self, model, prior, noise, key_data, key_impl, block: int, mesh=None):
        kd = jnp.asarray(key_data)
        phot, tables, noise_arg = model.phot_batch, model.tables, noise
        if mesh is not None:  # photometry split over the mesh; inputs replicated on it
            phot = parallel.sharded_phot_fn(model, mesh)
            kd, tables, noise_arg = parallel.replicate((kd, tables, noise), mesh)
        self.args = (kd, tables, noise_arg)
        self.statics = dict(phot=phot, prior=prior, block=block, key_impl=key_impl)
        self.block = block
        #: seconds of the first (compiling) block of :meth:`shards`, None before it ran
        self.first_block_s = None

    def call(self, b: int):
        kd, tables, noise_arg = self.args
        return simulate_block(kd, np.uint32(b), tables, noise_arg, **self.statics)

    def dispatch(self, p: dict, first=None) -> list:
        """Start every block of shard ``p`` (asynchronously; ``first`` is its first, done)."""
        outs = [] if first is None else [first]
        for b in range(p["block_start"] + len(outs), p["block_stop"]):
            outs.append(self.call(b))
        return outs

    def gather(self, p: dict, outs: list) -> dict:
        """Field -> host array of shard ``p``'s rows (the last block trimmed)."""
        host = jax.device_get(outs)
        cat = {f: np.concatenate([getattr(h, f) for h in host]) for f in Block._fields}
        off = p["row_start"] - p["block_start"] * self.block
        m = p["row_stop"] - p["row_start"]
        return {k: v[off:off + m] for k, v in cat.items()}

    def shards(self, todo: list):
        """Yield ``(p, arrays, compute seconds)`` for each shard of ``todo`` in order, the next
        shard's blocks already dispatched while the caller handles this one."""
        if not todo:
            return
        # the first block alone, synchronously: its time is mostly compilation
        t0 = time.perf_counter()
        first = jax.block_until_ready(self.call(todo[0]["block_start"]))
        self.first_block_s = time.perf_counter() - t0
        pending = self.dispatch(todo[0], first)
        for j, p in enumerate(todo):
            t0 = time.perf_counter()
            arrs = self.gather(p, pending)
            # keep the device busy while the host writes this shard
            pending = self.dispatch(todo[j + 1]) if j + 1 < len(todo) else None
            yield p, arrs, time.perf_counter() - t0
