"""Maximum-likelihood training of a conditional flow (:mod:`sedflow_jax.flow`) with Optax.

SEDflow's recipe (``shared/design/provabgs_model.md`` §9.5, = sbi's single-round NPE): Adam
(lr 5e-4), gradient clipping at global norm 5, random 90/10 train/validation split, early stopping
once the validation log-likelihood has not improved for ``patience`` (20) epochs, then the best
weights are restored.  The paper used batches of 50; the default here is 512 for speed.

Data are arrays, not galaxies: an in-memory ``(theta, x)`` pair / dict / :class:`ArrayData`, or
any streaming :class:`DataSource` (e.g. :class:`NpzShards` over ``.npz`` shard files holding
``theta`` and ``x``) for training sets larger than memory.

Checkpoints are portable (no pickle): a directory with ``checkpoint.json`` (FlowConfig,
TrainConfig, z-score stats, permutations, package versions, epoch, history, RNG state, the
SHA-256 of each binary file) and flax msgpack files (``flow-*.msgpack``: the best weights, what
:func:`load_flow` returns; ``state-*.msgpack``: the latest weights + optimizer state, for
``fit(..., resume_from=dir)``).  The JSON is written last and atomically, so a run killed at any
moment leaves a consistent checkpoint.

Public API: ``TrainConfig``, ``TrainResult``, ``fit``, ``DataSource``, ``ArrayData``,
``NpzShards``, ``streaming_stats``, ``save_checkpoint``, ``load_checkpoint``, ``load_flow``,
``plot_loss``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .checkpoint import CHECKPOINT_JSON, load_checkpoint, save_checkpoint, unflatten_like
from .data import as_source, streaming_stats
from .flow import Flow, FlowConfig, init_flow

__all__ = ["TrainConfig", "TrainResult", "fit", "plot_loss"]


# ----------------------------------------------------------------------------------------------
# configuration and result
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters (JSON-serialisable).

    Attributes:
        learning_rate: Adam step size (SEDflow / sbi: 5e-4).
        batch_size: training batch size (paper: 50; default 512 for speed). A pass's last, partial
            batch is skipped (reshuffled into the next pass) unless it is the only one.
        clip_norm: gradient clipping by global norm (5.0); None or <= 0 disables it.
        val_fraction: fraction of rows held out for validation / early stopping.
        patience: stop after this many epochs without a better validation loss.
        max_epochs: hard limit on epochs.
        seed: default seed (split, shuffling, weight init) when ``fit`` gets none.
        checkpoint_dir: write checkpoints there (None: no checkpoints).
        checkpoint_every: checkpoint every this many epochs (and always at the end).
        eval_batch_size: rows per validation batch (padded, one compilation).
        progress: show a tqdm progress bar.
    """

    learning_rate: float = 5e-4
    batch_size: int = 512
    clip_norm: float | None = 5.0
    val_fraction: float = 0.1
    patience: int = 20
    max_epochs: int = 1000
    seed: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 1
    eval_batch_size: int = 8192
    progress: bool = True

    def __post_init__(self):
        if not self.learning_rate > 0:
            raise ValueError(f"TrainConfig.learning_rate must be > 0, got {self.learning_rate}")
        for name in ("batch_size", "max_epochs", "checkpoint_every", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.patience < 1:
            raise ValueError(f"TrainConfig.patience must be >= 1, got {self.patience}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"TrainConfig.val_fraction must be in (0, 1), got {self.val_fraction}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)


@dataclasses.dataclass
class TrainResult:
    """Outcome of :func:`fit`.

    Attributes:
        flow: the flow with the best validation weights restored.
        history: ``{'train_loss': [...], 'val_loss': [...], 'epoch_time_s': [...]}`` per epoch
            (losses are mean negative log-likelihoods in theta's units).
        best_epoch: 1-based epoch of the best validation loss.
        best_val_loss: that loss.
        stopped_early: True if early stopping ended the run (not max_epochs).
        epochs: epochs run in total (including those before a resume).
        n_train, n_val: split sizes.
        seed: the integer seed actually used.
        checkpoint_dir: where checkpoints went (or None).
    """

    flow: Flow
    history: dict
    best_epoch: int
    best_val_loss: float
    stopped_early: bool
    epochs: int
    n_train: int
    n_val: int
    seed: int
    checkpoint_dir: str | None = None


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
def _make_tx(cfg: TrainConfig):
    adam = optax.adam(cfg.learning_rate)
    if cfg.clip_norm is None or cfg.clip_norm <= 0:
        return adam
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adam)


