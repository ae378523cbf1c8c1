"""Amortized posteriors from a trained flow: sampling with prior-support rejection, summaries.

The flow models p(s | x) in SEDflow's 11-dim sampling space
s = [logM, u1, u2, u3, fburst, tburst, log10 gamma1, log10 gamma2, tau_bc, tau_ism, n_dust]
conditioned on x = [mags, sigma_mags, z] (see :mod:`sedflow_jax.catalog`). As sbi's
DirectPosterior does, samples outside the prior box are rejected and redrawn; the acceptance rate
is reported per galaxy and tiny ones are flagged. Contexts outside the training set's range are
flagged ``ood`` (out of support): their posteriors are extrapolations.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import flow as F
from . import prior as P

#: acceptance below this is flagged (the posterior sits mostly outside the prior box)
LOW_ACCEPTANCE = 0.01


#: what the flow models: "box" = the sampling-space point itself (SEDflow; draws outside the
#: prior box are rejected), "logit" = y = logit((s - low) / (high - low)) per coordinate, an
#: unbounded variable whose every draw maps inside the box (no rejection; flat priors with hard
#: edges become smooth logistic densities the flow can represent)
THETA_SPACES = ("box", "logit")
_LOGIT_EPS = 1e-6


def box_to_logit(s, low, high):
    """Sampling-space points s (..., d) inside [low, high] -> y = logit((s - low) / (high - low))
    (numpy float32; points within 1e-6 of an edge, in units of the width, are moved to it)."""
    s = np.asarray(s, np.float64)
    p = np.clip((s - low) / (high - low), _LOGIT_EPS, 1.0 - _LOGIT_EPS)
    return (np.log(p) - np.log1p(-p)).astype(np.float32)


def logit_to_box(y, low, high):
    """Inverse of :func:`box_to_logit`: y (..., d) -> low + (high - low) sigmoid(y) (float32)."""
    y = np.asarray(y, np.float64)
    s = low + (high - low) * (0.5 * (1.0 + np.tanh(0.5 * y)))
    return np.clip(s, low, high).astype(np.float32)


class LogitTheta:
    """A training :class:`sedflow_jax.train.DataSource` wrapper: yields (box_to_logit(theta), x)."""

    def __init__(self, source, low, high):
        self.source = source
        self.low, self.high = np.asarray(low, np.float64), np.asarray(high, np.float64)
        self.n, self.d_theta, self.d_context = source.n, source.d_theta, source.d_context

    def __len__(self):
        return self.n

    def iter_batches(self, rng, batch_size, rows):
        for t, x in self.source.iter_batches(rng, batch_size, rows):
            yield box_to_logit(t, self.low, self.high), x


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


@dataclasses.dataclass
class AmortizedPosterior:
    """A trained flow bound to its prior, bands and the training set's x range."""

    flow: F.Flow
    prior: P.Prior
    bands: tuple
    x_lo: np.ndarray
    x_hi: np.ndarray
    meta: dict = dataclasses.field(default_factory=dict)

    # ------------------------------------------------------------------ band masks
    @property
    def mask_aware(self) -> bool:
        """True for a flow conditioned on (x, band mask) (trained with band dropout)."""
        return bool(self.meta.get("band_mask"))

    @property
    def support(self):
        """The training set's :class:`sedflow_jax.masking.TrainingSupport` (None for models
        saved before it was recorded)."""
        d = self.meta.get("support")
        if not d:
            return None
        from .masking import TrainingSupport

        cached = getattr(self, "_support_cache", None)
        if cached is None or cached[0] is not d:
            self._support_cache = (d, TrainingSupport.from_dict(d))
        return self._support_cache[1]

    def condition(self, xs, mask=None) -> np.ndarray:
        """The flow's context for x (m, 2 nb + 1) and an optional band mask (m, nb) (True =
        used): x itself for a plain posterior (which refuses masked bands), [x with masked
        slots filled, mask] (m, 3 nb + 1) for a mask-aware one."""
        xs = np.atleast_2d(np.asarray(xs, np.float32))
        nb = len(self.bands)
        if not self.mask_aware:
            if mask is not None and not np.all(mask):
                raise ValueError("this posterior was trained without band dropout and needs every "
                                 "band; train one with train_posterior(..., band_dropout=0.5) to "
                                 "use band masks")
            return xs
        if xs.shape[1] != 2 * nb + 1:
            raise ValueError(f"x must have {2 * nb + 1} columns (mags, sigma_mags, z) for bands "
                             f"{self.bands}; got {xs.shape[1]}")
        from .masking import apply_mask

        info = self.meta["band_mask"]
        if mask is not None:
            mask = np.atleast_2d(np.asarray(mask, bool))
            few = mask.sum(1) < int(info.get("min_bands", 1))
            if few.any():
                raise ValueError(f"{int(few.sum())} rows keep fewer than {info.get('min_bands')} "
                                 "bands, below what the posterior was trained for")
        return apply_mask(xs, mask, np.asarray(info["fill"], np.float32))

    # ------------------------------------------------------------------ support checks
    def out_of_support(self, xs, mask=None) -> np.ndarray:
        """(m,) True where a context lies outside the training range (or is not finite).

        xs : (m, 2 nb + 1) [mags, sigma_mags, z] (for a mask-aware posterior; a plain
        posterior's own context otherwise). mask : (m, nb) bool, masked bands are not checked.
        """
        xs = np.atleast_2d(np.asarray(xs, float))
        if mask is None or not self.mask_aware:
            ok = np.isfinite(xs).all(1) & (xs >= self.x_lo).all(1) & (xs <= self.x_hi).all(1)
            return ~ok
        mask = np.atleast_2d(np.asarray(mask, bool))
        used = np.concatenate([mask, mask, np.ones((xs.shape[0], 1), bool)], axis=1)
        with np.errstate(invalid="ignore"):
            good = np.isfinite(xs) & (xs >= self.x_lo) & (xs <= self.x_hi)
        return ~(good | ~used).all(1)

    @property
    def theta_space(self) -> str:
        """'box' (SEDflow: the flow models the sampling-space point, rejection to the prior box)
        or 'logit' (the flow models logit coordinates; every draw is inside the box)."""
        return self.meta.get("theta_space", "box")

    def _box(self):
        lo, hi = P.sampling_bounds(self.prior)
        return np.asarray(lo, np.float64), np.asarray(hi, np.float64)

    def flow_to_sampling(self, draws) -> np.ndarray:
        """Flow outputs (..., 11) -> sampling-space points (identity for ``theta_space='box'``)."""
        if self.theta_space == "box":
            return np.asarray(draws)
        return logit_to_box(draws, *self._box())

    def _in_prior(self, s):
        return np.asarray(P.in_support(self.prior, jnp.asarray(s)))

    # ------------------------------------------------------------------ sampling
    def log_prob(self, s, x, mask=None):
        """log p(s | x) of the flow (sampling space; for ``theta_space='box'`` not renormalised for
        the rejection; for 'logit' exact, -inf outside the box).
        For a mask-aware posterior x is (n, 2 nb + 1) and ``mask`` the band mask."""
        if self.mask_aware and np.shape(x)[-1] == 2 * len(self.bands) + 1:
            x = self.condition(np.atleast_2d(x), mask)
            x = x[0] if x.shape[0] == 1 else x
        if self.theta_space == "box":
            return F.log_prob(self.flow, s, x)
        lo, hi = (jnp.asarray(a, jnp.float32) for a in self._box())
        s = jnp.asarray(s, jnp.float32)
        ok = (s > lo) & (s < hi)
        inside = jnp.all(ok, axis=-1)
        sc = jnp.where(ok, s, 0.5 * (lo + hi))
        p = (sc - lo) / (hi - lo)
        y = jnp.log(p) - jnp.log1p(-p)
        # change of variables: log p(s) = log q(y) + log|dy/ds|, dy/ds = (hi - lo)/((s-lo)(hi-s))
        ldj = jnp.sum(jnp.log(hi - lo) - jnp.log(sc - lo) - jnp.log(hi - sc), axis=-1)
        return jnp.where(inside, F.log_prob(self.flow, y, x) + ldj, -jnp.inf)

    def sample(self, key, x_obs, n: int, *, max_rounds: int = 20, mask=None) -> Samples:
        """``n`` posterior draws for one context x_obs (d_x,): a :class:`Samples` without m axis.
        ``mask`` (n_bands,) bool: bands to use (mask-aware posteriors)."""
        out = self.sample_batched(key, np.asarray(x_obs, float)[None], n, max_rounds=max_rounds,
                                  mask=None if mask is None else np.asarray(mask, bool)[None])
        return Samples(*(a[0] for a in out))

    def sample_batched(self, key, xs, n: int, *, max_rounds: int = 20,
                       max_rows: int = 65536, mask=None) -> Samples:
        """``n`` draws for each of m contexts xs (m, d_x), with rejection to the prior box.

        Galaxies short of ``n`` accepted draws are redrawn (fresh keys) for up to ``max_rounds``
        rounds; rows still missing are NaN and the galaxy is flagged ``low_acceptance``.
        Non-finite contexts are not sampled (all NaN, acceptance 0, ood True).
        mask : (m, n_bands) bool, True = band used (mask-aware posteriors; masked entries of xs
        may be NaN). Without it a mask-aware posterior uses every band.
        """
        xs = np.atleast_2d(np.asarray(xs, np.float32))
        if self.mask_aware:
            ood = self.out_of_support(xs, mask if mask is not None else
                                      np.ones((xs.shape[0], len(self.bands)), bool))
            xs = self.condition(xs, mask)
        else:
            self.condition(xs, mask)  # refuses masks with masked bands
            ood = self.out_of_support(xs)
        m, d = xs.shape[0], self.flow.config.d_theta
        finite = np.isfinite(xs).all(1)
        s_out = np.full((m, n, d), np.nan, np.float32)
        filled = np.zeros(m, int)
        drawn = np.zeros(m, int)
        inside = np.zeros(m, int)
        todo = np.flatnonzero(finite)
        per_call = max(1, max_rows // max(n, 1))
        # one compiled shape for every round: calls get `bucket` rows (or more, chunked at
        # per_call); later rounds repeat the galaxies still short of n draws over those rows
        bucket = min(per_call, 1 << int(np.ceil(np.log2(max(todo.size, 1)))))
        for r in range(max_rounds):
            if todo.size == 0:
                break
            k = jax.random.fold_in(key, r)
            if todo.size >= bucket:
                who = todo
                n_real = who.size
            else:
                need = n - filled[todo]
                acc_g = np.where(drawn[todo] > 0, inside[todo] / np.maximum(drawn[todo], 1), 1.0)
                want = np.ceil(need / (np.maximum(acc_g, 0.02) * n)).astype(int)
                extra = np.maximum(want - 1, 0)  # share the spare rows by need
                spare = bucket - todo.size
                if extra.sum() > spare:
                    extra = np.floor(extra * (spare / extra.sum())).astype(int)
                who = np.repeat(todo, 1 + extra)
                n_real = who.size
                if who.size < bucket:
                    who = np.concatenate([who, np.repeat(who[-1:], bucket - who.size)])
            sub = xs[who]
            draws = self.flow_to_sampling(F.sample_batched(self.flow, k, sub, n,
                                                           max_rows=max_rows))
            ok = self._in_prior(draws.reshape(-1, d)).reshape(who.size, n)
            for i, g in enumerate(who[:n_real]):  # padding rows are discarded
                if filled[g] >= n:  # surplus repeats of a galaxy already filled
                    continue
                drawn[g] += n
                inside[g] += ok[i].sum()
                take = draws[i][ok[i]][: n - filled[g]]
                s_out[g, filled[g]:filled[g] + len(take)] = take
                filled[g] += len(take)
            todo = todo[filled[todo] < n]
        acc = np.where(drawn > 0, inside / np.maximum(drawn, 1), 0.0)
        theta = np.asarray(P.from_sampling(jnp.asarray(np.nan_to_num(s_out))))
        theta = np.where(np.isnan(s_out[..., :1]), np.nan, theta)
        return Samples(theta=theta, s=s_out, acceptance=acc, n_accepted=filled,
                       low_acceptance=(acc < LOW_ACCEPTANCE) | (filled < n), ood=ood)

    # ------------------------------------------------------------------ persistence
    def save(self, path):
        """Write the flow checkpoint and ``posterior.json`` (prior, bands, x range) to ``path``."""
        from . import train

        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        train.save_checkpoint(p, self.flow)
        info = dict(prior=dataclasses.asdict(self.prior), bands=list(self.bands),
                    x_lo=self.x_lo.tolist(), x_hi=self.x_hi.tolist(), meta=self.meta)
        tmp = p / "posterior.json.tmp"
        tmp.write_text(json.dumps(info, indent=2, default=str))
        os.replace(tmp, p / "posterior.json")

    @classmethod
    def load(cls, path) -> "AmortizedPosterior":
        from . import train

        p = Path(path)
        info_path = p / "posterior.json"
        if not info_path.exists():
            raise FileNotFoundError(f"{p} is not a trained SEDflow model (no posterior.json)")
        try:
            info = json.loads(info_path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{info_path} is corrupt: {exc}") from exc
        flow = train.load_flow(p)
        pr = info["prior"]
        prior = P.Prior(**{k: tuple(v) if isinstance(v, list) else v for k, v in pr.items()})
        return cls(flow=flow, prior=prior, bands=tuple(info["bands"]),
                   x_lo=np.asarray(info["x_lo"], float), x_hi=np.asarray(info["x_hi"], float),
                   meta=info.get("meta", {}))


def sample(posterior: AmortizedPosterior, key, x_obs, n: int, **kw) -> Samples:
    """Functional alias of :meth:`AmortizedPosterior.sample`."""
    return posterior.sample(key, x_obs, n, **kw)


def sample_batched(posterior: AmortizedPosterior, key, xs, n: int, **kw) -> Samples:
    """Functional alias of :meth:`AmortizedPosterior.sample_batched`."""
    return posterior.sample_batched(key, xs, n, **kw)


def log_prob(posterior: AmortizedPosterior, s, x):
    return posterior.log_prob(s, x)


# ------------------------------------------------------------------ summaries
_FILL_THETA = np.array([10.0, 1, 0, 0, 0, 0, 1.0, 1e-3, 1e-3, 0, 0, 0])
DERIVED = ("logmstar_surviving", "log_sfr_100myr", "log_sfr_1gyr", "log_z_mw", "t_mw")


def derived_samples(model, theta, z, n_derived: int = 500):
    """Derived properties of posterior draws: theta (m, n, 12), z (m,) -> dict name -> (m, k)."""
    theta = np.asarray(theta)
    k = min(n_derived, theta.shape[1])
    th = theta[:, :k]
    good = np.isfinite(th).all(-1)
    th_safe = np.where(good[..., None], th, _FILL_THETA)  # NaN rows: evaluated, then masked
    zz = np.broadcast_to(np.asarray(z, float)[:, None], th.shape[:2])
    d = model.derived(th_safe, zz)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = {
            "logmstar_surviving": np.asarray(d.logmstar_surviving, float),
            "log_sfr_100myr": np.log10(np.asarray(d.sfr_100myr, float)),
            "log_sfr_1gyr": np.log10(np.asarray(d.sfr_1gyr, float)),
            "log_z_mw": np.log10(np.asarray(d.z_mw, float)),
            "t_mw": np.asarray(d.t_mw, float),
        }
    return {k_: np.where(good, v, np.nan) for k_, v in out.items()}


def summarize(samples: Samples, *, model=None, z=None, n_derived: int = 500):
    """astropy Table: per-galaxy median / 16 / 84 % of the 12 parameters (and derived properties
    if ``model`` and ``z`` are given), acceptance, n_accepted, low_acceptance and ood flags."""
    from astropy.table import Table

    t = Table()
    th = samples.theta
    with np.errstate(all="ignore"):
        q = np.nanpercentile(th, [16, 50, 84], axis=1) if th.size else np.zeros((3, 0, 12))
    for i, name in enumerate(P.PARAM_NAMES):
        t[f"{name}_p50"], t[f"{name}_p16"], t[f"{name}_p84"] = q[1][:, i], q[0][:, i], q[2][:, i]
    if model is not None and z is not None:
        der = derived_samples(model, th, z, n_derived)
        for name, v in der.items():
            with np.errstate(all="ignore"):
                qq = np.nanpercentile(v, [16, 50, 84], axis=1)
            t[f"{name}_p50"], t[f"{name}_p16"], t[f"{name}_p84"] = qq[1], qq[0], qq[2]
    t["acceptance"] = samples.acceptance
    t["n_accepted"] = samples.n_accepted
    t["low_acceptance"] = samples.low_acceptance
    t["ood"] = samples.ood
    return t


# ------------------------------------------------------------------ training an amortized posterior
def _prior_from_dict(d: dict) -> P.Prior:
    return P.Prior(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _grid_size(grid, n_rows: int) -> int:
    if grid is not None:
        return int(grid)
    return int(np.clip(np.sqrt(max(n_rows, 1)) / 6, 8, 24))


def train_posterior(data, out=None, *, flow_config: F.FlowConfig | None = None,
                    train_config=None, seed: int = 0, prior: P.Prior | None = None,
                    bands=None, resume: bool = False, band_dropout: float | None = None,
                    min_bands: int = 2, support_grid: int | None = None, mesh=None, devices=None,
                    theta_space: str = "box") -> tuple[AmortizedPosterior, object]:
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
    from .masking import BandDropout, TrainingSupport

    from . import simulation as S
    from . import train as T

    if theta_space not in THETA_SPACES:
        raise ValueError(f"theta_space must be one of {THETA_SPACES}, got {theta_space!r}")
    if isinstance(data, (str, os.PathLike)):
        source = S.ShardDataset(data)
        man = source.manifest
        prior = _prior_from_dict(man["config"]["prior"])
        bands = tuple(man["bands"])
        lo = np.full(source.d_context, np.inf)
        hi = np.full(source.d_context, -np.inf)
        tot, cnt = np.zeros(source.d_context), 0
        for i in range(len(source.entries)):
            _, x = source._load(i)
            lo, hi = np.minimum(lo, x.min(0)), np.maximum(hi, x.max(0))
            tot, cnt = tot + x.sum(0, dtype=np.float64), cnt + x.shape[0]
        support = TrainingSupport.empty(lo, hi, bands, n_grid=_grid_size(support_grid, cnt))
        for i in range(len(source.entries)):
            support.accumulate(source._load(i)[1])
        x_mean = tot / max(cnt, 1)
    else:
        if prior is None or bands is None:
            raise ValueError("in-memory data needs prior= and bands=")
        source = T.ArrayData(data["theta"], data["x"])
        lo, hi = source.x.min(0), source.x.max(0)
        support = TrainingSupport.from_x(source.x, bands,
                                         n_grid=_grid_size(support_grid, source.n))
        x_mean = source.x.mean(0, dtype=np.float64)
    if theta_space == "logit":
        source = LogitTheta(source, *P.sampling_bounds(prior))
    meta_mask = None
    if band_dropout is not None:
        nb = len(tuple(bands))
        fill = np.asarray(x_mean[:2 * nb], np.float32)
        source = BandDropout(source, fill, p_drop=band_dropout, min_bands=min_bands, seed=seed)
        meta_mask = {"fill": fill.tolist(), "p_drop": float(band_dropout),
                     "min_bands": int(min_bands), "layout": "[mags', sigma_mags', z, mask]"}
    fc = flow_config or F.FlowConfig.small(source.d_theta, source.d_context, seed=seed)
    tc = train_config or T.TrainConfig(seed=seed)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        tc = dataclasses.replace(tc, checkpoint_dir=str(Path(out) / "training"))
    if devices is not None:
        if mesh is not None:
            raise ValueError("give mesh= or devices=, not both")
        if not (isinstance(devices, (int, np.integer)) and int(devices) == 1):
            from . import parallel as par

            mesh = par.make_mesh(None if devices == "all" else devices)
    res = T.fit(seed, tc, fc, source,
                resume_from=(str(Path(out) / "training") if (resume and out) else None),
                mesh=mesh)
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
