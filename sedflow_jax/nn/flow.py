"""Conditional masked autoregressive flows (MAF / autoregressive NSF) in Flax NNX + distrax.

This module knows arrays, not galaxies: ``theta`` is ``(n, d_theta)`` and the context ``x`` is
``(n, d_context)`` (or a single ``(d_context,)`` row broadcast over ``n``), all float32.

Architecture (SEDflow = sbi v0.17 ``posterior_nn('maf')`` = nflows v0.14, see
``shared/design/provabgs_model.md`` §9.4)::

    theta --zscore--> [MADE affine -> permutation] x n_blocks --> N(0, I)

* MADE: input degrees ``1..d``; hidden degrees ``(j mod (d-1)) + 1`` (as nflows, but *sorted*:
  a relabelling of hidden units, which changes nothing about the function class and makes the
  connectivity block-triangular, so sampling only computes the hidden units it needs);
  ``h0 = MaskedLinear(theta) + act(Linear(context))``, ``h = act(h0)``, then
  ``n_hidden_layers`` x [optional BatchNorm -> MaskedLinear(hidden, hidden) -> act], then a
  masked output layer giving, per dimension, ``(unconstrained scale, shift)``.
  Optionally (``output_context=True``, default in :meth:`FlowConfig.small`) the context also
  feeds the output layer directly; without it (nflows / the paper) the first dimension of every
  MADE is context-independent.
* Affine transform, density direction (data -> noise): ``y = x * s + b``, ``s = softplus(raw) +
  1e-3`` (nflows v0.14), ``log|det| = sum(log s)``; one pass.  Sampling direction: a loop over
  dimensions (``jax.lax.fori_loop`` of full passes in ``sampler='loop'``; in ``sampler='prefix'``,
  the default, an unrolled loop in which step i computes only the hidden units of degree i,
  :meth:`MADE.invert`: the flops of one masked pass per block, ~1.5x faster than recomputing
  the degree prefix at every step, benchmarks/bench_flow_sampling.py).
* z-scoring of theta and of the context with the training-split mean / unbiased std
  (floors 1e-14 for theta, 1e-7 for x, as sbi), stored in the model; the theta z-scoring's
  log-det is part of :func:`log_prob`.

distrax conventions: a bijector's *forward* is the sampling direction (noise -> data) and its
*inverse* the density direction (data -> noise).

Public API
----------
``FlowConfig``, ``ZScoreStats``, ``compute_stats``, ``Flow`` (an ``nnx.Module``),
``init_flow(key, config, theta_train, x_train)``, ``log_prob(flow, theta, x)``,
``sample(flow, key, x, n)``, ``sample_batched(flow, key, xs, n)``, ``bijector(flow, x)``,
``num_parameters(flow)``, and the bijectors ``MaskedAutoregressiveBijector`` and ``Permute``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Callable, NamedTuple, Sequence

import distrax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "FlowConfig",
    "ZScoreStats",
    "compute_stats",
    "Flow",
    "MADE",
    "MaskedAutoregressiveBijector",
    "Permute",
    "init_flow",
    "log_prob",
    "sample",
    "sample_batched",
    "bijector",
    "num_parameters",
]

THETA_STD_FLOOR = 1e-14
X_STD_FLOOR = 1e-7
AFFINE_EPS = 1e-3  # nflows v0.14 MaskedAffineAutoregressiveTransform._epsilon

_ACTIVATIONS: dict[str, Callable] = {
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "elu": jax.nn.elu,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
}


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FlowConfig:
    """Architecture of a conditional flow p(theta | x); JSON-serialisable (``to_dict``,
    ``from_dict``).

    Attributes:
        d_theta: dimension of theta (11 for SEDflow).
        d_context: dimension of the context x (11 for SEDflow: 5 mags, 5 sigmas, z).
        n_blocks: number of [autoregressive transform, permutation] blocks.
        hidden: hidden units per MADE layer.
        n_hidden_layers: hidden-to-hidden masked layers after the first hidden layer (nflows
            ``num_blocks``; sbi's MAF uses 2).
        activation: 'tanh' (nflows/sbi), 'relu', 'elu', 'gelu' or 'silu'.
        batch_norm: BatchNorm (eps 1e-3, momentum 0.1 in PyTorch terms) before each
            hidden-to-hidden layer, as nflows with ``use_batch_norm=True``.
        permutation: 'random' (sbi) or 'reverse' between blocks.
        flow_type: 'maf' (affine) or 'nsf' (autoregressive rational-quadratic splines).
        seed: seed of the random permutations and, when ``init_flow`` gets no key, the weights.
        output_context: also feed the context linearly into the MADE output layer (not in nflows).
        n_bins: spline bins (nsf only).
        tail_bound: spline interval [-tail_bound, tail_bound] in z-scored units, identity
            outside (nsf only).
    """

    d_theta: int
    d_context: int
    n_blocks: int = 5
    hidden: int = 128
    n_hidden_layers: int = 2
    activation: str = "tanh"
    batch_norm: bool = False
    permutation: str = "random"
    flow_type: str = "maf"
    seed: int = 0
    output_context: bool = True
    n_bins: int = 8
    tail_bound: float = 5.0

    def __post_init__(self):
        ints = ("d_theta", "d_context", "n_blocks", "hidden", "n_hidden_layers", "n_bins")
        for name in ints:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"FlowConfig.{name} must be an int, got {v!r}")
        for name in ("d_theta", "d_context", "n_blocks", "hidden", "n_bins"):
            if getattr(self, name) < 1:
                raise ValueError(f"FlowConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_hidden_layers < 0:
            raise ValueError(f"FlowConfig.n_hidden_layers must be >= 0, got {self.n_hidden_layers}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"FlowConfig.activation must be one of {sorted(_ACTIVATIONS)}, "
                             f"got {self.activation!r}")
        if self.permutation not in ("random", "reverse"):
            raise ValueError(f"FlowConfig.permutation must be 'random' or 'reverse', "
                             f"got {self.permutation!r}")
        if self.flow_type not in ("maf", "nsf"):
            raise ValueError(f"FlowConfig.flow_type must be 'maf' or 'nsf', got {self.flow_type!r}")
        if not self.tail_bound > 0:
            raise ValueError(f"FlowConfig.tail_bound must be > 0, got {self.tail_bound}")

    # presets -------------------------------------------------------------------------------
    @classmethod
    def paper(cls, d_theta: int = 11, d_context: int = 11, *, batch_norm: bool = True,
              seed: int = 0) -> "FlowConfig":
        """SEDflow's final model: sbi v0.17 MAF, 15 blocks x 500 units, 2 hidden layers, tanh,
        BatchNorm (its 7,890,330 parameters for d = 11 imply it), random permutations, no
        direct context-to-output connection (exactly the nflows MADE)."""
        return cls(d_theta=d_theta, d_context=d_context, n_blocks=15, hidden=500,
                   n_hidden_layers=2, activation="tanh", batch_norm=batch_norm,
                   permutation="random", flow_type="maf", seed=seed, output_context=False)

    @classmethod
    def small(cls, d_theta: int = 11, d_context: int = 11, *, seed: int = 0,
              **overrides: Any) -> "FlowConfig":
        """A small MAF that trains on 2 CPU cores in minutes: 5 blocks x 128 units, reversed
        order between blocks, context also fed to the output layer."""
        kw = dict(n_blocks=5, hidden=128, n_hidden_layers=2, activation="tanh",
                  batch_norm=False, permutation="reverse", flow_type="maf", output_context=True)
        kw.update(overrides)
        return cls(d_theta=d_theta, d_context=d_context, seed=seed, **kw)

    def differences(self, other: "FlowConfig", mine: str = "this", theirs: str = "other") -> list:
        """Human-readable fields where ``other`` differs: ``'hidden: this 64 vs other 128'``."""
        da, db = self.to_dict(), other.to_dict()
        return [f"{k}: {mine} {da[k]!r} vs {theirs} {db.get(k)!r}" for k in da if da[k] != db.get(k)]

    # serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "FlowConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown FlowConfig fields {sorted(unknown)}")
        return cls(**d)

    def replace(self, **kw) -> "FlowConfig":
        return dataclasses.replace(self, **kw)


class ZScoreStats(NamedTuple):
    """Per-dimension mean / std (float32) used to z-score theta and the context."""

    theta_mean: np.ndarray
    theta_std: np.ndarray
    x_mean: np.ndarray
    x_std: np.ndarray

    def to_dict(self) -> dict:
        return {k: np.asarray(v, np.float64).tolist() for k, v in self._asdict().items()}

    @classmethod
    def from_dict(cls, d: dict) -> "ZScoreStats":
        return cls(**{k: np.asarray(d[k], np.float32) for k in cls._fields})

    @classmethod
    def from_moments(cls, theta_mean, theta_var, x_mean, x_var) -> "ZScoreStats":
        """From (unbiased) variances, applying sbi's std floors."""
        ts = np.maximum(np.sqrt(np.asarray(theta_var, np.float64)), THETA_STD_FLOOR)
        xs = np.maximum(np.sqrt(np.asarray(x_var, np.float64)), X_STD_FLOOR)
        return cls(np.asarray(theta_mean, np.float32), ts.astype(np.float32),
                   np.asarray(x_mean, np.float32), xs.astype(np.float32))


def compute_stats(theta, x) -> ZScoreStats:
    """Mean and unbiased std (ddof=1, as ``torch.std``) per dimension, with sbi's floors."""
    theta = np.asarray(theta, np.float64)
    x = np.asarray(x, np.float64)
    if theta.ndim != 2 or x.ndim != 2 or theta.shape[0] != x.shape[0]:
        raise ValueError(f"compute_stats needs theta (n, d_theta) and x (n, d_context) with the "
                         f"same n; got {theta.shape} and {x.shape}")
    ddof = 1 if theta.shape[0] > 1 else 0
    return ZScoreStats.from_moments(theta.mean(0), theta.var(0, ddof=ddof),
                                    x.mean(0), x.var(0, ddof=ddof))


# ----------------------------------------------------------------------------------------------
# MADE degrees and masks
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _hidden_degrees(d: int, hidden: int) -> np.ndarray:
    """nflows' hidden degrees ``(j mod max(1, d-1)) + min(1, d-1)``, sorted ascending."""
    m, lo = max(1, d - 1), min(1, d - 1)
    deg = np.sort(np.arange(hidden) % m + lo)
    deg.flags.writeable = False
    return deg


@functools.lru_cache(maxsize=None)
def _hidden_prefix(d: int, hidden: int) -> tuple[int, ...]:
    """``P[i]`` = number of hidden units of degree <= i (i = 0..d-1): the units that the
    parameters of dimension i (degree i+1) depend on."""
    deg = _hidden_degrees(d, hidden)
    return tuple(int(np.sum(deg <= i)) for i in range(d))


def _degrees_in_graph(kind: str, d: int, n: int) -> jnp.ndarray:
    """Degrees built from iota inside the graph (no large constants in the HLO)."""
    j = jax.lax.iota(jnp.int32, n)
    if kind == "input":
        return j + 1
    if kind == "output":  # column c = p * d + i  ->  degree i + 1
        return j % d + 1
    deg = _hidden_degrees(d, n)
    # degree of sorted unit j = lo + number of boundaries <= j
    starts = np.searchsorted(deg, np.unique(deg)[1:])  # first index of each later degree
    out = jnp.full((n,), int(deg[0]), jnp.int32)
    for s in starts.tolist():
        out = out + (j >= s).astype(jnp.int32)
    return out


def _mask(in_kind: str, out_kind: str, d: int, n_in: int, n_out: int, dtype) -> jnp.ndarray:
    """(n_in, n_out) MADE mask: hidden units see inputs of degree <= theirs; outputs see hidden
    units of strictly smaller degree."""
    din = _degrees_in_graph(in_kind, d, n_in)[:, None]
    dout = _degrees_in_graph(out_kind, d, n_out)[None, :]
    m = dout > din if out_kind == "output" else dout >= din
    return m.astype(dtype)


def _mask_np(in_kind: str, out_kind: str, d: int, n_in: int, n_out: int) -> np.ndarray:
    def deg(kind, n):
        if kind == "input":
            return np.arange(n) + 1
        if kind == "output":
            return np.arange(n) % d + 1
        return _hidden_degrees(d, n)
    din, dout = deg(in_kind, n_in)[:, None], deg(out_kind, n_out)[None, :]
    return (dout > din if out_kind == "output" else dout >= din).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# NNX modules
# ----------------------------------------------------------------------------------------------
class Normalizer(nnx.Variable):
    """Non-trainable z-scoring statistics (saved with the model, never optimised)."""


def _torch_linear_init():
    # PyTorch nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    return nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class MaskedLinear(nnx.Module):
    """Dense layer whose kernel (n_in, n_out) is multiplied by a fixed MADE mask."""

    def __init__(self, in_kind: str, out_kind: str, d: int, n_in: int, n_out: int, *,
                 rngs: nnx.Rngs, zero_init: bool = False):
        self.in_kind, self.out_kind, self.d = in_kind, out_kind, d
        self.n_in, self.n_out = n_in, n_out
        if zero_init:
            kernel = jnp.zeros((n_in, n_out), jnp.float32)
        else:
            kernel = _torch_linear_init()(rngs.params(), (n_in, n_out), jnp.float32)
        bound = 1.0 / np.sqrt(max(n_in, 1))
        bias = (jnp.zeros((n_out,), jnp.float32) if zero_init else
                jax.random.uniform(rngs.params(), (n_out,), jnp.float32, -bound, bound))
        self.kernel = nnx.Param(kernel)
        self.bias = nnx.Param(bias)

    def masked_kernel(self) -> jnp.ndarray:
        k = self.kernel[...]
        return k * _mask(self.in_kind, self.out_kind, self.d, self.n_in, self.n_out, k.dtype)

    def __call__(self, h: jnp.ndarray) -> jnp.ndarray:
        if self.in_kind == "hidden" and self.out_kind == "hidden" and _HIDDEN_BLOCKS > 1:
            return _block_triangular_matmul(h, self.kernel[...], self.d, self.n_in,
                                            _HIDDEN_BLOCKS) + self.bias[...]
        return h @ self.masked_kernel() + self.bias[...]


# Hidden->hidden layers are computed as this many block-triangular pieces (same result as the
# dense masked matmul, ~2/3 of its flops; measured best of 1/2/3/5/10 for 2 x 500 units on CPU).
_HIDDEN_BLOCKS = 3


@functools.lru_cache(maxsize=None)
def _degree_blocks(d: int, hidden: int, n_groups: int) -> tuple[tuple[int, int, bool], ...]:
    """Split the (sorted-degree) hidden units into <= n_groups contiguous output blocks aligned
    to degree boundaries: (start, end, needs_mask)."""
    deg = _hidden_degrees(d, hidden)
    levels = np.unique(deg)
    cuts = np.unique(np.round(np.linspace(0, levels.size, min(n_groups, levels.size) + 1))
                     .astype(int))
    out = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        s = int(np.searchsorted(deg, levels[a], "left"))
        e = int(np.searchsorted(deg, levels[b - 1], "right"))
        out.append((s, e, bool(b - a > 1)))
    return tuple(out)


def _block_triangular_matmul(h, kernel, d, hidden, n_groups):
    """``h @ (kernel * mask)`` for the hidden->hidden MADE mask (deg_out >= deg_in), skipping the
    all-zero upper blocks: output block [s, e) only needs input units [0, e)."""
    outs = []
    for s, e, needs_mask in _degree_blocks(d, hidden, n_groups):
        k = kernel[:e, s:e]
        if needs_mask:
            k = k * _mask("hidden", "hidden", d, hidden, hidden, k.dtype)[:e, s:e]
        outs.append(h[..., :e] @ k)
    return jnp.concatenate(outs, axis=-1)


class MADE(nnx.Module):
    """Conditional MADE: ``(theta (..., d), context (..., c)) -> params (..., d, k)``."""

    def __init__(self, d: int, d_context: int, hidden: int, n_hidden_layers: int, k: int, *,
                 activation: str, batch_norm: bool, output_context: bool, out_bias: Sequence[float],
                 rngs: nnx.Rngs):
        self.d, self.hidden, self.k = d, hidden, k
        self.activation = activation
        self.use_bn = batch_norm
        self.output_context = output_context
        self.input_layer = MaskedLinear("input", "hidden", d, d, hidden, rngs=rngs)
        self.context_layer = nnx.Linear(d_context, hidden, rngs=rngs,
                                        kernel_init=_torch_linear_init(),
                                        bias_init=_torch_bias_init(d_context))
        self.hidden_layers = nnx.List([
            MaskedLinear("hidden", "hidden", d, hidden, hidden, rngs=rngs)
            for _ in range(n_hidden_layers)])
        if batch_norm:
            # PyTorch BatchNorm1d(eps=1e-3, momentum=0.1) == flax momentum 0.9
            self.batch_norms = nnx.List([
                nnx.BatchNorm(hidden, momentum=0.9, epsilon=1e-3, rngs=rngs)
                for _ in range(n_hidden_layers)])
        else:
            self.batch_norms = nnx.List([])
        # near-identity start: zero output kernel, bias = params of the identity transform
        self.output_layer = MaskedLinear("hidden", "output", d, hidden, k * d, rngs=rngs,
                                         zero_init=True)
        self.output_layer.bias[...] = jnp.repeat(jnp.asarray(out_bias, jnp.float32), d)
        if output_context:
            self.output_context_layer = nnx.Linear(d_context, k * d, rngs=rngs,
                                                   kernel_init=nnx.initializers.zeros_init(),
                                                   use_bias=False)
        else:
            self.output_context_layer = None

    def _act(self, h):
        return _ACTIVATIONS[self.activation](h)

    def __call__(self, theta: jnp.ndarray, context: jnp.ndarray,
                 train: bool = False) -> jnp.ndarray:
        act = self._act
        h = self.input_layer(theta) + act(self.context_layer(context))
        h = act(h)
        for i, layer in enumerate(self.hidden_layers):
            if self.use_bn:
                h = self.batch_norms[i](h, use_running_average=not train)
            h = act(layer(h))
        out = self.output_layer(h)
        if self.output_context_layer is not None:
            out = out + self.output_context_layer(context)
        return out.reshape(out.shape[:-1] + (self.k, self.d)).swapaxes(-1, -2)  # (..., d, k)

    def prefix_tables(self, context: jnp.ndarray) -> "PrefixTables":
        """What every :meth:`params_for_dim` step shares, computed once per sampling pass: the
        context's hidden activations and output offsets (..., hidden), (..., k * d), and the
        masked kernels (evaluation mode; batch norm folded into each hidden layer)."""
        act = self._act
        c = act(context @ self.context_layer.kernel[...] + self.context_layer.bias[...])
        ob = self.output_layer.bias[...]
        if self.output_context_layer is not None:
            ob = ob + context @ self.output_context_layer.kernel[...]
        hidden = []
        for li, layer in enumerate(self.hidden_layers):
            shift, scale = None, None
            if self.use_bn:
                bn = self.batch_norms[li]
                scale = jax.lax.rsqrt(bn.var[...] + bn.epsilon) * bn.scale[...]
                shift = bn.bias[...] - bn.mean[...] * scale
            hidden.append((scale, shift, layer.masked_kernel(), layer.bias[...]))
        return PrefixTables(c, ob, self.input_layer.masked_kernel(), self.input_layer.bias[...],
                            tuple(hidden), self.output_layer.masked_kernel())

    def params_for_dim(self, theta_prefix: jnp.ndarray, context: jnp.ndarray,
                       i: int, tables: "PrefixTables | None" = None) -> jnp.ndarray:
        """Evaluation-mode parameters (..., k) of dimension ``i`` (static) from
        ``theta_prefix = theta[..., :i]`` only, computing just the hidden units of degree <= i
        (the degrees are sorted, so those are a prefix of every hidden layer). ``tables``:
        :meth:`prefix_tables` of ``context``, shared by the d steps of one pass."""
        t = self.prefix_tables(context) if tables is None else tables
        act = self._act
        p = _hidden_prefix(self.d, self.hidden)[i]
        cols = np.arange(self.k) * self.d + i
        ob = t.out_offset[..., cols]
        if p == 0:
            return jnp.broadcast_to(ob, theta_prefix.shape[:-1] + (self.k,))
        if i > 0:
            h = theta_prefix @ t.in_kernel[:i, :p] + t.in_bias[:p] + t.context[..., :p]
        else:  # d == 1: hidden units see only the context
            h = jnp.broadcast_to(t.in_bias[:p] + t.context[..., :p],
                                 theta_prefix.shape[:-1] + (p,))
        h = act(h)
        for scale, shift, kernel, bias in t.hidden:
            if scale is not None:
                h = h * scale[:p] + shift[:p]
            h = act(h @ kernel[:p, :p] + bias[:p])
        return h @ t.out_kernel[:p][:, cols] + ob

    def invert(self, u: jnp.ndarray, tables: "PrefixTables", inv: Callable) -> jnp.ndarray:
        """The sampling direction of this MADE's autoregressive transform, evaluation mode:
        noise ``u`` (..., d) -> ``x`` (..., d) with ``x_i = inv(u_i, params_i(x_<i))``.

        Incremental over the sorted hidden degrees: once ``x_<i`` is known, the hidden units of
        degree < i never change, so step i computes only the units of degree i in every layer
        (each unit once per pass: the flops of one masked forward pass, against ~d/3 passes
        for recomputing the degree prefix at every step) and the two outputs of dimension i.
        ``tables``: :meth:`prefix_tables` of the context; ``inv(u_i (...,), params (..., k))
        -> (x_i, log|det|)``. The same values as d calls of :meth:`params_for_dim`, up to
        float rounding."""
        t, act, d = tables, self._act, self.d
        prefix = _hidden_prefix(d, self.hidden)
        batch = u.shape[:-1]
        # layer_in[l]: pieces of the input of hidden layer l (after batch norm); last: outputs'
        layer_in = [[] for _ in range(len(t.hidden) + 1)]
        cols = []
        for i in range(d):
            lo, hi = (prefix[i - 1] if i else 0), prefix[i]
            if hi > lo:  # the units of degree i (all of them when d == 1)
                h = jnp.broadcast_to(t.in_bias[lo:hi] + t.context[..., lo:hi], batch + (hi - lo,))
                if i > 0:
                    h = h + jnp.stack(cols, axis=-1) @ t.in_kernel[:i, lo:hi]
                h = act(h)
                for li, (scale, shift, kernel, bias) in enumerate(t.hidden):
                    if scale is not None:
                        h = h * scale[lo:hi] + shift[lo:hi]
                    layer_in[li].append(h)
                    h = act(_concat(layer_in[li]) @ kernel[:hi, lo:hi] + bias[lo:hi])
                layer_in[-1].append(h)
            colsk = np.arange(self.k) * d + i
            ob = t.out_offset[..., colsk]
            if hi == 0:
                params = jnp.broadcast_to(ob, batch + (self.k,))
            else:
                params = _concat(layer_in[-1]) @ t.out_kernel[:hi][:, colsk] + ob
            cols.append(inv(u[..., i], params)[0])
        return jnp.stack(cols, axis=-1)


class PrefixTables(NamedTuple):
    """A MADE's evaluation-mode pieces for one context (see :meth:`MADE.prefix_tables`)."""

    context: jnp.ndarray
    out_offset: jnp.ndarray
    in_kernel: jnp.ndarray
    in_bias: jnp.ndarray
    hidden: tuple
    out_kernel: jnp.ndarray


def _torch_bias_init(fan_in: int):
    bound = 1.0 / np.sqrt(max(fan_in, 1))

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


# ----------------------------------------------------------------------------------------------
# elementwise transforms (density direction = "fwd": data -> noise)
# ----------------------------------------------------------------------------------------------
_IDENTITY_RAW_SCALE = float(np.log(np.expm1(1.0 - AFFINE_EPS)))  # softplus(raw) + eps = 1


class _AffineElementwise:
    """``u = y * s + b``, ``s = softplus(raw) + 1e-3``; params (..., 2) = (raw scale, shift)."""

    k = 2
    identity_bias = (_IDENTITY_RAW_SCALE, 0.0)

    @staticmethod
    def fwd(y, p):
        s = jax.nn.softplus(p[..., 0]) + AFFINE_EPS
        return y * s + p[..., 1], jnp.log(s)

    @staticmethod
    def inv(u, p):
        s = jax.nn.softplus(p[..., 0]) + AFFINE_EPS
        return (u - p[..., 1]) / s, -jnp.log(s)


class _SplineElementwise:
    """distrax rational-quadratic spline on [-B, B] (identity outside); params (..., 3K+1).
    Zero parameters give the identity, so the identity bias is 0."""

    def __init__(self, n_bins: int, bound: float):
        self.k = 3 * n_bins + 1
        self.bound = float(bound)
        self.identity_bias = (0.0,) * self.k

    def _spline(self, p):
        return distrax.RationalQuadraticSpline(p, range_min=-self.bound, range_max=self.bound,
                                               boundary_slopes="identity", min_knot_slope=1e-3)

    def fwd(self, y, p):
        return self._spline(p).forward_and_log_det(y)

    def inv(self, u, p):
        return self._spline(p).inverse_and_log_det(u)


# ----------------------------------------------------------------------------------------------
# distrax bijectors
# ----------------------------------------------------------------------------------------------
class MaskedAutoregressiveBijector(distrax.Bijector):
    """Autoregressive bijector on vectors (event_ndims_in=1).

    ``conditioner(theta) -> params (..., d, k)`` must be autoregressive (params of dimension i
    depend on ``theta[..., :i]`` only).  The *inverse* (density direction, data -> noise) is one
    conditioner pass; the *forward* (sampling direction) is a loop over the d dimensions:
    ``jax.lax.fori_loop`` over full conditioner passes (``sampler='loop'``, nflows' algorithm),
    or, if ``step_fn(prefix, i) -> params (..., k)`` is given and ``sampler='prefix'``, an
    unrolled loop that evaluates only what dimension i needs.
    """

    def __init__(self, conditioner: Callable, d: int, elementwise=_AffineElementwise, *,
                 step_fn: Callable | None = None, sampler: str = "prefix"):
        super().__init__(event_ndims_in=1)
        if sampler not in ("prefix", "loop"):
            raise ValueError(f"sampler must be 'prefix' or 'loop', got {sampler!r}")
        self._cond = conditioner
        self._d = d
        self._ew = elementwise
        self._step = step_fn
        self._sampler = sampler

    def inverse_and_log_det(self, y):
        u, ld = self._ew.fwd(y, self._cond(y))
        return u, jnp.sum(ld, axis=-1)

    def forward_and_log_det(self, z):
        if self._sampler == "prefix" and self._step is not None:
            cols, ld = [], jnp.zeros(z.shape[:-1], z.dtype)
            for i in range(self._d):
                prefix = jnp.stack(cols, axis=-1) if cols else z[..., :0]
                xi, ldi = self._ew.inv(z[..., i], self._step(prefix, i))
                cols.append(xi)
                ld = ld + ldi
            return jnp.stack(cols, axis=-1), ld

        def body(_, carry):
            x, _ld = carry
            x_new, ld = self._ew.inv(z, self._cond(x))
            return x_new, jnp.sum(ld, axis=-1)

        # after d passes every x_i and every log-scale are exact (params_i need x_<i only)
        return jax.lax.fori_loop(0, self._d, body,
                                 (jnp.zeros_like(z), jnp.zeros(z.shape[:-1], z.dtype)))


class Permute(distrax.Bijector):
    """Fixed permutation of the last axis. Inverse (density direction): ``y[..., perm]``."""

    def __init__(self, perm: Sequence[int]):
        super().__init__(event_ndims_in=1, is_constant_jacobian=True)
        self._perm = np.asarray(perm, np.int32)
        self._inv_perm = np.argsort(self._perm).astype(np.int32)

    def inverse_and_log_det(self, y):
        return y[..., self._perm], jnp.zeros(y.shape[:-1], y.dtype)

    def forward_and_log_det(self, x):
        return x[..., self._inv_perm], jnp.zeros(x.shape[:-1], x.dtype)


class _ZScore(distrax.Bijector):
    """Inverse (density direction): (theta - mean) / std; log|det| = -sum log std."""

    def __init__(self, mean, std):
        super().__init__(event_ndims_in=1, is_constant_jacobian=True)
        self._mean, self._std = mean, std

    def inverse_and_log_det(self, y):
        ld = -jnp.sum(jnp.log(self._std))
        return (y - self._mean) / self._std, jnp.broadcast_to(ld, y.shape[:-1])

    def forward_and_log_det(self, x):
        ld = jnp.sum(jnp.log(self._std))
        return x * self._std + self._mean, jnp.broadcast_to(ld, x.shape[:-1])


# ----------------------------------------------------------------------------------------------
# the flow
# ----------------------------------------------------------------------------------------------
def make_permutations(config: FlowConfig) -> tuple[tuple[int, ...], ...]:
    d = config.d_theta
    if config.permutation == "reverse":
        return tuple(tuple(range(d - 1, -1, -1)) for _ in range(config.n_blocks))
    rng = np.random.default_rng(config.seed)
    return tuple(tuple(int(v) for v in rng.permutation(d)) for _ in range(config.n_blocks))


class Flow(nnx.Module):
    """A conditional normalizing flow p(theta | x) as an ``nnx.Module``.

    Attributes: ``config`` (FlowConfig), ``permutations`` (tuple of int tuples), the z-scoring
    variables ``theta_mean``/``theta_std``/``x_mean``/``x_std`` (:class:`Normalizer`), and
    ``blocks`` (an ``nnx.List`` of :class:`MADE`).  Use :func:`init_flow` to build one, and the
    module-level :func:`log_prob`, :func:`sample`, :func:`sample_batched` (jitted) to use it.
    """

    def __init__(self, config: FlowConfig, stats: ZScoreStats, *, rngs: nnx.Rngs,
                 permutations: Sequence[Sequence[int]] | None = None):
        self.config = config
        perms = make_permutations(config) if permutations is None else permutations
        perms = tuple(tuple(int(v) for v in p) for p in perms)
        if len(perms) != config.n_blocks or any(sorted(p) != list(range(config.d_theta))
                                                for p in perms):
            raise ValueError(f"permutations must be {config.n_blocks} permutations of "
                             f"range({config.d_theta})")
        self.permutations = perms
        stats = _check_stats(stats, config)
        self.theta_mean = Normalizer(jnp.asarray(stats.theta_mean))
        self.theta_std = Normalizer(jnp.asarray(stats.theta_std))
        self.x_mean = Normalizer(jnp.asarray(stats.x_mean))
        self.x_std = Normalizer(jnp.asarray(stats.x_std))
        ew = self._elementwise()
        self.blocks = nnx.List([
            MADE(config.d_theta, config.d_context, config.hidden, config.n_hidden_layers, ew.k,
                 activation=config.activation, batch_norm=config.batch_norm,
                 output_context=config.output_context, out_bias=ew.identity_bias, rngs=rngs)
            for _ in range(config.n_blocks)])

    def _elementwise(self):
        c = self.config
        return _AffineElementwise if c.flow_type == "maf" else _SplineElementwise(c.n_bins,
                                                                                  c.tail_bound)

    @property
    def stats(self) -> ZScoreStats:
        return ZScoreStats(*(np.asarray(v[...]) for v in
                             (self.theta_mean, self.theta_std, self.x_mean, self.x_std)))

    def _zscore_context(self, x):
        return (jnp.asarray(x, jnp.float32) - self.x_mean[...]) / self.x_std[...]

    def bijector(self, x, *, train: bool = False, sampler: str = "prefix") -> distrax.Bijector:
        """The theta-space bijector for context ``x`` ((n, d_context) or (d_context,)):
        forward = noise -> theta, inverse = theta -> noise (incl. z-scoring)."""
        xz = self._zscore_context(x)
        ew = self._elementwise()
        bijs: list[distrax.Bijector] = [_ZScore(self.theta_mean[...], self.theta_std[...])]
        for made, perm in zip(self.blocks, self.permutations):
            cond = functools.partial(_call_made, made, xz, train)
            step = functools.partial(_step_made, made, xz)
            bijs.append(MaskedAutoregressiveBijector(cond, self.config.d_theta, ew, step_fn=step,
                                                     sampler=sampler))
            bijs.append(Permute(perm))
        return distrax.Chain(bijs)  # Chain.inverse applies bijs[0] first: zscore, MADE_1, ...

    def distribution(self, x, *, train: bool = False, sampler: str = "prefix"):
        d = self.config.d_theta
        base = distrax.MultivariateNormalDiag(jnp.zeros(d, jnp.float32), jnp.ones(d, jnp.float32))
        return distrax.Transformed(base, self.bijector(x, train=train, sampler=sampler))

    def log_prob(self, theta, x, *, train: bool = False):
        theta = jnp.asarray(theta, jnp.float32)
        return self.distribution(x, train=train).log_prob(theta)

    def sample(self, key, x, n: int, *, sampler: str = "prefix"):
        """``n`` draws (n, d_theta) for one context row ``x`` (d_context,) (or rows (n, d_context)).

        ``sampler='prefix'`` (default): ``jax.lax.scan`` over the blocks, each inverted
        incrementally (:meth:`MADE.invert`; fast to run and to compile); ``'loop'``: the distrax chain
        with nflows' ``fori_loop`` of full MADE passes.  Both give the same draws for a key."""
        x = jnp.asarray(x, jnp.float32)
        dist = self.distribution(x, sampler=sampler)
        if sampler == "loop":
            return dist.sample(seed=key, sample_shape=(n,))
        if sampler != "prefix":
            raise ValueError(f"sampler must be 'prefix' or 'loop', got {sampler!r}")
        z = dist.distribution.sample(seed=key, sample_shape=(n,))  # same base draws as 'loop'
        return self.noise_to_theta(z, x)

    def noise_to_theta(self, z, x):
        """The flow's sampling direction: base draws ``z`` (n, d_theta) -> theta (n, d_theta)
        for context ``x`` ((d_context,) or (n, d_context)); a ``jax.lax.scan`` over the stacked
        blocks, each inverted incrementally (:meth:`MADE.invert`: every hidden unit computed
        once per block; the same values as ``bijector(x).forward(z)`` up to float rounding, but
        one block body to compile instead of all of them)."""
        xz = self._zscore_context(x)
        ew = self._elementwise()
        gds, states = zip(*(nnx.split(b) for b in self.blocks))
        stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *states)
        inv_perms = jnp.asarray(np.stack([np.argsort(p) for p in self.permutations]), jnp.int32)

        def body(y, inp):
            state, inv_perm = inp
            made = nnx.merge(gds[0], state)
            y = jnp.take(y, inv_perm, axis=-1)  # Permute.forward
            return made.invert(y, made.prefix_tables(xz), ew.inv), None

        y, _ = jax.lax.scan(body, z, (stacked, inv_perms), reverse=True)
        return y * self.theta_std[...] + self.theta_mean[...]


