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


@dataclasses.dataclass
class AmortizedPosterior:
    """A trained flow bound to its prior, bands and the training set's x range."""

    flow: F.Flow
    prior: P.Prior
    bands: tuple
    x_lo: np.ndarray
    x_hi: np.ndarray
    meta: dict = dataclasses.field(default_factory=dict)

    # ------------------------------------------------------------------ support checks
    def out_of_support(self, xs) -> np.ndarray:
        """(m,) True where a context lies outside the training range (or is not finite)."""
        xs = np.atleast_2d(np.asarray(xs, float))
        ok = np.isfinite(xs).all(1) & (xs >= self.x_lo).all(1) & (xs <= self.x_hi).all(1)
        return ~ok

    def _in_prior(self, s):
        return np.asarray(P.in_support(self.prior, jnp.asarray(s)))

    # ------------------------------------------------------------------ sampling
    def log_prob(self, s, x):
        """log p(s | x) of the flow (sampling space; not renormalised for the rejection)."""
        return F.log_prob(self.flow, s, x)

    def sample(self, key, x_obs, n: int, *, max_rounds: int = 20) -> Samples:
        """``n`` posterior draws for one context x_obs (d_x,): a :class:`Samples` without m axis."""
        out = self.sample_batched(key, np.asarray(x_obs, float)[None], n, max_rounds=max_rounds)
        return Samples(*(a[0] for a in out))

    def sample_batched(self, key, xs, n: int, *, max_rounds: int = 20,
                       max_rows: int = 65536) -> Samples:
        """``n`` draws for each of m contexts xs (m, d_x), with rejection to the prior box.

        Galaxies short of ``n`` accepted draws are redrawn (fresh keys) for up to ``max_rounds``
        rounds; rows still missing are NaN and the galaxy is flagged ``low_acceptance``.
        Non-finite contexts are not sampled (all NaN, acceptance 0, ood True).
        """
        xs = np.atleast_2d(np.asarray(xs, np.float32))
        m, d = xs.shape[0], self.flow.config.d_theta
        ood = self.out_of_support(xs)
        finite = np.isfinite(xs).all(1)
        s_out = np.full((m, n, d), np.nan, np.float32)
        filled = np.zeros(m, int)
        drawn = np.zeros(m, int)
        inside = np.zeros(m, int)
        todo = np.flatnonzero(finite)
        for r in range(max_rounds):
            if todo.size == 0:
                break
            k = jax.random.fold_in(key, r)
            draws = np.asarray(F.sample_batched(self.flow, k, xs[todo], n, max_rows=max_rows))
            ok = self._in_prior(draws.reshape(-1, d)).reshape(todo.size, n)
            drawn[todo] += n
            inside[todo] += ok.sum(1)
            for i, g in enumerate(todo):
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


def train_posterior(data, out=None, *, flow_config: F.FlowConfig | None = None,
                    train_config=None, seed: int = 0, prior: P.Prior | None = None,
                    bands=None, resume: bool = False) -> tuple[AmortizedPosterior, object]:
    """Train SEDflow's flow on a training set and bundle it as an :class:`AmortizedPosterior`.

    data : a training-set folder written by :func:`sedflow_jax.simulation.simulate` (streamed
        from disk, kept rows only; prior and bands read from its manifest), or a dict with
        'theta' (n, 11) sampling-space targets and 'x' (n, d_x) plus ``prior`` and ``bands``.
    out : folder for the checkpoint, ``posterior.json`` and ``loss.png`` (None: not saved).
    Returns (posterior, TrainResult).
    """
    from . import simulation as S
    from . import train as T

    if isinstance(data, (str, os.PathLike)):
        source = S.ShardDataset(data)
        man = source.manifest
        prior = _prior_from_dict(man["config"]["prior"])
        bands = tuple(man["bands"])
        lo = np.full(source.d_context, np.inf)
        hi = np.full(source.d_context, -np.inf)
        for i in range(len(source.entries)):
            _, x = source._load(i)
            lo, hi = np.minimum(lo, x.min(0)), np.maximum(hi, x.max(0))
    else:
        if prior is None or bands is None:
            raise ValueError("in-memory data needs prior= and bands=")
        source = T.ArrayData(data["theta"], data["x"])
        lo, hi = source.x.min(0), source.x.max(0)
    fc = flow_config or F.FlowConfig.small(source.d_theta, source.d_context, seed=seed)
    tc = train_config or T.TrainConfig(seed=seed)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        tc = dataclasses.replace(tc, checkpoint_dir=str(Path(out) / "training"))
    res = T.fit(seed, tc, fc, source,
                resume_from=(str(Path(out) / "training") if (resume and out) else None))
    post = AmortizedPosterior(flow=res.flow, prior=prior, bands=tuple(bands),
                              x_lo=np.asarray(lo, float), x_hi=np.asarray(hi, float),
                              meta={"best_epoch": res.best_epoch,
                                    "best_val_loss": float(res.best_val_loss),
                                    "n_train": res.n_train, "n_val": res.n_val,
                                    "stopped_early": bool(res.stopped_early),
                                    "flow_config": fc.to_dict()})
    if out is not None:
        post.save(out)
        T.plot_loss(res.history, Path(out) / "loss.png", best_epoch=res.best_epoch)
    return post, res
