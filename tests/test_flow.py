"""Tests of sedflow_jax.flow: bijector algebra, autoregressive structure, normalisation."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sedflow_jax.nn import flow as F


def _randomize(flow, scale=0.3, seed=1):
    """Perturb every trainable parameter (the output layers start at zero = identity)."""
    st = nnx.state(flow, nnx.Param)
    leaves, tdef = jax.tree_util.tree_flatten(st)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    leaves = [l + scale * jax.random.normal(k, l.shape, l.dtype) for l, k in zip(leaves, keys)]
    nnx.update(flow, jax.tree_util.tree_unflatten(tdef, leaves))
    return flow


def _stats(d, c, theta_std=1.0, x_std=1.0):
    return F.ZScoreStats(np.full(d, 0.3, np.float32), np.full(d, theta_std, np.float32),
                         np.full(c, -0.2, np.float32), np.full(c, x_std, np.float32))


def _flow(d=3, c=2, *, flow_type="maf", hidden=24, n_blocks=3, seed=0, theta_std=1.0,
          batch_norm=False, output_context=True, permutation="random", scale=0.3):
    cfg = F.FlowConfig(d_theta=d, d_context=c, n_blocks=n_blocks, hidden=hidden,
                       flow_type=flow_type, seed=seed, batch_norm=batch_norm,
                       output_context=output_context, permutation=permutation, n_bins=4,
                       tail_bound=3.0)
    fl = F.init_flow(jax.random.PRNGKey(seed), cfg, stats=_stats(d, c, theta_std))
    return _randomize(fl, scale=scale, seed=seed + 1)


def _made_bijector(fl, x, block=0, sampler="prefix"):
    made = fl.blocks[block]
    xz = fl._zscore_context(x)
    return F.MaskedAutoregressiveBijector(
        lambda t: made(t, xz), fl.config.d_theta, fl._elementwise(),
        step_fn=lambda p, i: made.params_for_dim(p, xz, i), sampler=sampler)


#: draws per F.sample call on the ``maf`` fixture (one shape: one compilation of the sampler)
N_DRAWS = 16


@pytest.fixture(scope="module")
def maf():
    return _flow(d=4, c=3)


def test_config_json_roundtrip_and_validation():
    cfg = F.FlowConfig.small(11, 11)
    again = F.FlowConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg
    assert F.FlowConfig.paper(11, 11).n_blocks == 15 and F.FlowConfig.paper().hidden == 500
    with pytest.raises(ValueError, match="activation"):
        F.FlowConfig(2, 2, activation="sigmoidx")
    with pytest.raises(ValueError, match="flow_type"):
        F.FlowConfig(2, 2, flow_type="realnvp")
    with pytest.raises(ValueError, match="unknown FlowConfig fields"):
        F.FlowConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden = 3


def test_paper_parameter_count():
    """sbi v0.17 MAF 15 x 500 with BatchNorm on 11 + 11 dims has SEDflow's 7,890,330 params."""
    stats = _stats(11, 11)
    abstract = nnx.eval_shape(lambda: F.init_flow(None, F.FlowConfig.paper(11, 11), stats=stats))
    assert F.num_parameters(abstract) == 7_890_330
    abstract = nnx.eval_shape(lambda: F.init_flow(
        None, F.FlowConfig.paper(11, 11, batch_norm=False), stats=stats))
    assert F.num_parameters(abstract) == 7_890_330 - 15 * 2 * 1000


