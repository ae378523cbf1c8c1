"""The output of one MCMC run (:class:`MCMCResult`: draws, physical parameters, diagnostics,
timings; ArviZ export) and its ``.npz`` file (:meth:`MCMCResult.save`, :func:`load_result`)."""
from __future__ import annotations

import json
from typing import NamedTuple, Optional

import numpy as np

from ..util import atomic_output, jsonable

__all__ = ["MCMCResult", "load_result", "result_arrays", "write_npz"]


class MCMCResult(NamedTuple):
    """Output of one MCMC run.

    samples : (chains, draws, d) draws in the target's coordinates (the 11-dim sampling space
        for a galaxy); for ensembles, chains = walkers.
    theta : (chains, draws, p) physical parameters (12 for a galaxy) or None.
    log_density : (chains, draws) log posterior (constrained coordinates, up to a constant) or None.
    names, param_names : coordinate / physical parameter names.
    rhat, ess_bulk, ess_tail : (d,) rank-normalised split R-hat and bulk / tail ESS
        (:func:`convergence`; for ensembles the conservative :func:`ensemble_convergence`).
    num_divergences : NUTS divergent transitions after warmup (0 for ensembles).
    wall_time : seconds of the whole call (init + sampling incl. any compilation + diagnostics).
    sample_time : seconds of the sampler run alone (incl. compilation on a first call).
    init_time : seconds of the initialisation (MAP fit).
    sampler : 'nuts' | 'ess' | 'aies'.
    info : dict of settings and sampler statistics (step size, mean tree size, acceptance,
        initial points, MAP, gamma density, ...).
    """

    samples: np.ndarray
    theta: Optional[np.ndarray]
    log_density: Optional[np.ndarray]
    names: tuple
    param_names: Optional[tuple]
    rhat: np.ndarray
    ess_bulk: np.ndarray
    ess_tail: np.ndarray
    num_divergences: int
    wall_time: float
    sample_time: float
    init_time: float
    sampler: str
    info: dict

    @property
    def flat_samples(self) -> np.ndarray:
        """(chains * draws, d)."""
        return self.samples.reshape(-1, self.samples.shape[-1])

    @property
    def flat_theta(self) -> Optional[np.ndarray]:
        return None if self.theta is None else self.theta.reshape(-1, self.theta.shape[-1])

    def converged(self, rhat_max: float = 1.01, ess_min: float = 400.0) -> bool:
        """R-hat < rhat_max and bulk and tail ESS > ess_min for every coordinate."""
        r, eb, et = self.rhat, self.ess_bulk, self.ess_tail
        return bool(np.all(np.nan_to_num(r, nan=np.inf) < rhat_max)
                    and np.all(np.nan_to_num(eb, nan=0) > ess_min)
                    and np.all(np.nan_to_num(et, nan=0) > ess_min))

    def best(self) -> np.ndarray:
        """The draw with the highest log posterior (d,) (PROVABGS's best fit)."""
        if self.log_density is None:
            raise ValueError("log_density was not computed (log_density=False)")
        i = np.nanargmax(self.log_density.reshape(-1))
        return self.flat_samples[i]

    def summary(self) -> dict:
        """JSON-ready dict: convergence per coordinate, 16/50/84 % of coordinates and params."""
        out = dict(sampler=self.sampler, chains=int(self.samples.shape[0]),
                   draws=int(self.samples.shape[1]), num_divergences=int(self.num_divergences),
                   wall_time=float(self.wall_time), sample_time=float(self.sample_time),
                   init_time=float(self.init_time), converged=self.converged(),
                   rhat_max=_nanmax(self.rhat), ess_bulk_min=_nanmin(self.ess_bulk),
                   ess_tail_min=_nanmin(self.ess_tail))
        for i, n in enumerate(self.names):
            out[f"rhat_{n}"] = float(self.rhat[i])
            out[f"ess_bulk_{n}"] = float(self.ess_bulk[i])
            out[f"ess_tail_{n}"] = float(self.ess_tail[i])
        cols = [(self.names, self.flat_samples)]
        if self.theta is not None:
            cols.append((self.param_names, self.flat_theta))
        for names, arr in cols:
            with np.errstate(all="ignore"):
                q = np.nanpercentile(arr, [16, 50, 84], axis=0)
            for i, n in enumerate(names):
                out[f"{n}_p16"], out[f"{n}_p50"], out[f"{n}_p84"] = (float(q[0, i]), float(q[1, i]),
                                                                      float(q[2, i]))
        if self.log_density is not None:
            out["log_density_max"] = _nanmax(self.log_density)
        return out

    def to_inference_data(self):
        """An ArviZ ``InferenceData`` (needs ``arviz``): posterior variables = coordinates, plus
        the physical parameters not among them; sample_stats: lp, diverging (NUTS)."""
        try:
            import arviz as az
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("to_inference_data() needs arviz (pip install arviz)") from exc
        post = {n: self.samples[..., i] for i, n in enumerate(self.names)}
        if self.theta is not None:
            for i, n in enumerate(self.param_names):
                if n not in post:
                    post[n] = self.theta[..., i]
        stats = {}
        if self.log_density is not None:
            stats["lp"] = self.log_density
        if "diverging" in self.info.get("_arrays", {}):
            stats["diverging"] = self.info["_arrays"]["diverging"]
        attrs = {k: v for k, v in jsonable(self.info).items() if not k.startswith("_")}
        attrs = {k: (json.dumps(v) if not isinstance(v, (str, int, float)) else v)
                 for k, v in attrs.items()}
        attrs["sampler"] = self.sampler
        attrs["wall_time"] = float(self.wall_time)
        return az.from_dict(posterior=post, sample_stats=stats or None, attrs=attrs)

    def to_netcdf(self, path) -> str:
        """Write :meth:`to_inference_data` to a netCDF file; returns the path."""
        idata = self.to_inference_data()
        idata.to_netcdf(str(path))
        return str(path)

    def save(self, path) -> str:
        """Write samples, theta, log_density, diagnostics and info to an ``.npz`` file."""
        write_npz(path, result_arrays(self))
        return str(path)


