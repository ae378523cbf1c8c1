"""The PROVABGS SED model over an SSP grid: photometry, spectra and derived properties.

theta (..., 12) = [logmstar, beta1, beta2, beta3, beta4, fburst, tburst, gamma1, gamma2,
                   tau_bc, tau_ism, n_dust]
    logmstar : log10 total stellar mass *formed* [Msun]
    beta1..4 : NMF SFH weights (>= 0, sum to 1)
    fburst   : fraction of formed mass in the burst; tburst: burst lookback time [Gyr]
    gamma1,2 : NMF metallicity-history weights (absolute Z units)
    tau_bc   : birth-cloud optical depth (young stars); tau_ism: diffuse ISM optical depth
    n_dust   : ISM curve slope offset w.r.t. Calzetti
z : redshift, 0 < z <= config.z_max.

Assembly (spec §5.4):
    L = 10^logM T_ism [ (1-fb) sum_k w_k (Y_k T_bc + O_k) + fb I_b S_b ]
with Y_k / O_k the young / old node parts of the SSP at the bin centre age and metallicity.

Speed: bins entirely below t_age have galaxy-independent centres, so their age-interpolated SSPs
are precomputed per metallicity node (``fixed`` bases, (n_met, 42, n_wave)); a galaxy then needs
one small contraction with its (n_met, 42) metallicity x mass coefficients, plus two explicit SSP
look-ups: the bin that straddles t_age and the burst. No (n_age x n_met x n_wave) array is built
per galaxy; photometry only uses the wavelength slice the filters can see.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from . import cosmology, dust, photometry, sfh, ssp

from .params import N_PARAMS, PARAM_NAMES


class ModelInputError(ValueError):
    """Invalid theta, redshift or configuration passed to the checked (eager) API."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Options of the PROVABGS model. Defaults follow the upstream code (spec §6, §5.4).

    t_bc_gyr : SSP nodes at ages <= this get birth-cloud dust (FSPS dust_tesc: 0.01 Gyr; paper 0.1).
    bc_index : birth-cloud curve exponent (FSPS dust1_index: -1.0; paper -0.7).
    zsol_model : Z used to map absolute Z onto the grid's logzsol axis (PROVABGS: 0.019).
    z_clip : clip of the metallicity history (MIST limits).
    burst_compat_bug : reproduce the upstream FSPS-path burst shadowing bug (spec §5.4).
    z_max : largest redshift the model accepts (sets the photometry wavelength slice).
    dtype : 'float32' (default) or 'float64' (needs jax_enable_x64).
    """

    t_bc_gyr: float = 0.01
    bc_index: float = -1.0
    zsol_model: float = 0.019
    z_clip: tuple = (sfh.Z_MIN, sfh.Z_MAX)
    burst_compat_bug: bool = False
    z_max: float = 1.0
    dtype: str = "float32"

    @classmethod
    def paper(cls, **kw):
        """The papers' birth-cloud description (100 Myr, exponent -0.7) instead of the code's."""
        return cls(t_bc_gyr=0.1, bc_index=-0.7, **kw)


class SSPTables(NamedTuple):
    """Galaxy-independent arrays for one wavelength range (a pytree of jnp arrays)."""

    spec: jnp.ndarray  # (n_met, n_age, n_w)
    young: jnp.ndarray  # (n_age,) 1.0 for birth-cloud nodes
    log_age: jnp.ndarray  # (n_age,)
    logzsol: jnp.ndarray  # (n_met,)
    # the SSPs at the fixed bins' ages, bin-major: (n_bins * n_met, n_w), row k * n_met + m for
    # bin k and metallicity node m, so that the sum over bins and metallicities is a plain
    # matrix-vector product. The (n_met, n_bins, n_w) layout made XLA transpose the whole table
    # on every evaluation inside a compiled loop (a sampler's): a gradient cost 5x more there
    fixed_young: jnp.ndarray  # (n_young_bins * n_met, n_w)
    fixed_old: jnp.ndarray  # (42 * n_met, n_w)
    dust: dust.DustTables


class Tables(NamedTuple):
    nmf: sfh.NMFBases
    phot_ssp: SSPTables
    phot: photometry.PhotTables
    surv: jnp.ndarray  # (n_met, n_age) surviving fraction (NaN if the grid has none)


class DerivedProps(NamedTuple):
    """Derived properties (each (...,)).

    logmstar_formed, logmstar_surviving : log10 Msun (surviving: NaN if the grid has no table).
    sfr_100myr, sfr_1gyr : average SFR over the last 0.1 / 1 Gyr [Msun/yr].
    z_mw : mass-weighted metallicity (absolute Z); t_mw : mass-weighted age [Gyr]; t_age [Gyr].
    """

    logmstar_formed: jnp.ndarray
    logmstar_surviving: jnp.ndarray
    sfr_100myr: jnp.ndarray
    sfr_1gyr: jnp.ndarray
    z_mw: jnp.ndarray
    t_mw: jnp.ndarray
    t_age: jnp.ndarray


class SED(NamedTuple):
    """wave_rest, wave_obs : (n_wave,) [A]; flux_lambda : (..., n_wave) observed f_lambda
    [1e-17 erg/s/cm^2/A]; lum_lambda : (..., n_wave) rest L_lambda [Lsun/A] (whole galaxy)."""

    wave_rest: np.ndarray
    wave_obs: jnp.ndarray
    flux_lambda: jnp.ndarray
    lum_lambda: jnp.ndarray


# --------------------------------------------------------------------------------------------
# precomputation (numpy, float64)
# --------------------------------------------------------------------------------------------


def _np_age_weights(log_age, nodes):
    j = np.clip(np.searchsorted(nodes, log_age, side="right") - 1, 0, len(nodes) - 2)
    w_lo = np.clip((nodes[j + 1] - log_age) / (nodes[j + 1] - nodes[j]), 0.0, 1.0)
    return j, w_lo


def _bin_major(a):
    """(n_met, n_bins, n_w) -> (n_bins * n_met, n_w), row k * n_met + m."""
    return np.transpose(a, (1, 0, 2)).reshape(-1, a.shape[2])


def _ssp_tables(grid: ssp.SSPGrid, wsl: slice, cfg: ModelConfig, dtype) -> SSPTables:
    spec = np.asarray(grid.spec, np.float64)[:, :, wsl]
    la = np.asarray(grid.log_age_yr, float)
    young = (la <= np.log10(cfg.t_bc_gyr * 1e9) + 1e-3).astype(float)
    centres = 0.5 * (sfh.MASTER_EDGES[:-1] + sfh.MASTER_EDGES[1:])
    j, w_lo = _np_age_weights(np.log10(centres * 1e9), la)
    fy = np.zeros((spec.shape[0], sfh.N_BINS, spec.shape[2]))
    fo = np.zeros_like(fy)
    for k in range(sfh.N_BINS):
        for jj, ww in ((j[k], w_lo[k]), (j[k] + 1, 1.0 - w_lo[k])):
            (fy if young[jj] else fo)[:, k, :] += ww * spec[:, jj, :]
    has_young = np.any(fy != 0, axis=(0, 2))
    n_young = int(np.nonzero(has_young)[0].max() + 1) if has_young.any() else 1
    return SSPTables(
        spec=jnp.asarray(spec, dtype),
        young=jnp.asarray(young, dtype),
        log_age=jnp.asarray(la, dtype),
        logzsol=jnp.asarray(grid.logzsol, dtype),
        fixed_young=jnp.asarray(_bin_major(fy[:, :n_young]), dtype),
        fixed_old=jnp.asarray(_bin_major(fo), dtype),
        dust=dust.dust_tables(grid.wave[wsl], cfg.bc_index, dtype),
    )


# --------------------------------------------------------------------------------------------
# kernels (one galaxy, pure JAX, branch-free)
# --------------------------------------------------------------------------------------------


def _met_coord(Z, cfg: ModelConfig):
    return jnp.log10(Z / cfg.zsol_model)


def _ssp_lookup(log_age, x, T: SSPTables):
    """Young and old parts of one SSP at (log age/yr, logzsol x): two (n_w,) arrays."""
    j, wa = ssp.age_weights(log_age, T.log_age)
    m, wm = ssp.met_weights(x, T.logzsol)
    rows = T.spec[jnp.array([m, m, m + 1, m + 1]), jnp.array([j, j + 1, j, j + 1])]  # (4, n_w)
    w = jnp.array([wm * wa, wm * (1 - wa), (1 - wm) * wa, (1 - wm) * (1 - wa)])
    yf = T.young[jnp.array([j, j + 1, j, j + 1])]
    return (w * yf) @ rows, (w * (1 - yf)) @ rows


def _interp_table(table, log_age, x, T: SSPTables):
    """Bilinear (log age clamped, logzsol extrapolated) value of an (n_met, n_age) table."""
    j, wa = ssp.age_weights(log_age, T.log_age)
    m, wm = ssp.met_weights(x, T.logzsol)
    return (wm * (wa * table[m, j] + (1 - wa) * table[m, j + 1])
            + (1 - wm) * (wa * table[m + 1, j] + (1 - wa) * table[m + 1, j + 1]))


class _Parts(NamedTuple):
    """Intermediate quantities shared by spectra, photometry and derived properties."""

    logm: jnp.ndarray
    fburst: jnp.ndarray
    tburst: jnp.ndarray
    layout: sfh.BinLayout
    w: jnp.ndarray  # (42,) NMF mass fractions
    Zk: jnp.ndarray  # (42,) bin metallicities
    Zb: jnp.ndarray  # burst metallicity
    i_burst: jnp.ndarray  # burst present in the spectrum (0/1)
    dl_mpc: jnp.ndarray


class _ZParts(NamedTuple):
    """What depends on the redshift only (shared by every draw of one galaxy)."""

    layout: sfh.BinLayout
    mass_per_beta: jnp.ndarray  # (4, 42) mass of each SFH basis formed in each bin
    z_nodes: jnp.ndarray  # (2, 42) the metallicity bases at the bin centres
    dl_mpc: jnp.ndarray


def _z_parts(z, nmf: sfh.NMFBases) -> _ZParts:
    layout = sfh.bin_layout(cosmology.age_gyr(z))
    return _ZParts(layout, sfh.nmf_bin_masses(layout, nmf),
                   sfh.metallicity_bases(layout.centres, nmf), cosmology.lum_dist_mpc(z))


def _theta_parts(theta, zp: _ZParts, nmf: sfh.NMFBases, cfg: ModelConfig) -> _Parts:
    layout = zp.layout
    w = sfh.mass_fractions(theta[1:5], zp.mass_per_beta)
    gamma = theta[7:9]
    Zk = sfh.metallicity_from_bases(gamma, zp.z_nodes, cfg.z_clip)
    tb = theta[6]
    Zb = sfh.metallicity(tb, gamma, nmf, cfg.z_clip)
    t_cut = sfh.last_bin_centre(layout) if cfg.burst_compat_bug else layout.t_age
    return _Parts(theta[0], theta[5], tb, layout, w, Zk, Zb,
                  (tb < t_cut).astype(theta.dtype), zp.dl_mpc)


def _parts(theta, z, nmf: sfh.NMFBases, cfg: ModelConfig) -> _Parts:
    return _theta_parts(theta, _z_parts(z, nmf), nmf, cfg)


def _rest_lum(theta, P: _Parts, T: SSPTables, cfg: ModelConfig):
    """Rest-frame L_lambda per Msun formed [Lsun/A] on T's wavelengths, (n_w,)."""
    lay = P.layout
    x = _met_coord(P.Zk, cfg)
    m, wm = ssp.met_weights(x, T.logzsol)
    n_met = T.logzsol.shape[0]
    wmet = (wm[:, None] * jax.nn.one_hot(m, n_met, dtype=x.dtype)
            + (1 - wm)[:, None] * jax.nn.one_hot(m + 1, n_met, dtype=x.dtype))  # (42, n_met)
    one_minus_fb = 1.0 - P.fburst
    coef = (one_minus_fb * P.w * lay.full)[:, None] * wmet  # (42, n_met)
    n_y = T.fixed_young.shape[0] // n_met
    young = coef[:n_y].reshape(-1) @ T.fixed_young
    old = coef.reshape(-1) @ T.fixed_old
    # the bin that straddles t_age (age depends on z): explicit look-up
    strad = (~lay.full) & (lay.widths > 0)
    has = jnp.any(strad)
    age_v = jnp.where(has, jnp.sum(jnp.where(strad, lay.centres, 0.0)), 1.0)
    x_v = jnp.sum(jnp.where(strad, x, 0.0))
    w_v = one_minus_fb * jnp.sum(jnp.where(strad, P.w, 0.0))
    yv, ov = _ssp_lookup(jnp.log10(age_v * 1e9), x_v, T)
    young = young + w_v * yv
    old = old + w_v * ov
    # burst: its own SSP at tburst, no birth-cloud dust
    yb, ob = _ssp_lookup(jnp.log10(P.tburst * 1e9), _met_coord(P.Zb, cfg), T)
    nobc = P.fburst * P.i_burst * (yb + ob)
    tau_bc, tau_ism, n_dust = theta[9], theta[10], theta[11]
    t_bc, t_ism = dust.transmissions(tau_bc, tau_ism, n_dust, T.dust)
    return t_ism * (young * t_bc + old + nobc)