def test_masks_follow_nflows_degrees():
    d, h = 5, 12
    deg = F._hidden_degrees(d, h)
    assert sorted(deg.tolist()) == sorted((np.arange(h) % (d - 1) + 1).tolist())
    m_in = F._mask_np("input", "hidden", d, d, h)
    m_out = F._mask_np("hidden", "output", d, h, 2 * d)
    # the in-graph masks equal the numpy reference
    np.testing.assert_array_equal(np.asarray(F._mask("input", "hidden", d, d, h, jnp.float32)),
                                  m_in)
    np.testing.assert_array_equal(np.asarray(F._mask("hidden", "hidden", d, h, h, jnp.float32)),
                                  F._mask_np("hidden", "hidden", d, h, h))
    np.testing.assert_array_equal(np.asarray(F._mask("hidden", "output", d, h, 2 * d,
                                                     jnp.float32)), m_out)
    # end-to-end connectivity: output of dim i reachable only from inputs < i
    conn = (m_in @ F._mask_np("hidden", "hidden", d, h, h) @ m_out) > 0  # (d, 2d)
    for i in range(d):
        for p in range(2):
            assert not conn[i:, p * d + i].any()
            assert conn[:i, p * d + i].all()


@pytest.mark.parametrize("d,h,groups", [(11, 500, 3), (11, 64, 10), (5, 40, 2), (2, 8, 3),
                                          (1, 8, 3)])
def test_block_triangular_matmul_equals_masked_dense(d, h, groups):
    rng = np.random.default_rng(d + h)
    x = jnp.asarray(rng.normal(size=(6, h)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(h, h)), jnp.float32)
    m = F._mask_np("hidden", "hidden", d, h, h)
    dense = lambda x, k: x @ (k * m)  # noqa: E731
    blocked = lambda x, k: F._block_triangular_matmul(x, k, d, h, groups)  # noqa: E731
    g = jnp.asarray(rng.normal(size=(6, h)), jnp.float32)

    @jax.jit  # one compilation (op by op, every small op of the groups compiles on its own)
    def both(x, k, g):
        return (blocked(x, k), dense(x, k), jax.vjp(blocked, x, k)[1](g),
                jax.vjp(dense, x, k)[1](g))

    out_b, out_d, vjp_b, vjp_d = both(x, k, g)
    np.testing.assert_allclose(out_b, out_d, rtol=1e-4, atol=1e-3)
    for a, b in zip(vjp_b, vjp_d):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)
    assert np.all(np.asarray(vjp_b[1])[m == 0] == 0)  # masked weights get no gradient


@pytest.mark.parametrize("flow_type", ["maf", "nsf"])
@pytest.mark.parametrize("sampler", ["prefix", "loop"])
def test_made_bijector_inverse_forward_identity_and_logdet(flow_type, sampler):
    fl = _flow(d=4, c=3, flow_type=flow_type)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3,)), jnp.float32)
    b = _made_bijector(fl, x, sampler=sampler)
    theta = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)

    @jax.jit
    def run(theta):
        u, ld_inv = b.inverse_and_log_det(theta)
        back, ld_fwd = b.forward_and_log_det(u)
        J = jax.vmap(jax.jacobian(b.inverse))(theta[:3])
        # sampling-direction Jacobian (the prefix path is checked via ld_fwd == -ld_inv; its
        # unrolled Jacobian is slow to compile)
        Jf = jax.vmap(jax.jacobian(b.forward))(u[:3]) if sampler == "loop" else None
        return u, ld_inv, back, ld_fwd, J, Jf

    u, ld_inv, back, ld_fwd, J, Jf = run(theta)
    tol = 2e-5 if flow_type == "maf" else 1e-3  # steep random splines amplify rounding
    np.testing.assert_allclose(back, theta, atol=tol)
    np.testing.assert_allclose(ld_fwd, -ld_inv, atol=tol)
    assert np.abs(np.asarray(u - theta)).max() > 1e-2  # not the identity
    # log|det| against the autodiff Jacobian, both directions
    np.testing.assert_allclose(ld_inv[:3], jnp.linalg.slogdet(J)[1], atol=1e-4)
    if Jf is not None:
        np.testing.assert_allclose(ld_fwd[:3], jnp.linalg.slogdet(Jf)[1], atol=1e-4)


