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