def _concat(pieces: list) -> jnp.ndarray:
    return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=-1)


def _call_made(made, xz, train, theta):
    return made(theta, xz, train)


def _step_made(made, xz, prefix, i):
    return made.params_for_dim(prefix, xz, i)


def _check_stats(stats: ZScoreStats, config: FlowConfig) -> ZScoreStats:
    stats = ZScoreStats(*(np.asarray(v, np.float32) for v in stats))
    for name, want in (("theta_mean", config.d_theta), ("theta_std", config.d_theta),
                       ("x_mean", config.d_context), ("x_std", config.d_context)):
        v = getattr(stats, name)
        if v.shape != (want,):
            raise ValueError(f"z-score stats {name} has shape {v.shape}, expected ({want},)")
        if not np.all(np.isfinite(v)):
            raise ValueError(f"z-score stats {name} has non-finite values")
    if np.any(stats.theta_std <= 0) or np.any(stats.x_std <= 0):
        raise ValueError("z-score stds must be > 0")
    return stats


def init_flow(key, config: FlowConfig, theta_train=None, x_train=None, *,
              stats: ZScoreStats | None = None,
              permutations: Sequence[Sequence[int]] | None = None) -> Flow:
    """Build a :class:`Flow` (an ``nnx.Module``) that starts near the identity map.

    Args:
        key: a ``jax.random`` key for the weights, or None to use ``config.seed``.
        config: the architecture.
        theta_train, x_train: training-split arrays ((n, d_theta), (n, d_context)) from which
            the z-scoring statistics are computed; or pass ``stats`` instead.
        stats: precomputed :class:`ZScoreStats` (e.g. from a streaming pass).
        permutations: explicit block permutations (used when loading checkpoints).
    """
    if stats is None:
        if theta_train is None or x_train is None:
            raise ValueError("init_flow needs theta_train and x_train, or stats")
        theta_train, x_train = np.asarray(theta_train), np.asarray(x_train)
        if theta_train.ndim != 2 or theta_train.shape[1] != config.d_theta:
            raise ValueError(f"theta_train must be (n, {config.d_theta}); got {theta_train.shape}")
        if x_train.ndim != 2 or x_train.shape[1] != config.d_context:
            raise ValueError(f"x_train must be (n, {config.d_context}); got {x_train.shape}")
        stats = compute_stats(theta_train, x_train)
    if key is None:
        key = jax.random.PRNGKey(config.seed)
    if isinstance(key, (int, np.integer)):
        key = jax.random.PRNGKey(int(key))
    return Flow(config, stats, rngs=nnx.Rngs(params=key), permutations=permutations)