def _phot_kernel(theta, z, tabs: Tables, cfg: ModelConfig):
    """Nanomaggies (n_filters,) of one galaxy."""
    P = _parts(theta, z, tabs.nmf, cfg)
    lum = _rest_lum(theta, P, tabs.phot_ssp, cfg)
    log_scale = P.logm * jnp.log(10.0) + jnp.log1p(z) - 2.0 * jnp.log(P.dl_mpc)
    return jnp.exp(log_scale + tabs.phot.log_k) * photometry.band_integrals(lum, z, tabs.phot)


#: galaxies evaluated together inside a batch; keeps the per-galaxy SSP look-ups in cache (a
#: plain vmap over 10^4+ galaxies is ~2x slower on CPU)
BLOCK = 256


def _pad_last_row(a, pad: int, xp):
    """``a`` (n, ...) with ``pad`` copies of its last row appended (``xp``: numpy or jax.numpy)."""
    if not pad:
        return a
    return xp.concatenate([a, xp.repeat(a[-1:], pad, axis=0)])


def _phot_batch(theta, z, tabs: Tables, cfg: ModelConfig):
    """Nanomaggies (n, n_filters) for theta (n, 12), z (n,): vmap in equal blocks of at most
    BLOCK galaxies. The rows are padded (with copies of the last) to a whole number of blocks:
    ``lax.map`` compiles a second copy of the kernel for a remainder (~1 s of compilation)."""
    n = z.shape[0]
    if n == 0:
        return jax.vmap(lambda t, zz: _phot_kernel(t, zz, tabs, cfg))(theta, z)
    nb = -(-n // BLOCK)
    b = -(-n // nb)  # <= BLOCK; pads fewer than nb rows
    pad = nb * b - n
    theta, z = _pad_last_row(theta, pad, jnp), _pad_last_row(z, pad, jnp)
    out = jax.lax.map(lambda a: _phot_kernel(a[0], a[1], tabs, cfg), (theta, z), batch_size=b)
    return out[:n] if pad else out


def _broadcast_rows(axis_size, in_batched, theta, z):
    """The (theta, z) a vmap rule sees, with the unbatched one broadcast along the new axis 0."""
    tb, zb = in_batched
    theta, z = jnp.asarray(theta), jnp.asarray(z)
    if not tb:
        theta = jnp.broadcast_to(theta, (axis_size,) + theta.shape)
    if not zb:
        z = jnp.broadcast_to(z, (axis_size,) + z.shape)
    return theta, z


def _any_batched(in_batched) -> bool:
    return any(jax.tree_util.tree_leaves(in_batched))


def _plain_vmap(fn, in_batched, *args):
    """``jax.vmap(fn)`` over the arguments that are batched (axis 0), for the rare call whose
    tables carry a batch axis (then no blocked path applies)."""
    axes = jax.tree_util.tree_map(lambda b: 0 if b else None, in_batched)
    return jax.vmap(fn, in_axes=axes)(*args), True


def _blocked_rows(cfg: ModelConfig):
    """``g(theta (n, 12), z (n,), tabs) -> (n, n_filters)``: :func:`_phot_batch`, whose vmap
    folds the new axis into the rows (so nested vmaps stay one blocked batch)."""

    @jax.custom_batching.custom_vmap
    def rows(theta, z, tabs):
        return _phot_batch(theta, z, tabs, cfg)

    @rows.def_vmap
    def _rows_vmap(axis_size, in_batched, theta, z, tabs):
        if _any_batched(in_batched[2]):
            return _plain_vmap(functools.partial(_phot_batch, cfg=cfg), in_batched, theta, z, tabs)
        theta, z = _broadcast_rows(axis_size, in_batched[:2], theta, z)  # (m, n, 12), (m, n)
        m, n = z.shape
        out = rows(theta.reshape(m * n, theta.shape[-1]), z.reshape(m * n), tabs)
        return out.reshape(m, n, out.shape[-1]), True

    return rows


def _is_symbolic_zero(t) -> bool:
    return isinstance(t, SymbolicZero)


def _zero_if_symbolic(t):
    return jnp.zeros(t.shape, t.dtype) if _is_symbolic_zero(t) else t


def _phot_kernel_fn(cfg: ModelConfig):
    """The per-galaxy kernel ``f(theta (12,), z (), tabs) -> (n_filters,)`` with two custom
    rules:

    * vmap (any nesting, z batched or broadcast, tables unbatched) evaluates the batch with
      :func:`_phot_batch` (blocks of BLOCK galaxies; a plain vmap of the kernel is ~5x slower on
      CPU at 1e5 rows);
    * differentiation (custom_jvp: forward and reverse mode, any order) is the plain kernel's
      own jvp, so gradients and their vmaps are those of :func:`_phot_kernel` (custom_vmap alone
      has no reverse-mode AD); the tables get no tangent unless one is given for them.
    Values equal the plain kernel's up to float rounding.
    """

    def plain(theta, z, tabs):
        return _phot_kernel(theta, z, tabs, cfg)

    rows = _blocked_rows(cfg)

    @jax.custom_batching.custom_vmap
    def primal(theta, z, tabs):
        return plain(theta, z, tabs)

    @primal.def_vmap
    def _primal_vmap(axis_size, in_batched, theta, z, tabs):
        if _any_batched(in_batched[2]):
            return _plain_vmap(plain, in_batched, theta, z, tabs)
        return rows(*_broadcast_rows(axis_size, in_batched[:2], theta, z), tabs), True

    @jax.custom_jvp
    def f(theta, z, tabs):
        return primal(theta, z, tabs)

    def _f_jvp(primals, tangents):
        theta, z, tabs = primals
        t_theta, t_z, t_tabs = tangents
        t_theta, t_z = _zero_if_symbolic(t_theta), _zero_if_symbolic(t_z)
        tab_leaves = jax.tree_util.tree_leaves(t_tabs, is_leaf=_is_symbolic_zero)
        if all(map(_is_symbolic_zero, tab_leaves)):  # the usual case: no tangent for the tables
            return jax.jvp(lambda a, b: plain(a, b, tabs), (theta, z), (t_theta, t_z))
        t_tabs = jax.tree_util.tree_map(_zero_if_symbolic, t_tabs, is_leaf=_is_symbolic_zero)
        return jax.jvp(plain, primals, (t_theta, t_z, t_tabs))

    f.defjvp(_f_jvp, symbolic_zeros=True)
    return f


def _sed_kernel(theta, z, tabs: Tables, full: SSPTables, cfg: ModelConfig, lsun_cgs):
    P = _parts(theta, z, tabs.nmf, cfg)
    lum = _rest_lum(theta, P, full, cfg) * 10.0 ** P.logm  # Lsun/A
    # f_lambda = L lsun / (4 pi d_L^2 (1+z)) in 1e-17 erg/s/cm^2/A
    k = lsun_cgs / (4.0 * np.pi * photometry.MPC_CM**2) * 1e17
    return lum * (k / (P.dl_mpc**2 * (1.0 + z))), lum


def _derived_kernel(theta, z, tabs: Tables, cfg: ModelConfig):
    return _derived_from_parts(_parts(theta, z, tabs.nmf, cfg), tabs, cfg)


def _derived_draws_kernel(theta, z, tabs: Tables, cfg: ModelConfig):
    """Derived properties of k draws theta (k, 12) of one galaxy at redshift z: the redshift's
    part computed once, then each draw (the values of :func:`_derived_kernel`)."""
    zp = _z_parts(z, tabs.nmf)
    return jax.vmap(lambda t: _derived_from_parts(_theta_parts(t, zp, tabs.nmf, cfg), tabs,
                                                  cfg))(theta)


def _derived_from_parts(P: _Parts, tabs: Tables, cfg: ModelConfig) -> "DerivedProps":
    lay = P.layout
    mass = 10.0 ** P.logm
    # SFH path: the burst counts only if it happened after the Big Bang (spec §3.4)
    fb_eff = P.fburst * (P.tburst < lay.t_age)
    frac = (1 - fb_eff) * P.w + fb_eff * sfh.burst_bin_onehot(P.tburst, lay)

    def sfr(delta):
        f = (1 - fb_eff) * sfh.average_sfr_fraction(delta, P.w, lay) + fb_eff * (P.tburst < delta)
        return mass * f / (1e9 * delta)

    T = tabs.phot_ssp
    la_k = jnp.log10(jnp.maximum(lay.centres, 1e-6) * 1e9)
    surv_k = jax.vmap(lambda a, x: _interp_table(tabs.surv, a, x, T))(la_k, _met_coord(P.Zk, cfg))
    surv_b = _interp_table(tabs.surv, jnp.log10(P.tburst * 1e9), _met_coord(P.Zb, cfg), T)
    surv = (1 - P.fburst) * jnp.sum(P.w * surv_k) + P.fburst * P.i_burst * surv_b
    return DerivedProps(
        logmstar_formed=P.logm,
        logmstar_surviving=P.logm + jnp.log10(surv),
        sfr_100myr=sfr(0.1),
        sfr_1gyr=sfr(1.0),
        z_mw=jnp.sum(frac * P.Zk),
        t_mw=jnp.sum(frac * lay.centres),
        t_age=lay.t_age,
    )


# --------------------------------------------------------------------------------------------
# the model object and its checked eager API
# --------------------------------------------------------------------------------------------


def _is_traced(*xs):
    return any(isinstance(x, jax.core.Tracer) for x in xs)


class SEDModel:
    """The PROVABGS SED model bound to an SSP grid and a set of filters.

    Eager methods (:meth:`photometry`, :meth:`sed`, :meth:`derived`, :meth:`magnitudes`) check
    their input and raise :class:`ModelInputError` instead of returning NaN; inside ``jit`` /
    ``grad`` (traced inputs) the checks are skipped and the same branch-free kernels run.
    For custom pipelines use :meth:`photometry_fn` (single galaxy, pure) and :attr:`phot_batch`.
    """

    def __init__(self, grid: ssp.SSPGrid, filters: Sequence[photometry.Filter], cfg: ModelConfig):
        if cfg.dtype not in ("float32", "float64"):
            raise ModelInputError(f"dtype must be 'float32' or 'float64', got {cfg.dtype!r}")
        if cfg.dtype == "float64" and not jax.config.jax_enable_x64:
            raise ModelInputError(
                "dtype='float64' needs jax.config.update('jax_enable_x64', True) first")
        if not (0 < cfg.z_max <= cosmology.Z_TABLE_MAX):
            raise ModelInputError(f"z_max must be in (0, {cosmology.Z_TABLE_MAX}]")
        self.grid, self.filters, self.config = grid, tuple(filters), cfg
        self.dtype = jnp.dtype(cfg.dtype)
        self.filter_names = tuple(f.name for f in self.filters)
        wsl = photometry.phot_slice(grid.wave, self.filters, cfg.z_max)
        nmf = sfh.load_nmf_bases()
        surv = (np.full(grid.spec.shape[:2], np.nan) if grid.surviving_frac is None
                else np.asarray(grid.surviving_frac, float))
        self.tables = Tables(
            nmf=nmf,
            phot_ssp=_ssp_tables(grid, wsl, cfg, self.dtype),
            phot=photometry.phot_tables(grid.wave[wsl], self.filters, grid.lsun_cgs, cfg.z_max,
                                         dtype=self.dtype),
            surv=jnp.asarray(surv, self.dtype),
        )
        self._full = None
        self.phot_batch = jax.jit(functools.partial(_phot_batch, cfg=cfg))
        self._phot_kernel = _phot_kernel_fn(cfg)
        # the closure holds device arrays: numpy leaves (the NMF bases, shared by every model)
        # passed into the kernel while tracing were once cached as float32 buffers that a later
        # float64 model's batch call then received
        kernel, tables = self._phot_kernel, jax.tree_util.tree_map(jnp.asarray, self.tables)
        self._phot_fn = lambda theta, z: kernel(theta, z, tables)
        self._derived_batch = jax.jit(jax.vmap(
            functools.partial(_derived_kernel, cfg=cfg), in_axes=(0, 0, None)))
        self._derived_draws = jax.jit(jax.vmap(
            functools.partial(_derived_draws_kernel, cfg=cfg), in_axes=(0, 0, None)))

    def __repr__(self):
        return (f"SEDModel(grid={self.grid.name!r}, filters={self.filter_names}, "
                f"config={self.config})")

    # ---------------- pure functions ----------------
    def photometry_fn(self):
        """Pure single-galaxy function ``f(theta (12,), z ()) -> nanomaggies (n_filters,)``.

        Compose it freely with jit / vmap / grad: ``jax.vmap`` of it (nested too, z batched or
        not) runs the blocked batch path of :meth:`photometry`, and derivatives are the plain
        kernel's. The same function object is returned on every call (jit caches are shared).

        It closes over the model's SSP tables (~40 MB at z_max = 1), which XLA then embeds in
        every program that uses it; :meth:`photometry_kernel` takes them as an argument instead.
        """
        return self._phot_fn

    def photometry_kernel(self):
        """Pure single-galaxy function ``f(theta (12,), z (), tables) -> nanomaggies
        (n_filters,)``: :meth:`photometry_fn` with the SSP tables as an explicit argument
        (``model.tables``, a pytree of arrays). Pass the tables through your ``jit``'s
        arguments: the program then holds no copy of them, so it compiles ~20 % faster and a
        persistent compilation cache stores kilobytes instead of tens of MB. vmap (tables
        unbatched) runs the blocked batch path; derivatives are the plain kernel's. The same
        function object on every call."""
        return self._phot_kernel

    # ---------------- input checking ----------------
    def _prepare(self, theta, z):
        if _is_traced(theta, z):
            theta = jnp.asarray(theta, self.dtype)
            z = jnp.asarray(z, self.dtype)
            shape = jnp.broadcast_shapes(theta.shape[:-1], jnp.shape(z))
            return (jnp.broadcast_to(theta, shape + (N_PARAMS,)).reshape(-1, N_PARAMS),
                    jnp.broadcast_to(z, shape).reshape(-1), shape)
        th = np.asarray(theta, dtype=float)
        zz = np.asarray(z, dtype=float)
        check_inputs(th, zz, self.config.z_max)
        shape = np.broadcast_shapes(th.shape[:-1], zz.shape)
        th = np.broadcast_to(th, shape + (N_PARAMS,)).reshape(-1, N_PARAMS)
        zz = np.broadcast_to(zz, shape).reshape(-1)
        return th.astype(self.dtype), zz.astype(self.dtype), shape

    # ---------------- public API ----------------
    def photometry(self, theta, z):
        """Nanomaggies, shape (..., n_filters), for theta (..., 12) and z (...) (broadcast)."""
        th, zz, shape = self._prepare(theta, z)
        out = _on_bucketed_rows(self.phot_batch, th, zz, self.tables)
        return out.reshape(shape + (len(self.filters),))

    def magnitudes(self, theta, z):
        """AB magnitudes, shape (..., n_filters)."""
        return photometry.nmgy_to_mag(self.photometry(theta, z))

    def _full_tables(self):
        if self._full is None:
            self._full = _ssp_tables(self.grid, slice(None), self.config, self.dtype)
            cfg, lsun = self.config, self.grid.lsun_cgs
            self._sed_batch = jax.jit(jax.vmap(
                functools.partial(_sed_kernel, cfg=cfg, lsun_cgs=lsun), in_axes=(0, 0, None, None)))
        return self._full

    def sed(self, theta, z) -> SED:
        """Observed-frame spectrum over the grid's full wavelength range (see :class:`SED`)."""
        th, zz, shape = self._prepare(theta, z)
        full = self._full_tables()
        flux, lum = self._sed_batch(th, zz, self.tables, full)
        n = flux.shape[-1]
        wave = np.asarray(self.grid.wave)
        return SED(wave_rest=wave,
                   wave_obs=jnp.asarray(wave, self.dtype) * (1.0 + zz.reshape(shape + (1,))),
                   flux_lambda=flux.reshape(shape + (n,)), lum_lambda=lum.reshape(shape + (n,)))

    def derived(self, theta, z) -> DerivedProps:
        """Derived properties (:class:`DerivedProps`), each of shape (...)."""
        th, zz, shape = self._prepare(theta, z)
        out = _on_bucketed_rows(self._derived_batch, th, zz, self.tables)
        return DerivedProps(*(a.reshape(shape) for a in out))

    def derived_draws(self, theta, z) -> DerivedProps:
        """Derived properties of k draws of each of m galaxies: theta (m, k, 12), z (m,) ->
        :class:`DerivedProps` of shape (m, k) each. The values of :meth:`derived` with z
        broadcast over the draws, ~3x faster: what depends on z is computed once per galaxy.
        One compiled program per (m, k)."""
        th = np.asarray(theta, dtype=float)
        zz = np.asarray(z, dtype=float)
        if th.ndim != 3 or th.shape[-1] != N_PARAMS or zz.shape != th.shape[:1]:
            raise ModelInputError(f"theta must be (m, k, {N_PARAMS}) and z (m,); got {th.shape} "
                                  f"and {zz.shape}")
        check_inputs(th, zz[:, None], self.config.z_max)
        return DerivedProps(*self._derived_draws(th.astype(self.dtype), zz.astype(self.dtype),
                                                 self.tables))


def _bucket_rows(n: int, smallest: int = 64) -> int:
    """The row count an eager batch call of n rows is padded to: the next of 2^k and
    1.5 x 2^k, at least ``smallest`` (a bounded number of compiled shapes; < 50 % padding)."""
    b = smallest
    while b < n:
        b = b * 3 // 2 if (b & (b - 1)) == 0 else (b // 3) * 4
    return b


def _on_bucketed_rows(fn, theta, z, *args):
    """``fn(theta (n, 12), z (n,), *args)`` (per-row outputs (n, ...)) evaluated on rows padded
    to :func:`_bucket_rows` (copies of the last row), unpadded on return; traced inputs as
    they are (the enclosing program has one shape)."""
    n = z.shape[0]
    if _is_traced(theta, z) or n == 0:
        return fn(jnp.asarray(theta), jnp.asarray(z), *args)
    pad = _bucket_rows(n) - n
    # numpy inputs (eager calls): padded on the host, no compiled op per shape
    theta, z = _pad_last_row(theta, pad, np), _pad_last_row(z, pad, np)
    out = fn(jnp.asarray(theta), jnp.asarray(z), *args)
    return jax.tree_util.tree_map(lambda a: a[:n], out) if pad else out


def check_inputs(theta: np.ndarray, z: np.ndarray, z_max: float) -> None:
    """Raise :class:`ModelInputError` for theta/z the model cannot evaluate (numpy, eager)."""
    if theta.ndim < 1 or theta.shape[-1] != N_PARAMS:
        raise ModelInputError(
            f"theta must have shape (..., {N_PARAMS}) in the order {PARAM_NAMES}; got {theta.shape}")
    try:
        np.broadcast_shapes(theta.shape[:-1], z.shape)
    except ValueError as exc:
        raise ModelInputError(f"theta {theta.shape} and z {z.shape} do not broadcast") from exc
    bad = ~np.isfinite(theta)
    if bad.any():
        cols = sorted({PARAM_NAMES[i] for i in np.nonzero(bad)[-1]})
        raise ModelInputError(f"theta has NaN/inf values in {cols}")
    if not np.all(np.isfinite(z)):
        raise ModelInputError("redshift has NaN/inf values")
    if np.any(z <= 0) or np.any(z > z_max):
        raise ModelInputError(
            f"redshift must be in (0, {z_max}] (the model's range; set ModelConfig.z_max); got "
            f"min {z.min():.4g}, max {z.max():.4g}")
    beta = theta[..., 1:5]
    if np.any(beta < -1e-6):
        raise ModelInputError("beta1..beta4 must be >= 0")
    s = beta.sum(-1)
    if np.any(np.abs(s - 1.0) > 1e-4):
        raise ModelInputError(
            f"beta1..beta4 must sum to 1 (got sums from {s.min():.6g} to {s.max():.6g})")
    checks = [
        ((theta[..., 5] < 0) | (theta[..., 5] > 1), "fburst must be in [0, 1]"),
        (theta[..., 6] <= 0, "tburst must be > 0 Gyr"),
        ((theta[..., 7] < 0) | (theta[..., 8] < 0), "gamma1, gamma2 must be >= 0"),
        ((theta[..., 9] < 0) | (theta[..., 10] < 0), "tau_bc, tau_ism must be >= 0"),
    ]
    for mask, msg in checks:
        if np.any(mask):
            raise ModelInputError(f"{msg} ({int(np.sum(mask))} offending rows)")


def load_model(grid=None, filters=None, *, config: ModelConfig | None = None, **options) -> SEDModel:
    """Build the PROVABGS :class:`SEDModel`.

    grid : None (the shipped BC03/MILES default), a path (.npz ours, .h5/.hdf5 DSPS format), or an
        :class:`~sedflow_jax.ssp.SSPGrid`.
    filters : None (SDSS ugriz, as SEDflow) or a list of names / :class:`Filter` / (name, wave, resp).
    config / options : a :class:`ModelConfig`, or its fields as keywords (e.g. ``z_max=0.2``).
    """
    if config is None:
        config = ModelConfig(**options)
    elif options:
        config = dataclasses.replace(config, **options)
    if grid is None or isinstance(grid, (str, bytes)) or hasattr(grid, "__fspath__"):
        p = None if grid is None else str(grid)
        if p is not None and p.endswith((".h5", ".hdf5")):
            grid = ssp.load_dsps_hdf5(p)
        else:
            grid = ssp.load_ssp_grid(p)
    if not isinstance(grid, ssp.SSPGrid):
        raise ModelInputError(f"grid must be None, a path or an SSPGrid, got {type(grid)}")
    return SEDModel(grid, photometry.load_filters(filters), config)