@functools.lru_cache(maxsize=16)
def _make_fns_cached(graphdef, learning_rate, clip_norm):
    tx = _make_tx(TrainConfig(learning_rate=learning_rate, clip_norm=clip_norm))
    return _make_fns(graphdef, tx)


def _make_fns(graphdef, tx):
    @jax.jit
    def train_step(params, rest, opt_state, theta, x):
        def loss_fn(p):
            model = nnx.merge(graphdef, p, rest, copy=True)  # fresh BatchStats in this trace
            lp = model.log_prob(theta, x, train=True)
            _, new_rest = nnx.split(model, nnx.Param, ...)[1:]
            return -jnp.mean(lp), new_rest

        (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_rest, opt_state, loss

    @jax.jit
    def eval_sum(params, rest, theta, x, w):
        lp = nnx.merge(graphdef, params, rest).log_prob(theta, x, train=False)
        return jnp.sum(jnp.where(w > 0, lp, 0.0)), jnp.sum(jnp.where(w > 0, ~jnp.isfinite(lp), 0))

    return train_step, eval_sum


def _split_mask(n: int, val_fraction: float, seed: int) -> np.ndarray:
    n_val = int(round(n * val_fraction))
    if n_val < 1 or n - n_val < 2:
        raise ValueError(f"cannot split {n} rows with val_fraction={val_fraction}: need >= 1 "
                         f"validation and >= 2 training rows")
    rng = np.random.default_rng([seed, 0x5ED])
    is_val = np.zeros(n, bool)
    is_val[rng.choice(n, n_val, replace=False)] = True
    return is_val


def _seed_from(key_or_seed, cfg: TrainConfig) -> int:
    if key_or_seed is None:
        return int(cfg.seed)
    if isinstance(key_or_seed, (int, np.integer)):
        return int(key_or_seed)
    key = jnp.asarray(key_or_seed)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return int(np.asarray(key, np.uint32).ravel()[-1]) & 0x7FFFFFFF


class _DataParallel:
    """Placement for data-parallel training on a ``jax.sharding.Mesh``: batches split along the
    mesh (all its axes), everything else replicated; jit then partitions the step and inserts
    the gradient all-reduce. Works for meshes spanning several processes (each process holds
    the same batch and feeds the rows of its own devices)."""

    def __init__(self, mesh):
        if not isinstance(mesh, Mesh):
            raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
        names = tuple(mesh.axis_names)
        self.size = int(mesh.devices.size)
        self.rows = NamedSharding(mesh, PartitionSpec(names[0] if len(names) == 1 else names))
        self.repl = NamedSharding(mesh, PartitionSpec())

    @staticmethod
    def _put(a, sharding):
        if sharding.is_fully_addressable:
            return jax.device_put(a, sharding)
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])

    def batch(self, *arrays):
        """Split along the mesh when the rows divide evenly, else replicate (same values)."""
        sh = self.rows if arrays[0].shape[0] % self.size == 0 else self.repl
        return tuple(self._put(a, sh) for a in arrays)

    def replicate(self, tree):
        return jax.tree_util.tree_map(lambda a: self._put(a, self.repl), tree)


def _evaluate(eval_sum, params, rest, source, rows, bs, d_theta, d_context, dp=None) -> float:
    total, count, bad = 0.0, 0, 0
    for t, x in source.iter_batches(None, bs, rows):
        m = t.shape[0]
        if m < bs:  # pad to one shape
            t = np.concatenate([t, np.zeros((bs - m, d_theta), np.float32)])
            x = np.concatenate([x, np.zeros((bs - m, d_context), np.float32)])
        w = np.zeros(bs, np.float32)
        w[:m] = 1
        if dp is not None:
            t, x, w = dp.batch(t, x, w)
        s, nb = eval_sum(params, rest, t, x, w)
        total += float(s)
        bad += int(nb)
        count += m
    if bad:
        return math.inf
    return -total / max(count, 1)