def num_parameters(flow: Flow) -> int:
    """Number of trainable parameters (nnx.Param leaves)."""
    return int(sum(np.prod(v.shape) for v in jax.tree_util.tree_leaves(nnx.state(flow, nnx.Param))))


# ----------------------------------------------------------------------------------------------
# jitted public functions
# ----------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=(0,))
def _log_prob_pure(graphdef, state, theta, x):
    return nnx.merge(graphdef, state).log_prob(theta, x)


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _sample_pure(graphdef, state, key, x, n, sampler):
    return nnx.merge(graphdef, state).sample(key, x, n, sampler=sampler)


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _sample_batched_pure(graphdef, state, key, idx, xs, n, sampler):
    flow = nnx.merge(graphdef, state)

    def one(i, x):
        return flow.sample(jax.random.fold_in(key, i), x, n, sampler=sampler)

    return jax.vmap(one)(idx, xs)


def _as_f32(a, name, shape_tail):
    a = jnp.asarray(a, jnp.float32)
    if a.shape[-len(shape_tail):] != shape_tail:
        raise ValueError(f"{name} must end in shape {shape_tail}, got {a.shape}")
    return a


def log_prob(flow: Flow, theta, x) -> jnp.ndarray:
    """log p(theta | x) in theta's original units (z-scoring log-det included).

    theta: (n, d_theta) or (d_theta,); x: (n, d_context) or a single (d_context,) broadcast.
    Returns (n,) (or a scalar for a single theta). jit/vmap-compatible (also inside nnx.jit).
    """
    c = flow.config
    theta = _as_f32(theta, "theta", (c.d_theta,))
    x = _as_f32(x, "x", (c.d_context,))
    single = theta.ndim == 1
    if single:
        theta = theta[None]
    if x.ndim == 1:
        x = jnp.broadcast_to(x, theta.shape[:-1] + (c.d_context,))
    graphdef, state = nnx.split(flow)
    out = _log_prob_pure(graphdef, state, theta, x)
    return out[0] if single else out


