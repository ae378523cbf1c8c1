"""Analytic cases, gradients, precision, batching and bad input of the JAX SED model."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sedflow_jax as sj
from conftest import THETA0, canonical_prior_draws
from sedflow_jax.sed import model as M
from sedflow_jax.sed import photometry as ph

#: bands of the small model below (index 1 is sdss_r)
SMALL_BANDS = ["sdss_u", "sdss_r"]


@pytest.fixture(scope="module")
def small():
    """A 2-band model (z <= 0.6) for the batching / differentiation tests.

    Their custom vmap and jvp rules act per galaxy and per band, so two bands exercise them as
    seven do; photometry_fn closes over the model's tables, which every compiled program built
    from it embeds as constants, and with 2 bands up to z = 0.6 those are ~6x smaller than the
    7-band session model's (each such program compiles ~2x faster)."""
    return sj.load_model(filters=SMALL_BANDS, z_max=0.6)


#: rows of the batch comparisons (one shape: model.photometry and jit(f) compile once)
N_ROWS = 12
#: rows of the comparisons on the 7-band session model (its photometry compiles once for this
#: shape, shared with test_model_reference through the persistent compilation cache)
N_SESSION = 60


def test_single_burst_equals_interpolated_ssp(model):
    """fburst=1, no dust, burst at a grid node with Z at a grid node: L = 10^logM * SSP."""
    m = model  # the default grid (the spectrum does not depend on the filters)
    g = m.grid
    from sedflow_jax.sed import sfh

    bases = sfh.load_nmf_bases()
    j, im = 150, 4  # an age node (~1.4 Gyr) and the solar node
    tb = 10 ** g.log_age_yr[j] / 1e9
    z1 = np.interp(tb, bases.t, bases.zh[0])
    Z_target = 0.019 * 10 ** g.logzsol[im]
    th = np.array([10.0, 0.25, 0.25, 0.25, 0.25, 1.0, tb, Z_target / z1, 0.0, 0.7, 0.0, 0.0])
    lum = np.asarray(m.sed(th, 0.05).lum_lambda, float)
    expect = 1e10 * g.spec[im, j].astype(float)
    sel = expect > 1e-6 * expect.max()
    np.testing.assert_allclose(lum[sel], expect[sel], rtol=2e-4)


def test_flat_fnu_is_ab_zero():
    """A flat f_nu = 3631 Jy spectrum has AB magnitude 0 (1e9 nanomaggies) in every band."""
    filters = ph.load_filters(ph.SHIPPED_FILTERS)
    wave = np.geomspace(1000, 12000, 40000)
    flam = 3631e-23 * 2.99792458e18 / wave**2
    nmgy = ph.ab_nanomaggies(wave, flam, filters)
    np.testing.assert_allclose(22.5 - 2.5 * np.log10(nmgy), 0.0, atol=1e-4)


def test_photometry_path_equals_sed_integrated(model):
    """The fast photometry kernel equals integrating the full SED (different code paths)."""
    rng = np.random.default_rng(5)
    n = N_SESSION
    th = canonical_prior_draws(rng, n)
    zs = np.linspace(0.02, 0.4, n)
    fast = np.asarray(model.photometry(th, zs), float)
    for i in range(n):
        s = model.sed(th[i], zs[i])  # one galaxy at a time (as the single-spectrum tests)
        slow = ph.ab_nanomaggies(np.asarray(s.wave_obs, float),
                                 np.asarray(s.flux_lambda, float) * 1e-17, model.filters)
        ok = slow > 1e-12
        # the fast path interpolates the filter transmission linearly on a dz = 5e-4 grid
        np.testing.assert_allclose(fast[i][ok], slow[ok], rtol=5e-4)


def test_zero_dust_leaves_spectrum_unchanged(model):
    th = THETA0.copy()
    th[9:11] = 0.0
    base = np.asarray(model.sed(th, 0.1).lum_lambda)
    for n in (-2.0, 0.0, 1.0):
        th[11] = n
        np.testing.assert_array_equal(np.asarray(model.sed(th, 0.1).lum_lambda), base)
    th[10] = 0.5  # and dust does dim it, more in the blue
    dusty = np.asarray(model.sed(th, 0.1).lum_lambda)
    w = model.grid.wave
    r_blue = dusty[np.argmin(abs(w - 3000))] / base[np.argmin(abs(w - 3000))]
    r_red = dusty[np.argmin(abs(w - 9000))] / base[np.argmin(abs(w - 9000))]
    assert r_blue < r_red < 1


