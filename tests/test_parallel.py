"""Tests of sedflow_jax.parallel (and the opt-in ``mesh=`` / ``hosts=`` of simulate and fit).

* in this process (1 CPU device): host partition + manifest merge of the simulator, restarts with
  another process count, row-keyed posterior draws, streaming inference with kill-and-resume
  (a real SIGKILL of a subprocess, and the in-process stop hook), FITS == HDF5 input.
* a subprocess with 4 virtual CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=4,
  which must be set before jax is imported): sharded photometry / simulation / sampling /
  streaming inference and data-parallel training equal the single-device results.
* two processes joined by jax.distributed on 127.0.0.1: each simulates its share of the shards,
  process 0 merges the manifests; then data-parallel training over a mesh spanning both
  processes equals single-device training (skipped if the processes cannot connect).

In a plain pytest run the 4-device worker starts with the module's first model, the 1-device
workers once this process has compiled the programs they share with it (the simulation block,
the sampler: they read them back from the persistent compilation cache of tests/conftest.py),
and all work while the in-process tests run. Under pytest-xdist (CI: both cores already busy,
and this module's tests may be split between the workers) each worker process is started by
the first test that needs its results instead, so none is started twice or in vain. This file
is also their entry point (``python test_parallel.py ...``). A 1-band model and 256-row blocks
keep every compilation small.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

FILTERS = ["sdss_r"]
BLOCK = 256
N_ROWS = 1200  # 5 blocks; 3 shards of 512 rows (last 176)
CHUNK = 512
SEED = 11
N_SAMPLES = 24
MAX_ROWS = 64 * N_SAMPLES  # 64 galaxies per compiled sampling call (one compilation)
HERE = os.path.abspath(__file__)
DIST_EXIT_SKIP = 77
#: start the worker processes early (overlapping this process's tests) in a plain run; under
#: pytest-xdist only when a test needs them (see the module docstring)
EAGER_WORKERS = "PYTEST_XDIST_WORKER" not in os.environ


# ---------------------------------------------------------------------------------------------
# shared helpers (used here and in the worker processes)
# ---------------------------------------------------------------------------------------------
def _model():
    from sedflow_jax.sed.model import load_model

    return load_model(z_max=0.2, filters=FILTERS)


def _reference(model):
    from sedflow_jax.sim import simulate as S
    from sedflow_jax.sim import readers as SR
    from sedflow_jax.sim import layout

    return S.simulate(SEED, N_ROWS, model, block=BLOCK, chunk=CHUNK, include_flux=True,
                      progress=False)


def _flow_config(batch_norm=False):
    from sedflow_jax.nn import flow as F

    # one block: the unrolled sampler compiles in half the time of two
    return F.FlowConfig.small(11, 2 * len(FILTERS) + 1, seed=0, n_blocks=1, hidden=32,
                              batch_norm=batch_norm)


def _posterior():
    """An untrained flow centred in the prior box (acceptance below 1, not tiny); fixed
    z-scoring of x = [mag_r, sigma_mag_r, z] and a training range that makes a few rows OOD."""
    import jax

    from sedflow_jax.nn import flow as F
    from sedflow_jax.sim import prior as P
    from sedflow_jax.sbi.posterior import AmortizedPosterior

    prior = P.provabgs_prior()
    lo, hi = (np.asarray(a, np.float64) for a in P.sampling_bounds(prior))
    stats = F.ZScoreStats.from_moments((lo + hi) / 2, ((hi - lo) / 5) ** 2,
                                       np.array([19.0, 0.05, 0.1]),
                                       np.array([2.0, 0.05, 0.05]) ** 2)
    flow = F.init_flow(jax.random.PRNGKey(3), _flow_config(), stats=stats)
    return AmortizedPosterior(flow=flow, prior=prior, bands=tuple(FILTERS),
                              x_lo=np.array([10.0, 0.0, 0.0]), x_hi=np.array([22.0, 0.3, 0.2]))


def _random_catalog(n=1100, seed=4):
    """A catalog without simulation (any finite photometry can be sampled)."""
    from astropy.table import Table

    rng = np.random.default_rng(seed)
    t = Table()
    t["objid"] = np.arange(5000, 5000 + n, dtype=np.int64)
    for b in FILTERS:
        f = 10 ** rng.uniform(0.5, 3.0, n)
        t[f"flux_{b}"] = f
        t[f"flux_ivar_{b}"] = 1.0 / (0.05 * f) ** 2
    t["z"] = rng.uniform(0.01, 0.2, n)
    t[f"flux_{FILTERS[0]}"][[3, 500]] = -1.0  # unusable rows
    return t


def _catalog(ref):
    """An astropy Table in the catalog layout: flux / ivar / z of the simulated rows, an id,
    and a few unusable rows (non-positive flux, redshift out of range)."""
    from astropy.table import Table

    t = Table()
    n = len(ref.z)
    t["objid"] = np.arange(1000, 1000 + n, dtype=np.int64)
    for j, b in enumerate(FILTERS):
        t[f"flux_{b}"] = ref.flux[:, j].astype(np.float64)
        t[f"flux_ivar_{b}"] = 1.0 / ref.sigma[:, j].astype(np.float64) ** 2
    t["z"] = ref.z.astype(np.float64)
    t["z"][7] = 0.5  # outside the prior's redshift range
    return t


def _train_data(ref):
    """427 kept rows: a 384 / 43 split, so every training batch of 128 is full (one
    compilation of the training step)."""
    d = ref.training_data()
    return {"theta": np.asarray(d["theta"])[:427], "x": np.asarray(d["x"])[:427]}


def _train_config():
    from sedflow_jax.nn import train as T
    from sedflow_jax.nn import checkpoint as CK
    from sedflow_jax.nn import data as TD

    return T.TrainConfig(seed=0, batch_size=128, learning_rate=1e-3, max_epochs=2, patience=5,
                         eval_batch_size=256, progress=False)


def _flat_params(flow):
    import jax
    from flax import nnx

    leaves = jax.tree_util.tree_leaves(nnx.state(flow, nnx.Param))
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in leaves])


def _summary(path):
    from sedflow_jax import parallel as par
    from sedflow_jax.sbi import sampling as SMP
    from sedflow_jax.sbi import streaming as ST
    from sedflow_jax.sim import simulate as SIM

    t, th = ST.read_inference(path, samples=True)
    return t, th


# ---------------------------------------------------------------------------------------------
# worker processes (entry point: python test_parallel.py <role> ...)
# ---------------------------------------------------------------------------------------------
def _worker_devices(outdir):
    """4 virtual devices: everything sharded; the parent compares with its 1-device results."""
    import jax

    from sedflow_jax import parallel as par
    from sedflow_jax.sbi import sampling as SMP
    from sedflow_jax.sbi import streaming as ST
    from sedflow_jax.sim import simulate as SIM
    from sedflow_jax.sim import simulate as S
    from sedflow_jax.sim import readers as SR
    from sedflow_jax.sim import layout
    from sedflow_jax.nn import train as T
    from sedflow_jax.nn import checkpoint as CK
    from sedflow_jax.nn import data as TD

    assert len(jax.devices()) == 4, jax.devices()
    model = _model()
    mesh = par.make_mesh()
    times = {}
    t0 = time.perf_counter()
    res = S.simulate(SEED, N_ROWS, model, block=BLOCK, chunk=CHUNK, include_flux=True,
                     progress=False, mesh=mesh)
    times["simulate"] = time.perf_counter() - t0
    out = {k: np.asarray(getattr(res, k)) for k in
           ("theta", "theta_s", "x", "z", "keep", "flags", "flux", "sigma", "flux_model")}
    t0 = time.perf_counter()
    out["phot"] = par.sharded_phot_batch(model, res.theta[:999], res.z[:999], mesh)
    times["phot"] = time.perf_counter() - t0
    # data-parallel training (BatchNorm on: its batch statistics must be global too)
    t0 = time.perf_counter()
    fit = T.fit(0, _train_config(), _flow_config(batch_norm=True), data=_train_data(res),
                mesh=mesh)
    times["fit"] = time.perf_counter() - t0
    out["fit_train_loss"] = np.asarray(fit.history["train_loss"])
    out["fit_val_loss"] = np.asarray(fit.history["val_loss"])
    out["fit_params"] = _flat_params(fit.flow)
    # sampling and streaming inference over the 4 devices (rows not a multiple of 4)
    post = _posterior()
    t0 = time.perf_counter()
    s = SMP.sample_rows(post, jax.random.key(5), res.x[:203], np.arange(203), N_SAMPLES,
                        mesh=mesh, max_rows=MAX_ROWS)
    out["rows_s"], out["rows_acc"] = s.s, s.acceptance
    times["sample_rows"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ST.infer_catalog_streaming(post, _catalog(res), os.path.join(outdir, "infer4.h5"),
                                n_samples=N_SAMPLES, key=5, chunk_rows=300, mesh=mesh,
                                max_rows=MAX_ROWS, store_samples=True, keep_columns=["objid"],
                                progress=False)
    times["infer"] = time.perf_counter() - t0
    np.savez(os.path.join(outdir, "devices.npz"), **out)
    with open(os.path.join(outdir, "devices.json"), "w") as fh:
        json.dump(times, fh)


def _worker_distributed(pid, port, outdir):
    """One of two jax.distributed processes (1 CPU device each)."""
    import jax

    try:
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                                   process_id=pid, initialization_timeout=40,
                                   heartbeat_timeout_seconds=30)
        if jax.process_count() != 2:
            raise RuntimeError("not 2 processes")
    except Exception as e:  # cannot connect on this machine: the test is skipped
        print(f"distributed init failed: {e!r}", file=sys.stderr)
        sys.exit(DIST_EXIT_SKIP)
    from sedflow_jax import parallel as par
    from sedflow_jax.sbi import sampling as SMP
    from sedflow_jax.sbi import streaming as ST
    from sedflow_jax.sim import simulate as SIM
    from sedflow_jax.sim import simulate as S
    from sedflow_jax.sim import readers as SR
    from sedflow_jax.sim import layout
    from sedflow_jax.nn import train as T
    from sedflow_jax.nn import checkpoint as CK
    from sedflow_jax.nn import data as TD

    model = _model()
    folder = os.path.join(outdir, "dist_set")
    res, merged = SIM.simulate_distributed(SEED, N_ROWS, model, out=folder, block=BLOCK,
                                           chunk=CHUNK, include_flux=True, progress=False)
    info = {"pid": pid, "rows_computed": res.timings["rows_computed"],
            "host_complete": res.complete, "merged": merged is not None}
    # data-parallel training over a mesh spanning both processes
    data = SR.load_training_set(folder)
    fit = T.fit(0, _train_config(), _flow_config(batch_norm=True),
                data={"theta": data["theta"][:427], "x": data["x"][:427]},
                mesh=par.make_mesh("global"))
    par.barrier("test.fit.done")
    np.savez(os.path.join(outdir, f"dist{pid}.npz"),
             train_loss=np.asarray(fit.history["train_loss"]), params=_flat_params(fit.flow))
    with open(os.path.join(outdir, f"dist{pid}.json"), "w") as fh:
        json.dump(info, fh)
    jax.distributed.shutdown()


KILL_KW = dict(n_samples=N_SAMPLES, key=9, chunk_rows=100, keep_columns=["objid"],
               progress=False, max_rows=MAX_ROWS, store_samples=True)


def _worker_killed_infer(root):
    """Streaming inference of the test catalog that SIGKILLs itself at a random moment once
    two chunks are on disk (mid-chunk, mid-write or between chunks: no clean-up runs)."""
    import threading

    from sedflow_jax import parallel as par
    from sedflow_jax.sbi import sampling as SMP
    from sedflow_jax.sbi import streaming as ST
    from sedflow_jax.sim import simulate as SIM

    post = _posterior()
    cat_path = os.path.join(root, "kill_cat.fits")
    _random_catalog().write(cat_path)
    out = os.path.join(root, "killed.h5")
    parts = out + ".parts"
    rng = np.random.default_rng()

    def killer():
        while len(glob_chunks(parts)) < 2:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.03))
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=killer, daemon=True).start()
    ST.infer_catalog_streaming(post, cat_path, out, _on_chunk=lambda i: time.sleep(0.01),
                                **KILL_KW)
    time.sleep(5)  # not reached unless every chunk finished first
    sys.exit(3)


def glob_chunks(parts):
    import glob

    return glob.glob(os.path.join(parts, "chunk_*.npz"))


# ---------------------------------------------------------------------------------------------
# fixtures: the subprocesses start with the module, results are awaited where needed
# ---------------------------------------------------------------------------------------------
def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(n_devices):
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={n_devices}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


class _Procs:
    """The worker processes, each started once by :meth:`start`; output goes to log files (no
    pipe to fill)."""

    def __init__(self, root):
        self.root = str(root)
        self.logs = {}
        self.dev, self.kill_worker, self.dist = None, None, []

    def start(self, role):
        if role == "devices" and self.dev is None:
            self.dev = self._spawn("devices", 4, self.root)
        elif role == "killed_infer" and self.kill_worker is None:
            self.kill_worker = self._spawn("killed_infer", 1, self.root)
        elif role == "distributed" and not self.dist:
            port = str(_free_port())
            self.dist = [self._spawn("distributed", 1, str(i), port, self.root)
                         for i in range(2)]
        return self

    def _spawn(self, role, n_devices, *args):
        log = os.path.join(self.root, f"{role}{'-' + args[0] if role == 'distributed' else ''}"
                                      ".log")
        fh = open(log, "w")
        p = subprocess.Popen([sys.executable, HERE, role, *args], env=_env(n_devices),
                             stdout=fh, stderr=subprocess.STDOUT)
        fh.close()
        self.logs[p.pid] = log
        return p

    def wait(self, p, timeout):
        try:
            p.wait(timeout=timeout)
            rc = p.returncode
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            rc = None
        with open(self.logs[p.pid]) as fh:
            return rc, fh.read()

    def kill(self):
        for p in [self.dev, self.kill_worker, *self.dist]:
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def procs(tmp_path_factory):
    pr = _Procs(tmp_path_factory.mktemp("parallel_workers"))
    yield pr
    pr.kill()


@pytest.fixture(scope="module")
def model(procs):
    if EAGER_WORKERS:  # before anything compiles here (it shares no program with this process)
        procs.start("devices")
    return _model()


@pytest.fixture(scope="module")
def reference(model):
    return _reference(model)


@pytest.fixture(scope="module")
def posterior():
    return _posterior()


@pytest.fixture(scope="module")
def catalog(reference):
    return _catalog(reference)


@pytest.fixture(scope="module")
def sampler_compiled(posterior):
    """The 1-device sampler compiled here (64 rows x N_SAMPLES draws: the shape of every
    sampling call in this process and in the killed worker, which reads it from the
    persistent compilation cache)."""
    import jax

    from sedflow_jax.sbi import sampling as SMP

    x = np.tile(np.array([19.0, 0.05, 0.1], np.float32), (4, 1))
    SMP.sample_rows(posterior, jax.random.key(0), x, np.arange(4), N_SAMPLES, max_rows=MAX_ROWS)


@pytest.fixture(scope="module")
def early_workers(procs, reference, sampler_compiled):
    """In a plain run: the 1-device workers start here (after the simulation block and the
    sampler they share with this process are compiled) and run during the tests that follow."""
    if EAGER_WORKERS:
        procs.start("killed_infer")
        procs.start("distributed")


@pytest.fixture(scope="module")
def killed_worker(procs, sampler_compiled):
    return procs.start("killed_infer")


@pytest.fixture(scope="module")
def dist_workers(procs, reference):
    return procs.start("distributed")  # after ``reference``: its simulation block is compiled


@pytest.fixture(scope="module")
def fit_reference(reference):
    from sedflow_jax.nn import train as T
    from sedflow_jax.nn import checkpoint as CK
    from sedflow_jax.nn import data as TD

    return T.fit(0, _train_config(), _flow_config(batch_norm=True), data=_train_data(reference))


@pytest.fixture(scope="module")
def infer_reference(posterior, catalog, tmp_path_factory):
    from sedflow_jax import parallel as par
    from sedflow_jax.sbi import sampling as SMP
    from sedflow_jax.sbi import streaming as ST
    from sedflow_jax.sim import simulate as SIM

    out = str(tmp_path_factory.mktemp("infer_ref") / "ref.h5")
    res = ST.infer_catalog_streaming(posterior, catalog, out, n_samples=N_SAMPLES, key=5,
                                      chunk_rows=300, store_samples=True, max_rows=MAX_ROWS,
                                      keep_columns=["objid"], progress=False)
    assert res.complete and res.finalized and res.chunks_computed == 4
    t, th = _summary(out)
    t.meta["path"] = out
    return t, th


def _as_disk(res):
    return {"theta": res.theta_s, "theta12": res.theta, "x": res.x, "z": res.z,
            "keep": res.keep, "flags": res.flags}


def _assert_bitwise(a, b, keys=("theta", "theta12", "x", "z", "keep", "flags")):
    for k in keys:
        assert a[k].shape == b[k].shape, k
        assert np.array_equal(np.asarray(a[k]).view(np.uint8), np.asarray(b[k]).view(np.uint8)), k


def _assert_tables_equal(a, b, cols=None):
    cols = cols or a.colnames
    assert len(a) == len(b)
    for c in cols:
        x, y = np.asarray(a[c]), np.asarray(b[c])
        if x.dtype.kind == "f":
            np.testing.assert_array_equal(x, y, err_msg=c)  # NaN == NaN here
        else:
            assert np.array_equal(x, y), c


# ---------------------------------------------------------------------------------------------
# meshes and padding (cheap)
# ---------------------------------------------------------------------------------------------
def test_mesh_padding_and_partition():
    import jax

    from sedflow_jax import parallel as par
    from sedflow_jax.sbi import sampling as SMP
    from sedflow_jax.sbi import streaming as ST
    from sedflow_jax.sim import simulate as SIM

    mesh = par.make_mesh()
    assert par.mesh_size(mesh, local=True) == len(jax.local_devices())
    assert mesh.axis_names == ("data",)
    a = np.arange(10).reshape(5, 2)
    p, n = par.pad_rows(a, 4)
    assert n == 5 and p.shape == (8, 2) and np.array_equal(p[5:], np.repeat(a[-1:], 3, 0))
    sa, n = par.shard_rows(a, mesh)
    assert n == 5 and np.array_equal(np.asarray(sa)[:n], a)
    assert par.host_partition(7, 1, 3) == [1, 4]
    assert sorted(sum((par.host_partition(11, p, 4) for p in range(4)), [])) == list(range(11))
    with pytest.raises(ValueError):
        par.make_mesh(len(jax.local_devices()) + 1)
    with pytest.raises(ValueError):
        par.host_partition(3, 2, 2)


# ---------------------------------------------------------------------------------------------
# several hosts writing one training set
# ---------------------------------------------------------------------------------------------
def test_hosts_share_shards_and_merge(model, reference, tmp_path):
    from sedflow_jax import parallel as par
    from sedflow_jax.sbi import sampling as SMP
    from sedflow_jax.sbi import streaming as ST
    from sedflow_jax.sim import simulate as SIM
    from sedflow_jax.sim import simulate as S
    from sedflow_jax.sim import readers as SR
    from sedflow_jax.sim import layout

    out = tmp_path / "set"
    kw = dict(block=BLOCK, chunk=CHUNK, include_flux=True, progress=False, out=out)
    r1 = S.simulate(SEED, N_ROWS, model, hosts=(1, 2), **kw)
    assert r1.complete and r1.timings["rows_computed"] == 512  # shard 1 only
    assert (out / "manifest.host1.json").exists() and not (out / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="merge_manifests"):
        SR.load_training_set(out)
    with pytest.raises(ValueError, match="not done"):
        SIM.merge_manifests(out)
    assert SIM.merge_manifests(out, strict=False) is None
    r0 = S.simulate(SEED, N_ROWS, model, hosts=(0, 2), **kw)  # shards 0, 2; then merges
    assert r0.timings["rows_computed"] == 512 + 176
    m = S.read_manifest(out)
    assert m["complete"] and [e["index"] for e in m["shards"]] == [0, 1, 2]
    assert m["n_rows_done"] == N_ROWS and "host" not in m
    _assert_bitwise(SR.load_training_set(out, keep_only=False), _as_disk(reference))
    again = SIM.merge_manifests(out, verify=True)  # idempotent
    assert [e["sha256"] for e in again["shards"]] == [e["sha256"] for e in m["shards"]]
    # a different configuration in the same folder is refused, per host too
    with pytest.raises(ValueError, match="different configuration"):
        S.simulate(SEED + 1, N_ROWS, model, hosts=(0, 2), **kw)


def test_hosts_restart_with_another_count(model, reference, tmp_path):
    """Kill / restart hosts with another process count: every shard is computed exactly once."""
    from sedflow_jax import parallel as par
    from sedflow_jax.sbi import sampling as SMP
    from sedflow_jax.sbi import streaming as ST
    from sedflow_jax.sim import simulate as SIM
    from sedflow_jax.sim import simulate as S
    from sedflow_jax.sim import readers as SR
    from sedflow_jax.sim import layout

    n = 2 * N_ROWS  # 10 blocks -> 5 shards: host 0 of 2 owns 0, 2, 4; host 1 owns 1, 3
    out = tmp_path / "set"
    kw = dict(block=BLOCK, chunk=CHUNK, progress=False, out=out)
    computed = 0
    r = S.simulate(SEED, n, model, hosts=(0, 2), **kw)  # host 0 finishes its share
    computed += r.timings["rows_computed"]
    r = S.simulate(SEED, n, model, hosts=(1, 2), _stop_after_shards=1, **kw)  # host 1 "killed"
    computed += r.timings["rows_computed"]
    assert not r.complete and not (out / "manifest.json").exists()
    # restart as 3 hosts: 0 owns 0, 3 (3 is missing); 1 owns 1, 4; 2 owns 2
    for p in (2, 0, 1):
        r = S.simulate(SEED, n, model, hosts=(p, 3), **kw)
        assert r.complete
        computed += r.timings["rows_computed"]
    assert computed == n  # nothing computed twice
    m = S.read_manifest(out)
    assert m["complete"] and m["n_rows_done"] == n
    assert [(e["row_start"], e["row_stop"]) for e in m["shards"]] == \
        [(i * CHUNK, min(n, (i + 1) * CHUNK)) for i in range(5)]
    full = SR.load_training_set(out, keep_only=False)
    _assert_bitwise({k: v[:N_ROWS] for k, v in full.items()}, _as_disk(reference))
    assert np.array_equal(full["row"], np.arange(n))
    # a single host resuming the finished folder computes nothing
    r = S.simulate(SEED, n, model, **kw)
    assert r.complete and r.timings["rows_computed"] == 0
    assert SIM.merge_manifests(out)["n_rows_done"] == n


# ---------------------------------------------------------------------------------------------
# row-keyed posterior draws
# ---------------------------------------------------------------------------------------------
def test_sample_rows_blocked_and_whole_calls_agree(posterior, reference, monkeypatch):
    """On a CPU a compiled sampling call draws a few rows at a time (blocks of ~16,384 draws
    stay in cache); on an accelerator it draws all its rows at once: the same draws either way."""
    import jax

    from sedflow_jax.sbi import sampling as SMP

    assert SMP._rows_per_block(1000, "cpu") == 16 and SMP._rows_per_block(10, "cpu") == 1024
    assert SMP._rows_per_block(20_000, "cpu") == 1 and SMP._rows_per_block(1000, "gpu") is None
    assert SMP._block_for(16, 4) == 4 and SMP._block_for(24, 16) == 8
    assert SMP._block_for(3, 4) is None
    assert SMP.RowSampler(posterior.flow, 1000).group == 64  # 65,536 draws -> 4 blocks of 16
    key, rows = jax.random.key(3), np.arange(24)
    ctx = posterior.context(reference.x[:24])[0]
    blocked = SMP.RowSampler(posterior.flow, 1000)(key, rows, ctx)  # 32 rows: 2 blocks of 16
    monkeypatch.setattr(SMP, "_rows_per_block", lambda n, backend: None)
    SMP._sample_fn.cache_clear()
    try:
        whole = SMP.RowSampler(posterior.flow, 1000)(key, rows, ctx)
    finally:
        SMP._sample_fn.cache_clear()
    assert blocked.shape == (24, 1000, 11) and np.isfinite(blocked).all()
    assert np.std(blocked[:, :, 0], axis=1).min() > 0  # draws, not a constant
    np.testing.assert_allclose(whole, blocked, rtol=1e-5, atol=1e-4)


def test_sample_rows_is_row_keyed(posterior, reference, early_workers):
    import jax

    from sedflow_jax import parallel as par
    from sedflow_jax.sbi import sampling as SMP
    from sedflow_jax.sbi import streaming as ST
    from sedflow_jax.sim import simulate as SIM

    key = jax.random.key(5)
    x = reference.x[:60]
    rows = np.arange(60)
    # one rejection round with rows 0..m-1: exactly posterior.sample_batched's draws
    a = SMP.sample_rows(posterior, key, x, rows, N_SAMPLES, max_rounds=1, max_rows=MAX_ROWS)
    b = posterior.sample_batched(key, x, N_SAMPLES, max_rounds=1, max_rows=MAX_ROWS)
    for f in ("s", "theta", "acceptance", "n_accepted", "low_acceptance", "ood"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
    # full rejection: a row's draws do not depend on the other rows or the grouping
    full = SMP.sample_rows(posterior, key, x, rows, N_SAMPLES, max_rows=MAX_ROWS)
    assert 0.05 < full.acceptance.mean() < 0.95  # the rejection loop is exercised
    assert np.isfinite(full.s).all(-1).sum() == full.n_accepted.sum()
    perm = np.random.default_rng(0).permutation(60)
    part = SMP.sample_rows(posterior, key, x[perm[:25]], rows[perm[:25]], N_SAMPLES,
                           max_rows=MAX_ROWS)
    np.testing.assert_array_equal(part.s, full.s[perm[:25]])
    np.testing.assert_array_equal(part.acceptance, full.acceptance[perm[:25]])
    inside = full.s[np.isfinite(full.s).all(-1)]
    from sedflow_jax.sim import prior as P

    assert np.asarray(P.in_support(posterior.prior, inside)).all()


# ---------------------------------------------------------------------------------------------
# streaming inference
# ---------------------------------------------------------------------------------------------
def test_streaming_infer_layout(infer_reference, catalog, posterior):
    from astropy.table import Table

    t, th = infer_reference
    n = len(catalog)
    assert np.array_equal(t["row"], np.arange(n)) and np.array_equal(t["objid"], catalog["objid"])
    flux = np.asarray(catalog[f"flux_{FILTERS[0]}"])
    usable = (flux > 0) & (np.arange(n) != 7)
    assert np.array_equal(t["flag"] == 0, usable)
    assert t["ood"][7] and np.isnan(t["logmstar_p50"][7]) and t["acceptance"][7] == 0
    assert np.isfinite(t["logmstar_p50"][usable]).all()
    assert th.shape == (n, N_SAMPLES, 12) and np.isnan(th[~usable]).all()
    ok = t["n_accepted"] == N_SAMPLES
    assert np.isfinite(th[ok]).all()
    assert t.meta["stats"]["n_usable"] == usable.sum()
    # astropy reads the summary table directly
    t2 = Table.read(t.meta["path"], path="summary")
    _assert_tables_equal(t2, t)


def test_streaming_infer_chunking_and_formats(infer_reference, posterior, catalog, tmp_path):
    """FITS and HDF5 catalogs, another chunk size, a stop-and-resume: the same rows."""
    from astropy.table import Table

    from sedflow_jax import parallel as par
    from sedflow_jax.sbi import sampling as SMP
    from sedflow_jax.sbi import streaming as ST
    from sedflow_jax.sim import simulate as SIM

    ref, ref_th = infer_reference
    fits_path = tmp_path / "cat.fits"
    catalog.write(fits_path)
    h5_path = tmp_path / "cat.h5"
    catalog.write(h5_path, path="catalog")
    kw = dict(n_samples=N_SAMPLES, key=5, store_samples=True, keep_columns=["objid"],
              progress=False, max_rows=MAX_ROWS)
    out = tmp_path / "fits.h5"
    r = ST.infer_catalog_streaming(posterior, fits_path, out, chunk_rows=128,
                                    _stop_after_chunks=3, **kw)
    assert r.chunks_computed == 3 and not r.complete and not out.exists()
    r = ST.infer_catalog_streaming(posterior, fits_path, out, chunk_rows=128, **kw)
    assert r.chunks_computed == r.n_chunks - 3 and r.complete and r.finalized
    assert not os.path.exists(r.parts)  # chunk files removed after assembling
    t, th = _summary(out)
    _assert_tables_equal(t, ref)
    np.testing.assert_array_equal(th, ref_th)
    assert np.array_equal(Table.read(out, path="summary")["row"], np.arange(len(catalog)))
    # a finished output is not recomputed; another configuration is refused
    r = ST.infer_catalog_streaming(posterior, fits_path, out, chunk_rows=128, **kw)
    assert r.finalized and r.chunks_computed == 0
    with pytest.raises(ValueError, match="another inference run"):
        ST.infer_catalog_streaming(posterior, fits_path, out, chunk_rows=64, **kw)
    out2 = tmp_path / "h5.h5"
    ST.infer_catalog_streaming(posterior, h5_path, out2, chunk_rows=500, **kw)
    t2, th2 = _summary(out2)
    _assert_tables_equal(t2, ref)
    np.testing.assert_array_equal(th2, ref_th)


def test_streaming_infer_hosts_and_derived(infer_reference, posterior, catalog, model,
                                           tmp_path):
    """Chunks split over two hosts (run one after the other here) assemble to the same file;
    with a model, derived-property summaries are added (one compilation for all chunks: 2
    chunks of 45 rows, each padded to the same 64-galaxy group)."""
    from sedflow_jax import parallel as par
    from sedflow_jax.sbi import sampling as SMP
    from sedflow_jax.sbi import streaming as ST
    from sedflow_jax.sim import simulate as SIM

    ref, ref_th = infer_reference
    kw = dict(n_samples=N_SAMPLES, key=5, store_samples=True, keep_columns=["objid"],
              progress=False, max_rows=MAX_ROWS, chunk_rows=300)
    out = tmp_path / "hosts.h5"
    r1 = ST.infer_catalog_streaming(posterior, catalog, out, hosts=(1, 2), **kw)
    assert r1.chunks_computed == 2 and not r1.complete and not out.exists()
    assert json.load(open(os.path.join(r1.parts, "progress.host1.json")))["assigned"] == [1, 3]
    r0 = ST.infer_catalog_streaming(posterior, catalog, out, hosts=(0, 2), **kw)
    assert r0.chunks_computed == 2 and r0.complete and r0.finalized
    assert os.path.isdir(r0.parts)  # several hosts: parts kept (another may still read them)
    t, th = _summary(out)
    _assert_tables_equal(t, ref)
    np.testing.assert_array_equal(th, ref_th)
    ST.finalize_inference(out)  # explicit re-assembly, then the parts go
    assert not os.path.exists(r0.parts)
    _assert_tables_equal(_summary(out)[0], ref)

    small = catalog[:90]
    out = tmp_path / "derived.h5"
    ST.infer_catalog_streaming(posterior, small, out, model=model, n_derived=6,
                                **{**kw, "chunk_rows": 45})
    t, _ = _summary(out)
    _assert_tables_equal(t, ref[:90], cols=ref.colnames)
    use = np.asarray(t["flag"]) == 0
    for name in ("logmstar_surviving", "log_sfr_100myr", "log_z_mw", "t_mw"):
        assert np.isfinite(t[f"{name}_p50"][use & (t["n_accepted"] > 0)]).all(), name
        assert np.isnan(t[f"{name}_p50"][~use]).all(), name


def test_streaming_infer_survives_sigkill(killed_worker, posterior):
    """A streaming run SIGKILLed at a random moment; the resumed run equals an uninterrupted
    one: every row once, nothing recomputed that was on disk."""
    from sedflow_jax import parallel as par
    from sedflow_jax.sbi import sampling as SMP
    from sedflow_jax.sbi import streaming as ST
    from sedflow_jax.sim import simulate as SIM

    procs = killed_worker
    rc, log = procs.wait(procs.kill_worker, 240)
    assert rc == -signal.SIGKILL, f"the worker was not killed (rc={rc}):\n{log[-3000:]}"
    out = os.path.join(procs.root, "killed.h5")
    cat_path = os.path.join(procs.root, "kill_cat.fits")
    n_on_disk = len(glob_chunks(out + ".parts"))
    assert n_on_disk >= 2 and not os.path.exists(out)
    r = ST.infer_catalog_streaming(posterior, cat_path, out, **KILL_KW)
    assert r.complete and r.finalized and r.chunks_computed == r.n_chunks - n_on_disk
    t, th = _summary(out)
    catalog = _random_catalog()
    assert np.array_equal(t["row"], np.arange(len(catalog)))
    assert np.array_equal(t["objid"], catalog["objid"])
    assert (np.asarray(t["flag"]) != 0).sum() == 2
    # the same as one uninterrupted run with this key (row-keyed: chunking does not matter)
    x, rows = _usable_x(catalog, posterior)
    full = SMP.sample_rows(posterior, 9, x, rows, N_SAMPLES, max_rows=MAX_ROWS)
    use = np.asarray(t["flag"]) == 0
    np.testing.assert_array_equal(th[use], full.theta)
    np.testing.assert_array_equal(np.asarray(t["acceptance"])[use], full.acceptance)
    np.testing.assert_array_equal(np.asarray(t["n_accepted"])[use], full.n_accepted)


def _usable_x(catalog, posterior):
    from sedflow_jax.io import catalog as C
    from sedflow_jax.io import mocks
    from sedflow_jax.sim import layout

    ph = C.read_photometry(catalog, posterior.bands,
                           z_range=(posterior.prior.zmin, posterior.prior.zmax))
    x = layout.to_conditioning(ph.flux, ph.sigma, ph.z)
    use = ph.flag == 0
    return x[use], np.flatnonzero(use)


# ---------------------------------------------------------------------------------------------
# 4 virtual devices == 1 device
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def devices_result(procs):
    rc, out = procs.wait(procs.start("devices").dev, 240)
    assert rc == 0, f"4-device worker failed (rc={rc}):\n{out[-5000:]}"
    with np.load(os.path.join(procs.root, "devices.npz")) as z:
        res = {k: z[k] for k in z.files}
    with open(os.path.join(procs.root, "devices.json")) as fh:
        res["times"] = json.load(fh)
    return res


def test_sharded_simulation_equals_single_device(devices_result, reference):
    d = devices_result
    # random draws are identical; photometry differs only by float rounding
    for k in ("theta", "theta_s", "z"):
        np.testing.assert_array_equal(d[k], getattr(reference, k), err_msg=k)
    for k in ("flux_model", "flux", "sigma"):
        np.testing.assert_allclose(d[k], getattr(reference, k), rtol=1e-5, atol=0, err_msg=k)
    np.testing.assert_allclose(d["x"], reference.x, rtol=1e-5, atol=1e-6)
    assert np.array_equal(d["keep"], reference.keep) and np.array_equal(d["flags"],
                                                                        reference.flags)
    np.testing.assert_allclose(d["phot"], reference.flux_model[:999], rtol=1e-5, atol=0)


def test_data_parallel_training_equals_single_device(devices_result, fit_reference):
    d = devices_result
    np.testing.assert_allclose(d["fit_train_loss"], fit_reference.history["train_loss"],
                               rtol=1e-5)
    np.testing.assert_allclose(d["fit_val_loss"], fit_reference.history["val_loss"], rtol=1e-5)
    w = _flat_params(fit_reference.flow)
    assert np.max(np.abs(d["fit_params"] - w)) <= 1e-5 * np.max(np.abs(w))


def test_sharded_sampling_and_inference_equal_single_device(devices_result, posterior,
                                                            reference, infer_reference, procs):
    import jax

    from sedflow_jax import parallel as par
    from sedflow_jax.sbi import sampling as SMP
    from sedflow_jax.sbi import streaming as ST
    from sedflow_jax.sim import simulate as SIM

    d = devices_result
    s = SMP.sample_rows(posterior, jax.random.key(5), reference.x[:203], np.arange(203),
                        N_SAMPLES, max_rows=MAX_ROWS)
    np.testing.assert_allclose(d["rows_s"], s.s, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(d["rows_acc"], s.acceptance)
    t4, th4 = _summary(os.path.join(procs.root, "infer4.h5"))
    ref, ref_th = infer_reference
    for c in ref.colnames:
        a, b = np.asarray(t4[c]), np.asarray(ref[c])
        if a.dtype.kind == "f":
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=c)
        else:
            assert np.array_equal(a, b), c
    np.testing.assert_allclose(th4, ref_th, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# two processes through jax.distributed on loopback
# ---------------------------------------------------------------------------------------------
def test_two_processes_jax_distributed(dist_workers, reference, fit_reference):
    from sedflow_jax.sim import simulate as S
    from sedflow_jax.sim import readers as SR
    from sedflow_jax.sim import layout

    procs = dist_workers
    outs = [procs.wait(p, 240) for p in procs.dist]
    rcs = [rc for rc, _ in outs]
    if DIST_EXIT_SKIP in rcs:
        pytest.skip("jax.distributed could not initialise on 127.0.0.1: "
                    + outs[rcs.index(DIST_EXIT_SKIP)][1][-500:])
    for rc, out in outs:
        assert rc == 0, f"distributed worker failed (rc={rc}):\n{out[-5000:]}"
    infos = [json.load(open(os.path.join(procs.root, f"dist{i}.json"))) for i in range(2)]
    # each process computed its own shards: 0 and 2 (512 + 176 rows), and 1 (512 rows)
    assert sorted(i["rows_computed"] for i in infos) == [512, 688]
    assert infos[0]["merged"] and not infos[1]["merged"]
    folder = os.path.join(procs.root, "dist_set")
    _assert_bitwise(SR.load_training_set(folder, keep_only=False), _as_disk(reference))
    # gradients all-reduced across the two processes == one device
    z = [np.load(os.path.join(procs.root, f"dist{i}.npz")) for i in range(2)]
    np.testing.assert_allclose(z[0]["train_loss"], fit_reference.history["train_loss"],
                               rtol=1e-5)
    np.testing.assert_array_equal(z[0]["params"], z[1]["params"])
    w = _flat_params(fit_reference.flow)
    assert np.max(np.abs(z[0]["params"] - w)) <= 1e-5 * np.max(np.abs(w))


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "devices":
        _worker_devices(sys.argv[2])
    elif role == "distributed":
        _worker_distributed(int(sys.argv[2]), sys.argv[3], sys.argv[4])
    elif role == "killed_infer":
        _worker_killed_infer(sys.argv[2])
    else:
        raise SystemExit(f"unknown role {role}")