def sample(flow: Flow, key, x, n: int, *, sampler: str = "prefix") -> jnp.ndarray:
    """Draw ``n`` samples (n, d_theta) from p(theta | x) for one context row ``x`` (d_context,)."""
    c = flow.config
    x = _as_f32(x, "x", (c.d_context,))
    if x.ndim != 1:
        raise ValueError(f"sample takes one context row (d_context,), got {x.shape}; "
                         f"use sample_batched for many")
    graphdef, state = nnx.split(flow)
    return _sample_pure(graphdef, state, key, x, int(n), sampler)


def sample_batched(flow: Flow, key, xs, n: int, *, max_rows: int = 65536,
                   sampler: str = "prefix") -> jnp.ndarray:
    """``n`` samples for each of ``m`` contexts: xs (m, d_context) -> (m, n, d_theta).

    Galaxies are vmapped in chunks of ``max(1, max_rows // n)`` (the last chunk padded, so one
    compilation) to bound memory.  Galaxy j uses ``jax.random.fold_in(key, j)``: the result for a
    row does not depend on the chunking and equals ``sample(flow, fold_in(key, j), xs[j], n)``.
    """
    c = flow.config
    xs = _as_f32(xs, "xs", (c.d_context,))
    if xs.ndim != 2:
        raise ValueError(f"sample_batched takes xs of shape (m, d_context), got {xs.shape}")
    m, n = xs.shape[0], int(n)
    if m == 0:
        return jnp.zeros((0, n, c.d_theta), jnp.float32)
    chunk = max(1, min(m, max_rows // max(n, 1)))
    graphdef, state = nnx.split(flow)
    outs = []
    for start in range(0, m, chunk):
        stop = min(start + chunk, m)
        idx = np.arange(start, start + chunk)
        xc = xs[start:stop]
        if stop - start < chunk:  # pad with the last row; results discarded
            xc = jnp.concatenate([xc, jnp.broadcast_to(xc[-1], (chunk - (stop - start),
                                                                 c.d_context))])
        out = _sample_batched_pure(graphdef, state, key, jnp.asarray(idx, jnp.uint32), xc, n,
                                   sampler)
        outs.append(out[: stop - start])
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs)


def bijector(flow: Flow, x, *, sampler: str = "prefix") -> distrax.Bijector:
    """The distrax bijector (noise -> theta) of ``flow`` for context ``x``."""
    return flow.bijector(jnp.asarray(x, jnp.float32), sampler=sampler)