@dataclasses.dataclass
class _TrainState:
    """What the training loop carries from epoch to epoch (and a checkpoint saves)."""

    graphdef: Any
    params: Any
    rest: Any
    opt_state: Any
    best_params: Any
    best_rest: Any
    rng: np.random.Generator
    history: dict
    epoch: int = 0
    best_val: float = math.inf
    best_epoch: int = 0
    since_best: int = 0

    def replicate(self, dp: "_DataParallel") -> None:
        """Place the weights and optimizer state on the mesh (replicated)."""
        (self.params, self.rest, self.opt_state, self.best_params,
         self.best_rest) = dp.replicate((self.params, self.rest, self.opt_state,
                                         self.best_params, self.best_rest))


def _new_rng(seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, 0xB47C4])


def _fresh_state(cfg: TrainConfig, fcfg: FlowConfig, source, is_train, seed: int, tx,
                 flow: Flow | None) -> _TrainState:
    """Initial state: ``flow`` (warm start) or a fresh flow z-scored on the training rows."""
    if flow is not None:
        model = flow
        if model.config != fcfg:
            raise ValueError("the initial flow's config differs from flow_config: "
                             + "; ".join(model.config.differences(fcfg, "checkpoint", "requested")))
    else:
        stats = streaming_stats(source, is_train)
        model = init_flow(jax.random.PRNGKey(seed), fcfg, stats=stats)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return _TrainState(graphdef=graphdef, params=params, rest=rest, opt_state=tx.init(params),
                       best_params=params, best_rest=rest, rng=_new_rng(seed),
                       history={"train_loss": [], "val_loss": [], "epoch_time_s": []})


def _resume_state(resume_from, cfg: TrainConfig, fcfg: FlowConfig, source, seed: int,
                  tx) -> _TrainState:
    """The state saved in the checkpoint of an interrupted run (same seed, data and
    optimizer settings, else ValueError)."""
    ck = load_checkpoint(resume_from, fcfg)
    meta = ck["meta"]
    ex = meta.get("extra", {})
    if ex.get("seed") != seed or ex.get("n") != source.n:
        raise ValueError(f"cannot resume from {resume_from}: it was trained with seed "
                         f"{ex.get('seed')} on n={ex.get('n')} rows, not seed {seed} on "
                         f"n={source.n}")
    old_tc = meta.get("train_config") or {}
    for k in ("learning_rate", "batch_size", "clip_norm", "val_fraction"):
        if old_tc.get(k) != getattr(cfg, k):
            raise ValueError(f"cannot resume from {resume_from}: TrainConfig.{k} was "
                             f"{old_tc.get(k)!r}, now {getattr(cfg, k)!r}")
    if ck["current_flow"] is None or ck["opt_state_flat"] is None:
        raise ValueError(f"checkpoint {resume_from} has no optimizer state to resume from")
    graphdef, params, rest = nnx.split(ck["current_flow"], nnx.Param, ...)
    _, best_params, best_rest = nnx.split(ck["flow"], nnx.Param, ...)
    history = {k: list(v) for k, v in meta["history"].items()}
    history.setdefault("epoch_time_s", [])
    rng = _new_rng(seed)
    rng.bit_generator.state = ex["rng_state"]
    return _TrainState(
        graphdef=graphdef, params=params, rest=rest,
        opt_state=unflatten_like(tx.init(params), ck["opt_state_flat"], "optimizer state"),
        best_params=best_params, best_rest=best_rest, rng=rng, history=history,
        epoch=int(meta["epoch"]), best_val=float(ex["best_val"]),
        best_epoch=int(ex["best_epoch"]), since_best=int(ex["since_best"]))


def _train_epoch(st: _TrainState, train_step, source, is_train, batch_size: int, dp) -> float:
    """One pass over the training rows (shuffled by ``st.rng``); the mean training loss.

    The pass's last, partial batch is skipped when full batches came before it (its rows are
    reshuffled into the next pass): a second batch shape would compile the training step a
    second time (seconds, once per ``fit``) for a few rows."""
    losses, sizes = [], []
    for t, x in source.iter_batches(st.rng, batch_size, is_train):
        if sizes and t.shape[0] < batch_size:
            break
        if dp is not None:
            t, x = dp.batch(t, x)
        st.params, st.rest, st.opt_state, loss = train_step(st.params, st.rest, st.opt_state,
                                                            t, x)
        losses.append(loss)  # stays on device: no sync per step
        sizes.append(t.shape[0])
    sizes = np.asarray(sizes, np.float64)
    return float(np.sum(np.asarray(jax.device_get(losses), np.float64) * sizes)
                 / max(sizes.sum(), 1.0))


