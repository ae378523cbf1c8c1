import os

os.environ.setdefault("MPLBACKEND", "Agg")
# a persistent XLA compilation cache for this test session (and its subprocesses): the suite
# releases compiled code after every few modules (see _release_compiled_code), and later modules
# recompile many of the same programs; with the cache they are read back instead of recompiled
_OWN_CACHE = None  # the cache directory this process made (removed when the session ends)
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    _OWN_CACHE = tempfile.mkdtemp(prefix="sedflow-jax-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
    # every program, however quick to compile: the two xdist workers share the directory, so
    # the small eager-op programs one worker compiled are read back by the other, and by each
    # worker after it releases its compiled code (full suite, 2 cores, same code: 11:52 with a
    # 0.2 s threshold, 10:57 with none; test time summed over tests 1377 s -> 1261 s)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# XLA's CPU backend at LLVM optimisation level 1 instead of 3 for this test session (and its
# subprocesses): the suite spends about half of its time compiling, mostly small programs that
# then run for milliseconds. Level 1 compiles the importance-sampling block in half the time: the
# suite ran in 6:44 instead of 7:49 (2 cores, back to back; XLA compile summed over tests 341 s
# instead of 458 s); level 0 compiles faster still but runs the samplers and training far slower
# (test_mcmc + test_masking + test_posterior: 453 s against 271 s). The compiled code gives
# the same numbers to float rounding (levels 1 and 2 are bitwise equal, level 3 differs in the
# last bits), so a test that passes only for one rounding would be a fragile test anyway (the
# NUTS test of test_mcmc is sized to pass at any level, see NUTS_KW there). Users' programs are
# not affected; an XLA_FLAGS that already names a level is left as it is.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_backend_optimization_level=1").strip()

import itertools

import numpy as np
import pytest


def pytest_unconfigure(config):
    """Remove the session's compilation cache (hundreds of MB) once every worker is done."""
    if _OWN_CACHE is not None:
        import shutil

        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


#: modules with module-scoped fixtures (a trained flow, a simulated set, a subprocess run) used by
#: several tests: under `-n 2` plain load balancing sent their tests to both workers, and each
#: worker built the fixture (the 4 x 96 masked flow twice, ~110 s of CPU in all). Each of these
#: runs on one worker (``--dist loadgroup``, pyproject.toml), the longest first (their measured
#: seconds on 2 cores, longest-processing-time-first scheduling); the other tests follow in
#: collection order and spread freely over the workers to fill the gaps.
ONE_WORKER_MODULES = {"test_mcmc": 168, "test_parallel": 114, "test_infer_cli": 83,
                      "test_masking": 80, "test_posterior": 60, "test_importance": 60,
                      "test_real_data": 48, "test_train": 35, "test_theta_space": 28,
                      "test_default_posteriors": 29, "test_parallel_cli": 24, "test_prior": 24,
                      "test_noise_floors": 18, "test_simulation": 17, "test_infer_default": 16,
                      "test_cli_bad_input": 16, "test_noise": 16}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups into the test ids
def pytest_collection_modifyitems(config, items):
    def order(item):
        cost = ONE_WORKER_MODULES.get(item.module.__name__)
        return (0, -cost) if cost is not None else (1, 0)

    for item in items:
        if item.module.__name__ in ONE_WORKER_MODULES:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    items.sort(key=order)  # stable: each module keeps its own order


def canonical_prior_draws(rng, n):
    """Plain-numpy draws of the canonical PROVABGS prior (independent of sedflow_jax.prior)."""
    u = rng.uniform(size=(n, 3))
    beta = np.stack([1 - u[:, 0], u[:, 0] * (1 - u[:, 1]), u[:, 0] * u[:, 1] * (1 - u[:, 2]),
                     u[:, 0] * u[:, 1] * u[:, 2]], axis=1)
    lg = rng.uniform(np.log10(4.5e-5), np.log10(1.5e-2), size=(n, 2))
    return np.column_stack([
        rng.uniform(7, 12.5, n), beta, rng.uniform(0, 1, n), rng.uniform(0.01, 13.27, n),
        10 ** lg, rng.uniform(0, 3, n), rng.uniform(0, 3, n), rng.uniform(-2, 1, n)])


@pytest.fixture(scope="session")
def model():
    import sedflow_jax as sj

    return sj.load_model(filters=["sdss_u", "sdss_g", "sdss_r", "sdss_i", "sdss_z",
                                  "galex_fuv", "galex_nuv"])


THETA0 = np.array([10.0, 0.25, 0.25, 0.25, 0.25, 0.1, 2.0, 1e-3, 1e-3, 0.5, 0.5, -0.3])


#: a worker drops its compiled code after every RELEASE_EVERY-th test module: after every module,
#: each module recompiled the small eager-op programs it shares with the others
RELEASE_EVERY = 3
_MODULES_RUN = itertools.count(1)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drop compiled XLA executables after every few test modules.

    The suite compiles hundreds of programs in one process; on the 2-core CI machine a
    20-minute session once ended in a segfault inside XLA's CPU runtime. Releasing the jit
    caches keeps the loaded code small (modules rebuild what they need)."""
    yield
    if next(_MODULES_RUN) % RELEASE_EVERY:
        return
    import gc

    import jax

    from sedflow_jax import mcmc

    mcmc.clear_caches()
    jax.clear_caches()
    gc.collect()