def test_mass_scaling_and_normalisation(small):
    """Flux is exactly proportional to 10^logM; bin masses sum to 1 (SFR integral = M formed)."""
    th = np.tile(THETA0, (N_ROWS, 1))
    th[1::2, 0] += 1.0  # pairs (logM, logM + 1) at N_ROWS / 2 redshifts
    zs = np.repeat(np.linspace(0.1, 0.5, N_ROWS // 2), 2)
    f = np.asarray(small.photometry(th, zs), float)
    np.testing.assert_allclose(f[1::2], 10 * f[::2], rtol=1e-5)
    th = THETA0.copy()
    # sum of bin SFR x width = 10^logM (fburst = 0)
    from sedflow_jax.sed import cosmology, sfh

    lay = sfh.bin_layout(cosmology.age_gyr(jnp.float32(0.1)))
    w = sfh.nmf_mass_fractions(jnp.asarray(th[1:5], jnp.float32), lay, sfh.load_nmf_bases())
    assert abs(float(jnp.sum(w)) - 1) < 1e-6
    assert np.all(np.asarray(w) >= 0)


def test_distance_dimming(model):
    """Between two redshifts, flux ratio follows d_L^2/(1+z) up to a k-correction that is small
    for a flat-ish SED: check the bolometric-like sum over the SED instead (exact)."""
    from astropy.cosmology import Planck13

    th = THETA0.copy()
    th[9:11] = 0
    s1, s2 = model.sed(th, 0.05), model.sed(th, 0.2)
    # integral of f_lambda d lambda_obs scales as 1/d_L^2 at fixed rest-frame spectrum.
    # (Age of the universe changes the SFH truncation, so use a young SFH: beta1 = 1.)
    th[1:5] = [1, 0, 0, 0]
    s1, s2 = model.sed(th, 0.05), model.sed(th, 0.2)
    i1 = np.trapezoid(np.asarray(s1.flux_lambda, float), np.asarray(s1.wave_obs, float))
    i2 = np.trapezoid(np.asarray(s2.flux_lambda, float), np.asarray(s2.wave_obs, float))
    l1 = np.trapezoid(np.asarray(s1.lum_lambda, float), model.grid.wave)
    l2 = np.trapezoid(np.asarray(s2.lum_lambda, float), model.grid.wave)
    d1, d2 = Planck13.luminosity_distance([0.05, 0.2]).value
    np.testing.assert_allclose((i1 / l1) / (i2 / l2), (d2 / d1) ** 2, rtol=1e-4)


def test_jit_vmap_equals_python_loop(small):
    rng = np.random.default_rng(11)
    n, nb = N_ROWS, len(SMALL_BANDS)
    th = canonical_prior_draws(rng, n)
    zs = rng.uniform(0.01, 0.3, n)
    batch = np.asarray(small.photometry(th, zs))
    f = jax.jit(small.photometry_fn())
    loop = np.stack([np.asarray(f(jnp.asarray(t, jnp.float32), jnp.float32(z)))
                     for t, z in zip(th, zs)])
    np.testing.assert_allclose(batch, loop, rtol=1e-5)
    # broadcasting shapes: (2, n/2, 12) with z (2, n/2)
    b2 = np.asarray(small.photometry(th.reshape(2, n // 2, 12), zs.reshape(2, n // 2)))
    assert b2.shape == (2, n // 2, nb)
    np.testing.assert_allclose(b2.reshape(n, nb), batch, rtol=1e-6)


def _plain_kernel(model):
    """The per-galaxy kernel without custom rules (what photometry_fn returned before)."""
    return lambda t, z: M._phot_kernel(t, z, model.tables, model.config)


def test_vmapped_kernel_equals_batch_and_single_calls(small):
    """jit(vmap(photometry_fn())) (flat, nested chains x walkers, z broadcast) equals
    model.photometry, the unbatched kernel called per galaxy, and the plain kernel's vmap."""
    rng = np.random.default_rng(17)
    n = N_ROWS
    th = jnp.asarray(canonical_prior_draws(rng, n), jnp.float32)
    zs = jnp.asarray(rng.uniform(0.01, 0.6, n), jnp.float32)
    f = small.photometry_fn()
    assert small.photometry_fn() is f  # one function object: jit caches are shared
    # (every transform jitted: eager op-by-op evaluation of the kernel costs minutes in CI)
    batch = np.asarray(small.photometry(np.asarray(th), np.asarray(zs)))
    one = jax.jit(f)  # the same compiled program as test_jit_vmap_equals_python_loop's
    single = np.stack([np.asarray(one(t, z)) for t, z in zip(th, zs)])
    z0 = zs[5]

    @jax.jit
    def batched(th, zs):
        """Each vmap variant (and its reference) as written, in one compiled program (each
        transform is traced separately; one compilation instead of six)."""
        vmf = jax.vmap(f)
        return dict(
            vm=vmf(th, zs),
            plain=jax.vmap(_plain_kernel(small))(th, zs),
            nested=jax.vmap(jax.vmap(f))(th.reshape(3, 4, 12), zs.reshape(3, 4)),
            # z not batched (in_axes None), also inside a nested vmap (one z per chain); the
            # references are the flat vmap (== model.photometry) at the broadcast redshifts
            bz=jax.vmap(f, in_axes=(0, None))(th, z0),
            bz_ref=vmf(th, jnp.full_like(zs, z0)),
            per_chain=jax.vmap(jax.vmap(f, in_axes=(0, None)))(th.reshape(3, 4, 12), zs[:3]),
            per_chain_ref=vmf(th, jnp.repeat(zs[:3], 4)).reshape(3, 4, -1))

    r = {k: np.asarray(v) for k, v in batched(th, zs).items()}
    vm = r["vm"]
    for other in (batch, single, r["plain"]):
        np.testing.assert_allclose(vm, other, rtol=1e-5)
    np.testing.assert_allclose(r["nested"].reshape(n, -1), vm, rtol=1e-5)
    np.testing.assert_allclose(r["bz"], r["bz_ref"], rtol=1e-5)
    np.testing.assert_allclose(r["per_chain"], r["per_chain_ref"], rtol=1e-5)


def test_vmapped_kernel_uses_the_blocked_path(small):
    """vmap of the kernel traces to the blocked batch (a scan over ceil(n / BLOCK) equal
    blocks), not to a plain vmap of the kernel; nested vmaps fold into one such scan. Tracing
    only."""
    n = 40 * M.BLOCK + 3  # 41 blocks: longer than any searchsorted scan inside the kernel
    th = jnp.broadcast_to(jnp.asarray(THETA0, jnp.float32), (n, 12))
    zs = jnp.full((n,), 0.1, jnp.float32)

    def blocks(jaxpr, k):
        return re.search(rf"length={k}\b", str(jaxpr)) is not None

    assert not blocks(jax.make_jaxpr(jax.vmap(_plain_kernel(small)))(th, zs), 41)
    assert blocks(jax.make_jaxpr(jax.vmap(small.photometry_fn()))(th, zs), 41)
    nested = jax.make_jaxpr(jax.vmap(jax.vmap(small.photometry_fn())))(
        th[:-3].reshape(8, -1, 12), zs[:-3].reshape(8, -1))  # 8 x 1280 rows: 40 blocks
    assert blocks(nested, 40)


def test_grad_through_vmapped_kernel(small):
    """grad of a vmapped kernel, vmap of grad and jacfwd equal the plain kernel's derivatives,
    and the vmapped grad equals the unbatched grad galaxy by galaxy."""
    rng = np.random.default_rng(23)
    th = jnp.asarray(_safe_theta(rng, 4), jnp.float32)
    zs = jnp.asarray(rng.uniform(0.02, 0.3, 4), jnp.float32)
    f, old = small.photometry_fn(), _plain_kernel(small)

    def loss(fn):
        return lambda t, z: jnp.sum(jnp.log(jax.vmap(fn)(t, z)))

    grad_one = jax.grad(lambda t, z: jnp.sum(jnp.log(f(t, z))))

    @jax.jit
    def derivs(th, zs):
        """Each derivative as written, in one compiled program (one compilation, not six)."""
        return dict(
            g=jax.grad(loss(f), argnums=(0, 1))(th, zs),
            o=jax.grad(loss(old), argnums=(0, 1))(th, zs),
            per=jax.vmap(grad_one)(th, zs),
            # the unbatched grad galaxy by galaxy: a scan body sees one galaxy (no vmap rule)
            one=jax.lax.map(lambda a: grad_one(*a), (th, zs)),
            jf=jax.vmap(jax.jacfwd(f))(th, zs),
            jf_old=jax.vmap(jax.jacfwd(old))(th, zs))

    r = derivs(th, zs)
    (g_t, g_z), (o_t, o_z) = r["g"], r["o"]
    np.testing.assert_allclose(g_t, o_t, rtol=1e-5, atol=1e-6 * float(jnp.abs(o_t).max()))
    np.testing.assert_allclose(g_z, o_z, rtol=1e-5)
    for a in (r["per"], r["one"]):
        np.testing.assert_allclose(a, o_t, rtol=1e-5, atol=1e-6 * float(jnp.abs(o_t).max()))
    jf = r["jf"]
    np.testing.assert_allclose(jf, r["jf_old"], rtol=1e-5, atol=1e-6 * float(jnp.abs(jf).max()))


def test_photometry_kernel_takes_the_tables_as_an_argument(small):
    """photometry_kernel() is photometry_fn() with the tables as an argument: the same values
    (= model.photometry), the blocked vmap, the plain kernel's gradient; and a program built
    from it holds no copy of the tables, which the closure's program embeds as constants."""
    rng = np.random.default_rng(29)
    th = jnp.asarray(_safe_theta(rng, 6), jnp.float32)
    zs = jnp.asarray(rng.uniform(0.02, 0.3, 6), jnp.float32)
    k, f = small.photometry_kernel(), small.photometry_fn()
    assert small.photometry_kernel() is k
    vk = jax.vmap(k, in_axes=(0, 0, None))

    @jax.jit
    def prog(th, zs, tables):
        loss = lambda t: jnp.sum(jnp.log(vk(t, zs, tables)))  # noqa: E731
        plain = lambda t: jnp.sum(jnp.log(jax.vmap(_plain_kernel(small))(t, zs)))  # noqa: E731
        return vk(th, zs, tables), jax.grad(loss)(th), jax.grad(plain)(th)

    val, g, g_plain = prog(th, zs, small.tables)
    np.testing.assert_allclose(val, small.photometry(np.asarray(th), np.asarray(zs)), rtol=1e-5)
    np.testing.assert_allclose(g, g_plain, rtol=1e-5, atol=1e-6 * float(jnp.abs(g_plain).max()))
    n = 40 * M.BLOCK + 3  # the blocked scan (see test_vmapped_kernel_uses_the_blocked_path)
    big = jax.make_jaxpr(vk)(jnp.broadcast_to(th[0], (n, 12)), jnp.full((n,), 0.1), small.tables)
    assert re.search(r"length=41\b", str(big))
    table_bytes = sum(np.asarray(a).nbytes for a in jax.tree_util.tree_leaves(small.tables))
    text_arg = len(jax.jit(vk).lower(th, zs, small.tables).as_text())
    text_closure = len(jax.jit(jax.vmap(f)).lower(th, zs).as_text())
    assert text_closure > table_bytes > 10 * text_arg, (text_closure, table_bytes, text_arg)


def test_gradient_in_a_compiled_loop_builds_no_table_sized_array(small):
    """A sampler evaluates value-and-grad of one galaxy inside a compiled loop with the tables
    as loop arguments. No instruction of that optimised program may produce an array as large
    as a table (a transposed or copied table, remade on every evaluation: with the fixed-bin
    SSP tables in (n_met, n_bins, n_w) layout, XLA transposed the largest table on each step
    and a NUTS gradient cost 5-6x more)."""
    k = small.photometry_kernel()
    th = jnp.asarray(THETA0, jnp.float32)

    def loop(th, tables):
        def log_like(t):
            return -0.5 * jnp.sum(jnp.log(k(t, jnp.float32(0.1), tables)) ** 2)

        def step(_, t):
            v, g = jax.value_and_grad(log_like)(t)
            return t + 1e-9 * (g + v)

        return jax.lax.fori_loop(0, 3, step, th)

    hlo = jax.jit(loop).lower(th, small.tables).compile().as_text()
    fixed = small.tables.phot_ssp.fixed_old
    made = []  # instructions that are not a parameter, a tuple view or a bitcast of one
    for line in hlo.splitlines():
        m = re.search(r"= f32\[([\d,]+)\]\{[\d,]*\} (\w[\w-]*)\(", line)
        if m and m.group(2) not in ("parameter", "get-tuple-element", "bitcast"):
            size = int(np.prod([int(d) for d in m.group(1).split(",")]))
            if size >= int(np.prod(fixed.shape)) // 4:
                made.append(line.strip()[:160])
    assert not made, made


def _safe_theta(rng, n):
    """Prior draws kept away from the kinks (metallicity clip, burst at t_age)."""
    th = canonical_prior_draws(rng, n)
    th[:, 6] = rng.uniform(0.5, 9.0, n)
    th[:, 7:9] = 10 ** rng.uniform(-3.3, -2.3, (n, 2))
    th[:, 9:11] = rng.uniform(0.2, 2.0, (n, 2))
    return th


def test_grad_matches_finite_differences():
    """jax.grad of log-photometry w.r.t. all 12 parameters vs central differences (float64)."""
    rng = np.random.default_rng(0)
    bands = ["sdss_u", "sdss_r", "sdss_z"]  # blue to red; z_max: the tables up to z = 0.08 only
    with jax.enable_x64(True):
        m = sj.load_model(filters=bands, dtype="float64", z_max=0.1)
        f = jax.jit(m.photometry_fn())

        def log_f(t, z):
            return jnp.log(f(t, z))

        # forward and reverse mode in one compiled program (one compilation, not two)
        jacs = jax.jit(lambda t, z: (jax.jacfwd(log_f)(t, z), jax.jacrev(log_f)(t, z)))
        for th in _safe_theta(rng, 4):
            th = jnp.asarray(th)
            z = jnp.float64(0.08)
            jac, jac_rev = (np.asarray(a) for a in jacs(th, z))  # (3, 12) each
            np.testing.assert_allclose(jac, jac_rev, rtol=1e-8, atol=1e-12)
            fd = np.zeros((len(bands), 12))
            for i in range(12):
                h = 1e-6 * max(1.0, abs(float(th[i])))
                e = jnp.zeros(12).at[i].set(h)
                fd[:, i] = (np.log(np.asarray(f(th + e, z))) - np.log(np.asarray(f(th - e, z)))) / (2 * h)
            np.testing.assert_allclose(jac, fd, rtol=2e-4, atol=1e-6 * np.abs(fd).max())


def test_grad_through_checked_api(small):
    g = jax.grad(lambda t: small.photometry(t, 0.1)[SMALL_BANDS.index("sdss_r")])(
        jnp.asarray(THETA0, jnp.float32))
    assert g.shape == (12,) and np.all(np.isfinite(np.asarray(g)))
    assert float(g[0]) > 0  # more mass, more flux


def test_float32_matches_float64(model):
    rng = np.random.default_rng(21)
    th = canonical_prior_draws(rng, N_SESSION)
    zs = rng.uniform(0.005, 0.5, N_SESSION)
    assert model.filter_names == ph.SHIPPED_FILTERS  # the session model: all shipped bands
    f32 = np.asarray(model.photometry(th, zs), float)
    with jax.enable_x64(True):
        f64 = np.asarray(sj.load_model(filters=list(ph.SHIPPED_FILTERS), dtype="float64")
                         .photometry(th, zs))
    mag64 = 22.5 - 2.5 * np.log10(f64)
    ok = mag64 < 40  # bands attenuated by > exp(-80) underflow in float32 (see reference test)
    assert np.all(22.5 - 2.5 * np.log10(np.maximum(f32[~ok], 1e-30)) > 38)
    dm = np.abs(2.5 * np.log10(f32[ok] / f64[ok]))
    assert ok.mean() > 0.9 and dm.max() < 1e-3


# ------------------------------- bad input --------------------------------------------------

@pytest.mark.parametrize("theta,z,msg", [
    (THETA0[:11], 0.1, "shape"),
    (np.where(np.arange(12) == 3, np.nan, THETA0), 0.1, "NaN"),
    (np.where(np.arange(12) == 1, 0.5, THETA0), 0.1, "sum to 1"),
    (np.array([10, -0.1, 0.5, 0.3, 0.3, 0.1, 2, 1e-3, 1e-3, 0.5, 0.5, 0]), 0.1, ">= 0"),
    (THETA0, 0.0, "redshift"),
    (THETA0, -0.1, "redshift"),
    (THETA0, 1.5, "redshift"),
    (THETA0, np.nan, "redshift"),
    (np.where(np.arange(12) == 5, 1.5, THETA0), 0.1, "fburst"),
    (np.where(np.arange(12) == 6, 0.0, THETA0), 0.1, "tburst"),
    (np.where(np.arange(12) == 10, -1.0, THETA0), 0.1, "tau"),
    (np.where(np.arange(12) == 7, -1e-3, THETA0), 0.1, "gamma"),
])
def test_bad_input_raises(model, theta, z, msg):
    with pytest.raises(M.ModelInputError, match=msg):
        model.photometry(theta, z)


def test_unknown_filter_raises():
    with pytest.raises(ph.FilterError, match="unknown filter"):
        sj.load_model(filters=["sdss_q"])


def test_speclite_and_user_filters():
    wave = np.linspace(5000, 7000, 50)
    resp = np.exp(-0.5 * ((wave - 6000) / 300) ** 2)
    m = sj.load_model(filters=["sdss_r", "sdss2010noatm-r", ("my_r", wave, resp)])
    f = np.asarray(m.photometry(THETA0, 0.1))
    # speclite's sdss2010noatm-r is the same curve as our shipped sdss_r
    np.testing.assert_allclose(f[0], f[1], rtol=1e-6)
    assert np.isfinite(f[2]) and f[2] > 0


def test_model_options_validated():
    with pytest.raises(M.ModelInputError, match="float64"):
        sj.load_model(dtype="float64")