def test_made_is_autoregressive(maf):
    """d params_i / d theta_j == 0 for j >= i, and the data->noise map's Jacobian is lower
    triangular with a nonzero strictly-lower part (so the test could fail)."""
    d = maf.config.d_theta
    x = jnp.asarray([0.1, -0.4, 0.7], jnp.float32)
    theta = jnp.asarray([0.3, -1.2, 0.8, 0.05], jnp.float32)
    made = maf.blocks[1]
    Jp = jax.jit(jax.jacobian(lambda t: made(t, x)))(theta)  # (d, k, d)
    for i in range(d):
        assert np.all(np.asarray(Jp[i, :, i:]) == 0.0), f"params of dim {i} see theta[{i}:]"
    assert np.abs(np.asarray(Jp[d - 1, :, : d - 1])).max() > 1e-3
    b = _made_bijector(maf, x, block=1)
    J = np.asarray(jax.jit(jax.jacobian(b.inverse))(theta))
    assert np.all(np.triu(J, 1) == 0.0)
    assert np.all(np.abs(np.diag(J)) > 0)
    assert np.abs(np.tril(J, -1)).max() > 1e-3


def test_made_params_for_dim_matches_full_pass(maf):
    made = maf.blocks[0]
    rng = np.random.default_rng(3)
    theta = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(3,)), jnp.float32)
    full = made(theta, x)
    steps = jax.jit(lambda t: [made.params_for_dim(t[:, :i], x, i) for i in range(4)])(theta)
    for i in range(4):
        np.testing.assert_allclose(steps[i], full[:, i], atol=2e-5)


def test_whole_flow_bijector_and_logdet(maf):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(3,)), jnp.float32)
    b = F.bijector(maf, x)
    z = jnp.asarray(rng.normal(size=(7, 4)), jnp.float32)  # 7 rows: log_prob's shape elsewhere

    @jax.jit
    def run(z):
        theta, ld = b.forward_and_log_det(z)
        zz, ldi = b.inverse_and_log_det(theta)
        J = jax.vmap(jax.jacobian(b.forward))(z[:2])
        return theta, ld, zz, ldi, J

    theta, ld, zz, ldi, J = run(z)
    np.testing.assert_allclose(zz, z, atol=5e-5)
    np.testing.assert_allclose(ld[:2], jnp.linalg.slogdet(J)[1], atol=2e-4)
    # log_prob = base log-prob of the inverse + inverse log-det
    lp = F.log_prob(maf, theta, x)
    ref = -0.5 * jnp.sum(zz ** 2, -1) - 2.0 * np.log(2 * np.pi) + ldi
    np.testing.assert_allclose(lp, ref, atol=1e-4)


def test_permute_bijector():
    p = F.Permute([2, 0, 1])
    y = jnp.arange(6.0).reshape(2, 3)
    u, ld = p.inverse_and_log_det(y)
    np.testing.assert_array_equal(u, y[:, [2, 0, 1]])
    np.testing.assert_array_equal(p.forward(u), y)
    assert np.all(ld == 0)