def _record_epoch(st: _TrainState, train_loss: float, val_loss: float, seconds: float) -> None:
    """History and early-stopping bookkeeping: the best weights and epochs since them."""
    st.epoch += 1
    st.history["train_loss"].append(train_loss)
    st.history["val_loss"].append(val_loss)
    st.history["epoch_time_s"].append(seconds)
    if val_loss < st.best_val:
        st.best_val, st.best_epoch, st.since_best = val_loss, st.epoch, 0
        st.best_params, st.best_rest = st.params, st.rest
    else:
        st.since_best += 1


def _checkpoint(st: _TrainState, cfg: TrainConfig, extra: dict, dp) -> None:
    """Save the best and the current weights with the optimizer state (process 0 only)."""
    if cfg.checkpoint_dir is None or (dp is not None and jax.process_index() != 0):
        return
    extra = dict(extra, best_val=st.best_val, best_epoch=st.best_epoch,
                 since_best=st.since_best, rng_state=st.rng.bit_generator.state)
    save_checkpoint(cfg.checkpoint_dir, nnx.merge(st.graphdef, st.best_params, st.best_rest),
                    train_config=cfg, opt_state=st.opt_state,
                    current_flow=nnx.merge(st.graphdef, st.params, st.rest), epoch=st.epoch,
                    history=st.history, extra=extra)


def _best_flow(st: _TrainState, dp) -> Flow:
    if not math.isfinite(st.best_val):
        raise FloatingPointError("validation loss never became finite: training diverged")
    best_params, best_rest = st.best_params, st.best_rest
    if dp is not None:  # back to ordinary single-device arrays
        best_params, best_rest = jax.tree_util.tree_map(
            lambda a: jnp.asarray(np.asarray(a)), (best_params, best_rest))
    return nnx.merge(st.graphdef, best_params, best_rest)


def _checked_source(data, flow_config):
    if data is None:
        raise ValueError("fit needs data")
    source = as_source(data)
    fcfg = flow_config or FlowConfig.small(source.d_theta, source.d_context)
    if (fcfg.d_theta, fcfg.d_context) != (source.d_theta, source.d_context):
        raise ValueError(f"data dims (d_theta={source.d_theta}, d_context={source.d_context}) do "
                         f"not match the FlowConfig ({fcfg.d_theta}, {fcfg.d_context})")
    return source, fcfg