def result_arrays(res: MCMCResult) -> dict:
    """The arrays :meth:`MCMCResult.save` writes (``meta_json``: names, timings, info)."""
    arrays = dict(samples=res.samples, rhat=res.rhat, ess_bulk=res.ess_bulk,
                  ess_tail=res.ess_tail)
    if res.theta is not None:
        arrays["theta"] = res.theta
    if res.log_density is not None:
        arrays["log_density"] = res.log_density
    for k, v in res.info.get("_arrays", {}).items():
        arrays[f"info_{k}"] = v
    meta = dict(names=list(res.names),
                param_names=None if res.param_names is None else list(res.param_names),
                num_divergences=int(res.num_divergences), wall_time=float(res.wall_time),
                sample_time=float(res.sample_time), init_time=float(res.init_time),
                sampler=res.sampler,
                info={k: v for k, v in jsonable(res.info).items() if not k.startswith("_")})
    arrays["meta_json"] = np.asarray(json.dumps(meta))
    return arrays


def write_npz(path, arrays: dict) -> None:
    """``arrays`` as a compressed ``.npz`` at ``path``, written atomically."""
    with atomic_output(path) as (tmp,):
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)


def load_result(path) -> MCMCResult:
    """Read an :class:`MCMCResult` written by :meth:`MCMCResult.save`."""
    with np.load(path, allow_pickle=False) as f:
        meta = json.loads(str(f["meta_json"]))
        info = dict(meta["info"])
        extra = {k[5:]: f[k] for k in f.files if k.startswith("info_")}
        if extra:
            info["_arrays"] = extra
        return MCMCResult(
            samples=f["samples"], theta=f["theta"] if "theta" in f.files else None,
            log_density=f["log_density"] if "log_density" in f.files else None,
            names=tuple(meta["names"]),
            param_names=None if meta["param_names"] is None else tuple(meta["param_names"]),
            rhat=f["rhat"], ess_bulk=f["ess_bulk"], ess_tail=f["ess_tail"],
            num_divergences=meta["num_divergences"], wall_time=meta["wall_time"],
            sample_time=meta["sample_time"], init_time=meta["init_time"],
            sampler=meta["sampler"], info=info)


def _nanmax(a):
    a = np.asarray(a, np.float64)
    return float(np.nanmax(a)) if np.isfinite(a).any() else float("nan")


def _nanmin(a):
    a = np.asarray(a, np.float64)
    return float(np.nanmin(a)) if np.isfinite(a).any() else float("nan")

