"""Starting points of the --refine MCMC (sedflow_jax.mcmc.refine.distinct_starts): distinct,
inside the box, taken from the importance draws."""
import numpy as np
import pytest

from sedflow_jax.mcmc.refine import distinct_starts


def test_distinct_starts_from_repeated_draws():
    rng = np.random.default_rng(0)
    low, high = np.zeros(3), np.array([1.0, 2.0, 4.0])
    draws = np.repeat([[0.2, 0.5, 1.0], [0.9, 1.9, 3.99999]], 200, axis=0)  # two distinct draws
    draws[0] = np.nan  # a failed draw is never a start
    x = distinct_starts(rng, draws, 30, low, high)
    assert x.shape == (30, 3)
    assert len(np.unique(x, axis=0)) == 30  # ensemble moves need distinct walkers
    assert np.all((x > low) & (x < high))
    # each start is one of the draws, moved by at most ~5e-3 of the box width
    d = np.min(np.abs(x[:, None] - draws[None, 1:]).max(-1) / 1.0, axis=1)
    assert np.all(d < 5e-3 * (high - low).max())
    # the two distinct draws are both used
    near = np.abs(x[:, :1] - 0.2) < 0.05
    assert 0 < near.sum() < 30


def test_distinct_starts_many_draws_kept_as_given():
    rng = np.random.default_rng(1)
    draws = rng.uniform(0.1, 0.9, (100, 2))
    x = distinct_starts(rng, draws, 10, np.zeros(2), np.ones(2))
    assert all(any(np.array_equal(r, d) for d in draws) for r in x)  # no jitter needed
    with pytest.raises(ValueError, match="no finite draw"):
        distinct_starts(rng, np.full((5, 2), np.nan), 4, np.zeros(2), np.ones(2))


def test_second_mcmc_run_on_new_data_compiles_nothing():
    """One compiled sampler serves every galaxy: a second run_ess / run_nuts on new data of the
    same shape triggers no XLA compilation (numpyro 0.22 recompiled the whole sampler on every
    MCMC.run; see mcmc.runners._reused_jit_wrappers)."""
    import jax
    import jax.numpy as jnp

    from sedflow_jax import mcmc as M

    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **kw: compiles.append(name) if "backend_compile" in name else None)

    def log_density(x, d):
        return -0.5 * jnp.sum((x - d["m"]) ** 2)

    for sampler, kw in (("ess", dict(num_chains=6)), ("nuts", dict(num_chains=1))):
        means = []
        for i, m in enumerate((-3.0, 4.0)):
            t = M.make_target(log_density, 2, data=dict(m=jnp.full(2, m, jnp.float32)),
                              low=[-20, -20], high=[20, 20])
            n0 = len(compiles)
            r = M.run_sampler(i, t, sampler, num_warmup=100, num_samples=300, init="prior", **kw)
            means.append(r.flat_samples.mean(0))
            if i == 1:
                assert len(compiles) == n0, (sampler, compiles[n0:])
        np.testing.assert_allclose(means[1], 4.0, atol=0.4)  # and it sampled the new data