def fit(key_or_seed, config: TrainConfig | None = None, flow_config: FlowConfig | None = None,
        data=None, *, resume_from: str | os.PathLike | None = None,
        flow: Flow | None = None, callback=None, mesh=None) -> TrainResult:
    """Train ``p(theta | x)`` by maximum likelihood with early stopping.

    Args:
        key_or_seed: int seed or a ``jax.random`` key (None: ``config.seed``).  Determines the
            train/validation split, the shuffling and the initial weights: the run is
            reproducible from it.
        config: :class:`TrainConfig` (default ``TrainConfig()``).
        flow_config: :class:`FlowConfig` (default ``FlowConfig.small(d_theta, d_context)``).
        data: ``(theta, x)`` arrays, ``{'theta', 'x'}`` dict, or a :class:`DataSource`.
        resume_from: checkpoint directory of an interrupted run with the same seed, configs and
            data; training continues after its last completed epoch and ends as the
            uninterrupted run would.
        flow: optional initial flow (warm start) instead of a fresh ``init_flow``.
        callback: ``callback(epoch, train_loss, val_loss)`` after each epoch; return True to stop.
        mesh: optional ``jax.sharding.Mesh`` (e.g. ``sedflow_jax.parallel.make_mesh()``) for
            data-parallel training: each batch of ``config.batch_size`` rows (the *global*
            batch) is split over the mesh's devices, the weights and optimizer state are
            replicated, and XLA all-reduces the gradients (BatchNorm statistics too), so the
            run equals the single-device one at the same batch size up to float rounding.
            Batches whose size does not divide by the device count (an epoch's last) run
            replicated. A mesh over several processes (``make_mesh('global')`` after
            ``jax.distributed.initialize``) needs every process to call ``fit`` with the same
            data and seed; only process 0 writes checkpoints.
    """
    cfg = config or TrainConfig()
    source, fcfg = _checked_source(data, flow_config)
    seed = _seed_from(key_or_seed, cfg)
    is_val = _split_mask(source.n, cfg.val_fraction, seed)
    is_train = ~is_val
    n_val, n_train = int(is_val.sum()), int(is_train.sum())
    tx = _make_tx(cfg)
    if resume_from is not None and os.path.exists(os.path.join(os.fspath(resume_from),
                                                               CHECKPOINT_JSON)):
        st = _resume_state(resume_from, cfg, fcfg, source, seed, tx)
    else:
        st = _fresh_state(cfg, fcfg, source, is_train, seed, tx, flow)
    dp = None
    if mesh is not None:
        dp = _DataParallel(mesh)
        st.replicate(dp)
    # cached per (architecture, optimizer): repeated fits in one process compile once
    train_step, eval_sum = _make_fns_cached(st.graphdef, cfg.learning_rate, cfg.clip_norm)
    extra = {"seed": seed, "n": source.n, "n_train": n_train, "n_val": n_val}
    stopped_early = st.since_best >= cfg.patience
    pbar = None
    if cfg.progress:
        from tqdm.auto import tqdm
        pbar = tqdm(total=cfg.max_epochs, initial=st.epoch, desc="training flow", unit="epoch")
    try:
        while not stopped_early and st.epoch < cfg.max_epochs:
            t0 = time.perf_counter()
            train_loss = _train_epoch(st, train_step, source, is_train, cfg.batch_size, dp)
            val_loss = _evaluate(eval_sum, st.params, st.rest, source, is_val,
                                 min(cfg.eval_batch_size, n_val), source.d_theta,
                                 source.d_context, dp)
            _record_epoch(st, train_loss, val_loss, time.perf_counter() - t0)
            stopped_early = st.since_best >= cfg.patience
            if callback is not None and callback(st.epoch, train_loss, val_loss):
                stopped_early = True
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}",
                                 best=f"{st.best_val:.4f}@{st.best_epoch}")
            if st.epoch % cfg.checkpoint_every == 0 or stopped_early \
                    or st.epoch >= cfg.max_epochs:
                _checkpoint(st, cfg, extra, dp)
    finally:
        if pbar is not None:
            pbar.close()
    return TrainResult(flow=_best_flow(st, dp), history=st.history, best_epoch=st.best_epoch,
                       best_val_loss=st.best_val, stopped_early=stopped_early, epochs=st.epoch,
                       n_train=n_train, n_val=n_val, seed=seed,
                       checkpoint_dir=cfg.checkpoint_dir)


# ----------------------------------------------------------------------------------------------
# plotting
# ----------------------------------------------------------------------------------------------
def plot_loss(history: dict, path: str | os.PathLike, *, best_epoch: int | None = None,
              title: str | None = None) -> str:
    """Write a PNG of the train / validation loss per epoch (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    tr = np.asarray(history.get("train_loss", []), float)
    va = np.asarray(history.get("val_loss", []), float)
    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.add_subplot(111)
    ep = np.arange(1, max(tr.size, va.size) + 1)
    if tr.size:
        ax.plot(ep[:tr.size], tr, label="train")
    if va.size:
        ax.plot(ep[:va.size], va, label="validation")
        if best_epoch is None and np.isfinite(va).any():
            best_epoch = int(np.nanargmin(np.where(np.isfinite(va), va, np.nan))) + 1
    if best_epoch:
        ax.axvline(best_epoch, color="k", ls=":", lw=1, label=f"best (epoch {best_epoch})")
    ax.set_xlabel("epoch")
    ax.set_ylabel(r"$-\log p(\theta\,|\,x)$ (mean)")
    if title:
        ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = os.fspath(path)
    fig.savefig(path)
    return path