def test_jit_vmap_eager_agree(maf):
    one_block = _flow(d=4, c=3, n_blocks=1, seed=3)
    rng = np.random.default_rng(2)
    th1 = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    x1 = jnp.asarray(rng.normal(size=(3, 3)), jnp.float32)
    np.testing.assert_allclose(one_block.log_prob(th1, x1), F.log_prob(one_block, th1, x1),
                               rtol=1e-5, atol=1e-5)  # eager (op by op) vs jitted
    theta = jnp.asarray(rng.normal(size=(7, 4)), jnp.float32)
    xs = jnp.asarray(rng.normal(size=(7, 3)), jnp.float32)
    ref = jax.jit(maf.log_prob)(theta[:3], xs[:3])  # jit of the bare module method
    jitted = F.log_prob(maf, theta, xs)
    # jit of a vmap of the method, and F.log_prob inside an outer jit (one compiled program)
    vm, outer = jax.jit(lambda t, x: (jax.vmap(lambda a, b: maf.log_prob(a, b))(t, x),
                                      F.log_prob(maf, t, x)))(theta, xs)
    nj = nnx.jit(lambda m, t, x: F.log_prob(m, t, x))(maf, theta, xs)
    for other in (jitted, vm, outer, nj):
        np.testing.assert_allclose(other[:3], ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(vm, jitted, rtol=1e-5, atol=1e-5)
    single = F.log_prob(maf, theta[0], xs[0])
    assert single.shape == ()
    np.testing.assert_allclose(single, ref[0], atol=1e-5)
    key = jax.random.PRNGKey(4)
    s_jit = F.sample(maf, key, xs[0], N_DRAWS)
    s_nnx = nnx.jit(lambda m, k, x: m.sample(k, x, N_DRAWS))(maf, key, xs[0])
    np.testing.assert_allclose(s_jit, s_nnx, atol=1e-5)
    assert s_jit.dtype == jnp.float32 and s_jit.shape == (N_DRAWS, 4)


def test_prefix_and_loop_samplers_agree(maf):
    x = jnp.asarray([0.5, 0.1, -1.0], jnp.float32)
    a = F.sample(maf, jax.random.PRNGKey(0), x, N_DRAWS)
    b = F.sample(maf, jax.random.PRNGKey(0), x, N_DRAWS, sampler="loop")
    np.testing.assert_allclose(a, b, atol=3e-5)
    assert np.all(np.isfinite(a))


@pytest.mark.parametrize("flow_type,d,hidden,batch_norm,output_context", [
    ("maf", 5, 10, True, False),  # batch norm; degrees 1..4 held by 3, 3, 2, 2 units
    ("nsf", 1, 8, False, True)])  # one dimension: every hidden unit sees the context only
def test_made_incremental_inverse_undoes_the_density_pass(flow_type, d, hidden, batch_norm,
                                                          output_context):
    """MADE.invert (the samplers' inverse: each hidden unit computed once per pass) against the
    density direction, one full masked pass (another code path): u -> theta -> u. (The whole
    flow's sampler against nflows' loop of full passes: test_prefix_and_loop_samplers_agree.)"""
    fl = _flow(d=d, c=3, flow_type=flow_type, hidden=hidden, batch_norm=batch_norm,
               output_context=output_context)
    made, ew = fl.blocks[1], fl._elementwise()
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(3,)), jnp.float32)
    xz = fl._zscore_context(x)
    u = jnp.asarray(rng.normal(size=(7, d)), jnp.float32)

    @jax.jit
    def run(u):
        theta = made.invert(u, made.prefix_tables(xz), ew.inv)
        back, _ = ew.fwd(theta, made(theta, xz))
        return theta, back

    theta, back = run(u)
    tol = 2e-5 if flow_type == "maf" else 1e-3  # steep random splines amplify rounding
    np.testing.assert_allclose(back, u, atol=tol)
    assert np.abs(np.asarray(theta - u)).max() > 1e-2  # not the identity


def test_sample_batched_matches_single_and_chunking(maf):
    rng = np.random.default_rng(5)
    xs = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    key = jax.random.PRNGKey(9)
    n = N_DRAWS
    out = F.sample_batched(maf, key, xs, n, max_rows=2 * n)  # chunks of 2 galaxies, padded
    assert out.shape == (5, n, 4)
    out2 = F.sample_batched(maf, key, xs, n)  # one chunk
    np.testing.assert_allclose(out, out2, atol=1e-5)
    for j in (0, 4):
        np.testing.assert_allclose(out[j], F.sample(maf, jax.random.fold_in(key, j), xs[j], n),
                                   atol=1e-5)
    assert not np.allclose(out[0], out[1])


