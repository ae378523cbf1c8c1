"""A pytest plugin that measures where the suite's time goes: XLA compilation per test and per
compiled function (the suite is compile-bound on 2 CPU cores).

    PYTHONPATH=benchmarks PROF_OUT=/tmp/prof.tsv python -m pytest -q -n 2 \\
        -p pytest_compile_profile tests

Each worker appends to ``$PROF_OUT`` (default ``compile_profile.tsv``) one row per test:
node id, wall s, process CPU s, backend compile s, jaxpr trace s, MLIR lowering s, number of
compilations; and to ``$PROF_OUT.fun`` the compile seconds and count per compiled function
name (``jit(body)``, ``jit(_fori_collect_loop)``, ...); and to ``$PROF_OUT.testfun`` the same
per test (node id, compile s, count, function name): which programs a slow test compiles.
Subprocesses that tests start are not counted. It reads JAX's monitoring events
(``jax.monitoring``), so it changes nothing it measures.
"""
import collections
import os
import time

import pytest

COMPILE = "/jax/core/compile/backend_compile_duration"
TRACE = "/jax/core/compile/jaxpr_trace_duration"
LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"

_seconds = collections.Counter()
_counts = collections.Counter()
_test_fun = collections.defaultdict(lambda: [0.0, 0])  # (node id, function) -> [s, n]
_current = [None]  # the running test's node id
_rows = []
_registered = []


def _listener(event, duration, **kw):
    _seconds[event] += duration
    _counts[event] += 1
    if event == COMPILE:
        entry = _test_fun[(_current[0], kw.get("fun_name"))]
        entry[0] += duration
        entry[1] += 1


def _register():
    if not _registered:
        import jax.monitoring

        jax.monitoring.register_event_duration_secs_listener(_listener)
        _registered.append(True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _register()
    _current[0] = item.nodeid
    before, n_before = dict(_seconds), _counts[COMPILE]
    t0, c0 = time.perf_counter(), time.process_time()
    yield
    d = {k: _seconds[k] - before.get(k, 0.0) for k in (COMPILE, TRACE, LOWER)}
    _rows.append((item.nodeid, time.perf_counter() - t0, time.process_time() - c0, d[COMPILE],
                  d[TRACE], d[LOWER], _counts[COMPILE] - n_before))


def pytest_sessionfinish(session):
    if not _rows:
        return
    out = os.environ.get("PROF_OUT", "compile_profile.tsv")
    with open(out, "a") as f:
        for r in _rows:
            f.write("%s\t%.1f\t%.1f\t%.1f\t%.1f\t%.1f\t%d\n" % r)
    per_fun = collections.defaultdict(lambda: [0.0, 0])  # function -> [s, n], all tests
    for (_, name), (s, n) in _test_fun.items():
        per_fun[name][0] += s
        per_fun[name][1] += n
    with open(out + ".fun", "a") as f:
        for name, (s, n) in sorted(per_fun.items(), key=lambda kv: -kv[1][0]):
            f.write("%.2f\t%d\t%s\n" % (s, n, name))
    with open(out + ".testfun", "a") as f:
        for (test, name), (s, n) in sorted(_test_fun.items(), key=lambda kv: -kv[1][0]):
            f.write("%s\t%.2f\t%d\t%s\n" % (test, s, n, name))
