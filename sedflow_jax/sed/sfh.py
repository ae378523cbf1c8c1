"""PROVABGS star-formation and metallicity histories (spec §3, §4, §8), pure JAX.

All times are lookback times from the observed epoch [Gyr]. The NMF bases are piecewise-linear
through 50 nodes with linear extrapolation and are truncated at the age of the universe t_age.

Fixed 42-bin layout (spec §3.2): master edges e_0 = 0, e_k = 10^(6.05 + 0.1(k-1) - 9) Gyr
(k = 1..41), e_42 = 13.8. For a galaxy, edges = min(master, t_age) with the last edge = t_age, so
bins whose lower master edge >= t_age have zero width (and zero mass). For t_age > 11.2202 Gyr
(z < ~0.2) all 42 bins are populated, as upstream.
"""
from __future__ import annotations

import functools
from importlib import resources
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

N_BINS = 42
#: master bin edges [Gyr], (43,)
MASTER_EDGES = np.concatenate(
    [[0.0], 10.0 ** (6.05 + 0.1 * np.arange(41) - 9.0), [13.8]]
)
#: PROVABGS metallicity clip (MIST limits, 0.0142 * 10^[-2.5, 0.5])
Z_MIN, Z_MAX = 4.49043431e-5, 4.49043431e-2


class NMFBases(NamedTuple):
    """NMF basis tables (numpy float64).

    t : (50,) ascending lookback-time nodes [Gyr].
    sfh : (4, 50) SFH bases in beta order (file rows [2, 0, 1, 3]).
    zh : (2, 50) metallicity-history bases in gamma order.
    sfh_slopes : (4, 50) slope of each segment (the last repeats: linear extrapolation).
    sfh_cum_nodes : (4, 50) cumulative integral from t=0 (with linear extrapolation below t[0])
        to each node [basis units x Gyr].
    """

    t: np.ndarray
    sfh: np.ndarray
    zh: np.ndarray
    sfh_slopes: np.ndarray
    sfh_cum_nodes: np.ndarray


def _slopes(t, s):
    """Per-node slopes of the piecewise-linear interpolant; the last repeats (extrapolation)."""
    m = np.diff(s, axis=-1) / np.diff(t)
    return np.concatenate([m, m[..., -1:]], axis=-1)


@functools.lru_cache(maxsize=1)
def load_nmf_bases() -> NMFBases:
    """Read the shipped PROVABGS NMF tables (sedflow_jax/data/nmf, MIT licence)."""
    d = resources.files("sedflow_jax") / "data" / "nmf"
    with resources.as_file(d) as p:
        t = np.loadtxt(p / "sfh_t_int.txt")[::-1].copy()
        sfh_file = np.loadtxt(p / "NMF_2basis_SFH_components_nowgt_lin_Nc4.txt")[:, ::-1]
        zh_file = np.loadtxt(p / "NMF_2basis_Z_components_nowgt_lin_Nc2.txt")[:, ::-1]
    sfh = sfh_file[[2, 0, 1, 3]].copy()
    zh = zh_file.copy()
    # cumulative integral from 0: the segment [0, t0] uses the first segment's slope
    m = _slopes(t, sfh)
    c0 = sfh[:, 0] * t[0] - 0.5 * m[:, 0] * t[0] ** 2
    seg = 0.5 * (sfh[:, 1:] + sfh[:, :-1]) * np.diff(t)
    cum = np.concatenate([c0[:, None], c0[:, None] + np.cumsum(seg, axis=1)], axis=1)
    return NMFBases(t=t, sfh=sfh, zh=zh, sfh_slopes=m, sfh_cum_nodes=cum)


def interp_extrap(t, nodes_t, nodes_v):
    """Piecewise-linear interpolation with linear extrapolation at both ends.

    t : (...,) ; nodes_t : (n,) ; nodes_v : (k, n). Returns (k, ...) .
    """
    nodes_t = jnp.asarray(nodes_t, t.dtype)
    nodes_v = jnp.asarray(nodes_v, t.dtype)
    n = nodes_t.shape[0]
    j = jnp.clip(jnp.searchsorted(nodes_t, t, side="right") - 1, 0, n - 2)
    f = (t - nodes_t[j]) / (nodes_t[j + 1] - nodes_t[j])
    return nodes_v[:, j] * (1.0 - f) + nodes_v[:, j + 1] * f


