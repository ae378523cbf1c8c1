"""Posterior draws with the prior-support rejection, keyed by global catalog row.

:func:`reject_to_box` is the one rejection loop: draws outside the prior box are redrawn with
fresh keys for up to ``max_rounds`` rounds; galaxies still short are NaN-padded and flagged
``low_acceptance``. :class:`RowSampler` draws for catalog row ``g`` in round ``r`` with the key
``fold_in(fold_in(key, r), g)``, so a galaxy's draws depend only on (key, g): not on the other
rows of the call, on chunking, devices or hosts.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from .. import parallel
from ..sim import prior as prior_mod
from ..util import as_key

__all__ = ["LOW_ACCEPTANCE", "Samples", "RowSampler", "reject_to_box", "sample_rows"]


#: acceptance below this is flagged (the posterior sits mostly outside the prior box)
LOW_ACCEPTANCE = 0.01

#: draws a compiled sampling call holds at least (smaller calls are padded up to it)
MIN_GROUP_DRAWS = 4096


class Samples(NamedTuple):
    """Posterior draws of one galaxy (or many: a leading axis m).

    theta : (..., n, 12) PROVABGS parameters; s : (..., n, 11) sampling space; rows that could not
    be filled (acceptance too low within ``max_rounds``) are NaN.
    acceptance : (...,) fraction of flow draws inside the prior support.
    n_accepted : (...,) filled rows; low_acceptance, ood : (...,) flags.
    """

    theta: np.ndarray
    s: np.ndarray
    acceptance: np.ndarray
    n_accepted: np.ndarray
    low_acceptance: np.ndarray
    ood: np.ndarray

    def draws(self, i=None):
        """The filled draws of galaxy ``i`` (or of a single-galaxy Samples when None), NaN
        rows dropped: ``(s (k, 11), theta (k, 12))``, k <= n."""
        s, theta = (self.s, self.theta) if i is None else (self.s[i], self.theta[i])
        s, theta = np.asarray(s), np.asarray(theta)
        ok = np.isfinite(s).all(-1) & np.isfinite(theta).all(-1)
        return s[ok], theta[ok]


#: flow draws evaluated together inside a compiled sampling call on a CPU (on 2 cores the
#: shipped 5 x 128 flow, inverted incrementally, draws 1.6e5/s in blocks of 16,384, 1.5e5/s in
#: blocks of 8,192 and 0.9e5/s in blocks of 4,096 or 32,768: benchmarks/bench_flow_sampling.py);
#: an accelerator evaluates a call's rows at once
BLOCK_DRAWS = 16384


def _rows_per_block(n: int, backend: str) -> int | None:
    """Rows evaluated together for ``n`` draws each: a power of two, ~:data:`BLOCK_DRAWS` draws
    (None: all the call's rows at once)."""
    if backend != "cpu":
        return None
    return 1 << (max(1, BLOCK_DRAWS // max(n, 1)).bit_length() - 1)


def _block_for(rows: int, block: int | None) -> int | None:
    """The block that divides a call of ``rows`` rows (one copy of the flow in the compiled
    program, no remainder): the largest power of two <= ``block`` dividing ``rows``."""
    if block is None or rows <= block:
        return None
    b = block
    while rows % b:
        b //= 2
    return b


@functools.lru_cache(maxsize=16)
def _sample_fn(graphdef, n: int, sampler: str, mesh):
    block = _rows_per_block(n, jax.default_backend())

    def body(state, key, idx, xs):
        flow = nnx.merge(graphdef, state)

        def one(a):
            return flow.sample(jax.random.fold_in(key, a[0]), a[1], n, sampler=sampler)

        b = _block_for(idx.shape[0], block)
        if b is None:
            return jax.vmap(one)((idx, xs))
        # on a CPU a few rows at a time: the activations of ~BLOCK_DRAWS draws stay in cache
        return jax.lax.map(one, (idx, xs), batch_size=b)

    if mesh is None:
        return jax.jit(body)
    spec = parallel.row_spec(mesh)
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), spec, spec),
                                 out_specs=spec, check_vma=False))