def test_identity_at_init():
    """A fresh flow is the z-scoring map into N(0, I): log_prob is a Gaussian's."""
    d, c = 3, 2
    stats = _stats(d, c, theta_std=2.0)
    fl = F.init_flow(jax.random.PRNGKey(0), F.FlowConfig.small(d, c, hidden=16), stats=stats)
    theta = jnp.asarray(np.random.default_rng(0).normal(size=(4, d)), jnp.float32)
    z = (theta - 0.3) / 2.0
    ref = -0.5 * jnp.sum(z ** 2, -1) - 1.5 * np.log(2 * np.pi) - d * np.log(2.0)
    lp = F.log_prob(fl, theta, jnp.zeros((4, c)))
    np.testing.assert_allclose(lp, ref, atol=1e-2)


@pytest.mark.parametrize("flow_type", ["maf", "nsf"])
def test_density_normalises_1d(flow_type):
    fl = _flow(d=1, c=2, flow_type=flow_type, n_blocks=2, theta_std=0.7, scale=0.5)
    grid = np.linspace(-12, 12, 24001, dtype=np.float32)[:, None]
    for xv in ([0.0, 0.0], [1.5, -2.0]):
        p = np.exp(np.asarray(F.log_prob(fl, grid, jnp.asarray(xv, jnp.float32)), np.float64))
        np.testing.assert_allclose(np.trapezoid(p, grid[:, 0]), 1.0, atol=2e-3)


def test_density_normalises_2d_and_depends_on_context():
    fl = _flow(d=2, c=2, n_blocks=3, theta_std=1.5, output_context=False, permutation="reverse")
    g = np.linspace(-10, 10, 401, dtype=np.float32)
    tt = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    masses = []
    for xv in ([0.0, 0.0], [2.0, -1.0]):
        lp = np.asarray(F.log_prob(fl, tt, jnp.asarray(xv, jnp.float32)), np.float64)
        p = np.exp(lp).reshape(401, 401)
        mass = np.trapezoid(np.trapezoid(p, g, axis=1), g)
        np.testing.assert_allclose(mass, 1.0, atol=5e-3)
        masses.append(p)
    assert np.abs(masses[0] - masses[1]).max() > 1e-3  # the context matters


def test_batch_norm_flow_train_and_eval_modes():
    fl = _flow(d=3, c=2, batch_norm=True, n_blocks=2)
    rng = np.random.default_rng(0)
    theta = jnp.asarray(rng.normal(size=(64, 3)) * 3 + 1, jnp.float32)
    x = jnp.asarray(rng.normal(size=(64, 2)), jnp.float32)
    lp_eval = F.log_prob(fl, theta, x)
    # train mode: batch statistics (and running averages updated)
    lp_train = nnx.jit(lambda m, t, x: m.log_prob(t, x, train=True))(fl, theta, x)
    assert not np.allclose(lp_eval, lp_train)
    # sampling (eval mode, prefix path with BN) inverts log_prob's map
    b = F.bijector(fl, x[0])
    z = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    np.testing.assert_allclose(jax.jit(lambda z: b.inverse(b.forward(z)))(z), z, atol=5e-5)
    np.testing.assert_allclose(F.sample(fl, jax.random.PRNGKey(1), x[0], 20),
                               F.sample(fl, jax.random.PRNGKey(1), x[0], 20, sampler="loop"),
                               atol=5e-5)


def test_init_flow_validates_inputs():
    cfg = F.FlowConfig.small(3, 2, hidden=16)  # the shapes of test_identity_at_init (compiled)
    with pytest.raises(ValueError, match="theta_train"):
        F.init_flow(None, cfg, np.zeros((10, 4)), np.zeros((10, 2)))
    with pytest.raises(ValueError, match="needs theta_train"):
        F.init_flow(None, cfg)
    st = F.compute_stats(np.ones((5, 3)), np.ones((5, 2)))  # zero variance -> floors
    assert st.theta_std.min() > 0 and np.isclose(st.x_std[0], 1e-7)
    fl = F.init_flow(None, cfg, stats=st)
    with pytest.raises(ValueError, match="theta must end in shape"):
        F.log_prob(fl, np.zeros((2, 5)), np.zeros((2, 2)))