def cumulative_integral(t, bases: NMFBases):
    """Integral of each SFH basis from lookback 0 to t (exact for the extrapolating linear spline).

    t : (...,) [Gyr]. Returns (4, ...).
    """
    tn = jnp.asarray(bases.t, t.dtype)
    s = jnp.asarray(bases.sfh, t.dtype)
    m = jnp.asarray(bases.sfh_slopes, t.dtype)
    c = jnp.asarray(bases.sfh_cum_nodes, t.dtype)
    j = jnp.clip(jnp.searchsorted(tn, t, side="right") - 1, 0, tn.shape[0] - 1)
    dt = t - tn[j]
    return c[:, j] + s[:, j] * dt + 0.5 * m[:, j] * dt**2


class BinLayout(NamedTuple):
    """The galaxy's 42-bin layout. All (42,) except t_age (scalar) [Gyr]."""

    edges_lo: jnp.ndarray
    edges_hi: jnp.ndarray
    centres: jnp.ndarray
    widths: jnp.ndarray
    full: jnp.ndarray  # bin entirely below t_age (its master edges are its edges)
    t_age: jnp.ndarray


def bin_layout(t_age) -> BinLayout:
    """Bin edges truncated at ``t_age`` (scalar, Gyr)."""
    master = jnp.asarray(MASTER_EDGES, t_age.dtype)
    lo = jnp.minimum(master[:-1], t_age)
    hi = jnp.concatenate([jnp.minimum(master[1:-1], t_age), t_age[None]])
    return BinLayout(
        edges_lo=lo,
        edges_hi=hi,
        centres=0.5 * (lo + hi),
        widths=hi - lo,
        full=master[1:] <= t_age,
        t_age=t_age,
    )


def nmf_mass_fractions(beta, layout: BinLayout, bases: NMFBases):
    """Mass fraction formed in each bin by the NMF SFH (combine, then normalise; spec §3.3).

    beta : (4,). Returns (42,) summing to 1 (zero-width bins get 0).
    """
    return mass_fractions(beta, nmf_bin_masses(layout, bases))


def mass_fractions(beta, bin_masses):
    """(42,) mass fractions of the SFH beta (4,) from :func:`nmf_bin_masses` (4, 42)."""
    m = beta @ bin_masses
    return m / jnp.sum(m)


def nmf_bin_masses(layout: BinLayout, bases: NMFBases):
    """(4, 42) integral of each SFH basis over each bin (depends on the redshift only)."""
    return (cumulative_integral(layout.edges_hi, bases)
            - cumulative_integral(layout.edges_lo, bases))


def metallicity(t, gamma, bases: NMFBases, z_clip=(Z_MIN, Z_MAX)):
    """NMF metallicity history Z(t) = clip(gamma1 z1(t) + gamma2 z2(t)) (absolute Z). t: (...,)."""
    return metallicity_from_bases(gamma, metallicity_bases(t, bases), z_clip)


def metallicity_from_bases(gamma, zt, z_clip=(Z_MIN, Z_MAX)):
    """clip(gamma1 z1 + gamma2 z2) for the bases zt (2, ...) of :func:`metallicity_bases`."""
    return jnp.clip(jnp.tensordot(gamma, zt, axes=1), z_clip[0], z_clip[1])


def metallicity_bases(t, bases: NMFBases):
    """(2, ...) the two NMF metallicity bases at lookback times t (...,) [Gyr]."""
    return interp_extrap(t, bases.t, bases.zh)


def burst_bin_onehot(tburst, layout: BinLayout):
    """(42,) one-hot of the bin containing ``tburst`` (zeros if tburst >= t_age)."""
    return ((layout.edges_lo <= tburst) & (tburst < layout.edges_hi)).astype(layout.centres.dtype)


def last_bin_centre(layout: BinLayout):
    """Centre of the galaxy's last non-empty bin (the upstream FSPS path's shadowed ``tage``)."""
    nonempty = layout.widths > 0
    return jnp.max(jnp.where(nonempty, layout.centres, 0.0))


def average_sfr_fraction(delta, w, layout: BinLayout):
    """NMF mass fraction formed within lookback ``delta`` [Gyr] (constant SFR within a bin)."""
    safe = jnp.where(layout.widths > 0, layout.widths, 1.0)
    frac = jnp.clip((delta - layout.edges_lo) / safe, 0.0, 1.0)
    return jnp.sum(w * frac)