class RowSampler:
    """Flow draws for rows ``idx`` with key ``fold_in(key, idx[j])`` (as flow.sample_batched
    does for position j), optionally over a mesh. Calls run groups of at most ``max_rows // n``
    galaxies (memory: rows x draws), a multiple of the device count; a call with fewer rows
    runs one group padded only to the next power of two (a bounded number of compiled shapes,
    and a small call is not padded up to a full group)."""

    def __init__(self, flow, n: int, *, mesh=None, max_rows: int = 65536,
                 sampler: str = "prefix"):
        self.n, self.mesh, self.d = int(n), mesh, flow.config.d_theta
        self.ndev = 1 if mesh is None else parallel.mesh_size(mesh, local=True)
        graphdef, state = nnx.split(flow)
        self.state = state if mesh is None else parallel.replicate(state, mesh)
        self.fn = _sample_fn(graphdef, self.n, sampler, mesh)
        g = max(1, int(max_rows) // max(self.n, 1))
        block = _rows_per_block(self.n, jax.default_backend()) or 1
        if g > block:  # whole blocks per device (the compiled call has no remainder)
            g = max(block, g // (block * self.ndev) * block * self.ndev)
        self.group = math.ceil(g / self.ndev) * self.ndev

    def group_for(self, m: int) -> int:
        """Galaxies per compiled call for a call of m rows: the next power of two, at least
        :data:`MIN_GROUP_DRAWS` draws' worth (cheap to run; fewer shapes to compile), at most
        the memory-bounded group."""
        g = max(1 << max(0, int(m) - 1).bit_length(),
                1 << max(0, MIN_GROUP_DRAWS // max(self.n, 1) - 1).bit_length())
        return math.ceil(min(self.group, g) / self.ndev) * self.ndev

    def from_sampling(self, s_out):
        """theta of sampling-space draws (m, n, 11), evaluated in padded groups (a bounded
        number of compilations whatever m is)."""
        m = s_out.shape[0]
        group = self.group_for(m)
        step = group * max(1, 4096 // max(group * self.n, 1))
        padded, _ = parallel.pad_rows(np.nan_to_num(s_out), max(1, math.ceil(m / step)) * step)
        theta = np.concatenate([np.asarray(prior_mod.from_sampling(jnp.asarray(
            padded[i:i + step]))) for i in range(0, padded.shape[0], step)])[:m]
        return np.where(np.isnan(s_out[..., :1]), np.nan, theta)

    def __call__(self, key, idx, xs) -> np.ndarray:
        idx = np.asarray(idx, np.uint32)
        xs = np.asarray(xs, np.float32)
        m = idx.shape[0]
        out = np.empty((m, self.n, self.d), np.float32)
        key = key if self.mesh is None else parallel.replicate(key, self.mesh)
        group = self.group_for(m)
        pending = []  # dispatch every group first (asynchronous), then collect
        for s in range(0, m, group):
            e = min(m, s + group)
            ii, _ = parallel.pad_rows(idx[s:e], group)
            xx, _ = parallel.pad_rows(xs[s:e], group)
            if self.mesh is not None:
                sh = NamedSharding(self.mesh, parallel.row_spec(self.mesh))
                ii, xx = parallel.place(ii, sh), parallel.place(xx, sh)
            pending.append((s, e, self.fn(self.state, key, ii, xx)))
        for s, e, r in pending:
            out[s:e] = np.asarray(jax.device_get(r))[: e - s]
        return out


def _empty_samples(n: int, d: int) -> Samples:
    z0 = np.zeros(0)
    return Samples(theta=np.zeros((0, n, prior_mod.N_PARAMS), np.float32),
                   s=np.zeros((0, n, d), np.float32), acceptance=z0,
                   n_accepted=z0.astype(np.int64), low_acceptance=z0.astype(bool),
                   ood=z0.astype(bool))


def _check_rows(rows, m: int) -> np.ndarray:
    rows = np.asarray(rows, np.int64)
    if rows.shape != (m,):
        raise ValueError(f"rows must have shape ({m},), got {rows.shape}")
    if rows.size and (rows.min() < 0 or rows.max() >= 2 ** 32):
        raise ValueError("rows must be in [0, 2**32)")
    return rows


def reject_to_box(posterior, sampler: RowSampler, key, xs, rows, n: int, max_rounds: int, *,
                  mask=None) -> Samples:
    """The one prior-support rejection loop (``sample_batched``, ``sample_rows``, catalog
    inference): ``n`` draws per context, draws outside the prior box redrawn for up to
    ``max_rounds`` rounds (round r, row g: key ``fold_in(fold_in(key, r), g)``); galaxies still
    short are NaN-padded and flagged ``low_acceptance``. Non-finite contexts are not sampled.

    xs : (m, 2 nb + 1) [mags, sigma_mags, z] (a plain posterior's own context otherwise);
    mask : (m, nb) bool band mask (True = used) of a mask-aware posterior (None: every band).
    """
    xs = np.atleast_2d(np.asarray(xs, np.float32))
    rows = _check_rows(rows, xs.shape[0])
    m, d = xs.shape[0], posterior.flow.config.d_theta
    if m == 0:
        return _empty_samples(n, d)
    ctx, ood = posterior.context(xs, mask)
    todo = np.flatnonzero(np.isfinite(ctx).all(1))
    lo, hi = (np.asarray(a, np.float32) for a in prior_mod.sampling_bounds(posterior.prior))
    s_out = np.full((m, n, d), np.nan, np.float32)
    filled, drawn, inside = (np.zeros(m, np.int64) for _ in range(3))
    for r in range(max_rounds):
        if todo.size == 0:
            break
        draws = posterior.flow_to_sampling(sampler(jax.random.fold_in(key, r), rows[todo],
                                                   ctx[todo]))
        # prior_mod.in_support in numpy (closed box, NaN outside): no shape-dependent compiles
        ok = np.all((draws >= lo) & (draws <= hi), axis=-1)
        drawn[todo] += n
        inside[todo] += ok.sum(1)
        slot = np.cumsum(ok, axis=1) - 1 + filled[todo][:, None]  # first accepted in order
        sel = ok & (slot < n)
        gi, ji = np.nonzero(sel)
        s_out[todo[gi], slot[gi, ji]] = draws[gi, ji]
        filled[todo] += sel.sum(1)
        todo = todo[filled[todo] < n]
    acc = np.where(drawn > 0, inside / np.maximum(drawn, 1), 0.0)
    return Samples(theta=sampler.from_sampling(s_out), s=s_out, acceptance=acc,
                   n_accepted=filled, low_acceptance=(acc < LOW_ACCEPTANCE) | (filled < n),
                   ood=ood)


def sample_rows(posterior, key, xs, rows, n: int, *, mesh=None, max_rounds: int = 20,
                max_rows: int = 65536, sampler: str = "prefix", mask=None):
    """``n`` posterior draws for each context ``xs[j]`` ((m, d_x)) identified by its global
    catalog row ``rows[j]`` (unique ints), with the prior-support rejection of
    :func:`reject_to_box` (``mask``: band masks of a mask-aware posterior).

    Row ``g`` in rejection round ``r`` uses the key ``fold_in(fold_in(key, r), g)``, so a
    galaxy's draws depend only on (key, g): not on which other rows share the call, on the
    chunking, on ``mesh`` (devices used to split the rows) or on ``max_rows``.
    :meth:`~sedflow_jax.sbi.posterior.AmortizedPosterior.sample_batched` is this with
    ``rows = arange(m)``. Returns :class:`Samples`.
    """
    smp = RowSampler(posterior.flow, n, mesh=mesh, max_rows=max_rows, sampler=sampler)
    return reject_to_box(posterior, smp, as_key(key), xs, rows, int(n), int(max_rounds),
                         mask=mask)
