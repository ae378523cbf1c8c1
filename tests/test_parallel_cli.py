"""Scale-out through the command line: `simulate --devices / --process-id`, `merge-manifests`,
`train --devices`, `infer --stream [--resume]` and `finalize`.

Everything tiny: a 1-band model, 64-row blocks, an untrained 1-block flow for inference whose
draws depend on the photometry (:func:`tiny_posterior`: a wrong column changes the answer).
The 2-device run needs XLA_FLAGS=--xla_force_host_platform_device_count=2 before jax is
imported, so it is a subprocess, started with the module's first test and awaited where needed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sedflow_jax import cli
from sedflow_jax.cli import config as cli_config

SIM = ["--n", "512", "--seed", "5", "--filters", "sdss_r", "--block", "64", "--chunk", "128",
       "--quiet"]  # 4 shards of 128 rows
TRAIN = ["--blocks", "1", "--hidden", "16", "--batch-size", "64", "--max-epochs", "2",
         "--lr", "1e-3", "--quiet"]
N_SAMPLES = 24
# usable catalog rows: one compiled sampler shape for every non-stream run; a power of two, so
# that AmortizedPosterior.sample_batched draws row j with fold_in(key, j) (no repeated rows)
N_GOOD = 32

_WORKER = """
import sys
from sedflow_jax import cli
from sedflow_jax.cli import config as cli_config
root, sim = sys.argv[1], sys.argv[2].split()
sys.exit(cli.main(["simulate", *sim, "--out", root + "/sim2", "--devices", "2"]))
"""


# ---------------------------------------------------------------------------------------------
# helpers shared with tests/test_cli_bad_input.py
# ---------------------------------------------------------------------------------------------
def tiny_posterior(bands=("sdss_r",), *, mask_aware=False, seed=3, strength=0.3):
    """An untrained 1-block posterior centred in the prior box whose draws depend on the
    photometry: the shift of every coordinate is a random linear function of the z-scored
    context (magnitudes, sigmas, z, and the band mask when ``mask_aware``), so a wrong column
    or a wrong flux changes the answer."""
    import jax

    from sedflow_jax.nn import flow as F
    from sedflow_jax.sim import prior as P
    from sedflow_jax.sbi.posterior import AmortizedPosterior

    nb = len(bands)
    prior = P.provabgs_prior()
    lo, hi = (np.asarray(a, np.float64) for a in P.sampling_bounds(prior))
    xm = np.r_[np.full(nb, 19.0), np.full(nb, 0.05), 0.1]
    xs = np.r_[np.full(nb, 2.0), np.full(nb, 0.05), 0.05]
    if mask_aware:
        xm, xs = np.r_[xm, np.full(nb, 0.5)], np.r_[xs, np.full(nb, 0.5)]
    stats = F.ZScoreStats.from_moments((lo + hi) / 2, ((hi - lo) / 5) ** 2, xm, xs ** 2)
    flow = F.init_flow(jax.random.PRNGKey(seed),
                       F.FlowConfig.small(11, xm.size, seed=0, n_blocks=1, hidden=32),
                       stats=stats)
    made = flow.blocks[0]
    w = np.random.default_rng(seed).normal(size=(xm.size, 11)) * strength
    k = np.zeros(made.output_context_layer.kernel[...].shape, np.float32)
    k[:, 11:22] = w  # the shift of each coordinate (params (raw scale, shift) x 11 dims)
    made.output_context_layer.kernel[...] = k
    meta = {}
    if mask_aware:
        meta["band_mask"] = {"fill": np.r_[np.full(nb, 19.0), np.full(nb, 0.05)].tolist(),
                             "p_drop": 0.5, "min_bands": 1,
                             "layout": "[mags', sigma_mags', z, mask]"}
    return AmortizedPosterior(flow=flow, prior=prior, bands=tuple(bands),
                              x_lo=np.r_[np.full(nb, 10.0), np.zeros(nb), 0.0],
                              x_hi=np.r_[np.full(nb, 22.0), np.full(nb, 0.3), 0.2], meta=meta)


def save_tiny_posterior(path, **kw):
    """:func:`tiny_posterior` (1-band sdss_r by default) saved to ``path``."""
    tiny_posterior(**kw).save(path)
    return str(path)


def good_catalog(n=N_GOOD, seed=4):
    """An astropy Table in the `infer` layout with every row usable (z inside (0, 0.2])."""
    from astropy.table import Table

    rng = np.random.default_rng(seed)
    t = Table()
    t["objid"] = np.arange(100, 100 + n, dtype=np.int64)
    f = 10 ** rng.uniform(0.5, 3.0, n)
    t["flux_sdss_r"] = f
    t["flux_ivar_sdss_r"] = 1.0 / (0.05 * f) ** 2
    t["z"] = rng.uniform(0.01, 0.2, n)
    return t


def filled(col):
    """Column values with FITS-masked entries as NaN."""
    a = np.ma.asarray(col)
    return np.ma.filled(a.astype(float), np.nan) if a.dtype.kind == "f" else np.asarray(a)


def assert_tables_match(a, b, *, rtol=1e-5, skip=("row", "n_bands_used")):
    # both paths write n_bands_used (one inference step); checked here for the 1-band model
    for t in (a, b):
        if "n_bands_used" in t.colnames and "flag" in t.colnames:
            ok = np.asarray(t["flag"]) == 0
            assert np.all(np.asarray(t["n_bands_used"])[ok] == 1)  # the 1-band test model
    cols = [c for c in a.colnames if c not in skip]
    assert cols == [c for c in b.colnames if c not in skip]
    assert len(a) == len(b)
    for c in cols:
        x, y = filled(a[c]), filled(b[c])
        if x.dtype.kind == "f":
            np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-6, err_msg=c)  # NaN == NaN
        else:
            assert np.array_equal(x, y), c


def run(argv, capsys=None):
    rc = cli.main([str(v) for v in argv])
    out = capsys.readouterr() if capsys is not None else None
    return rc, out


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("parallel_cli")


@pytest.fixture(scope="module")
def worker(root):
    """`simulate --devices 2` in a process with 2 virtual CPU devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        " --xla_force_host_platform_device_count=2").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("PYTEST_CURRENT_TEST", None)
    log = open(root / "worker.log", "w")
    p = subprocess.Popen([sys.executable, "-c", _WORKER, str(root), " ".join(SIM)], env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    yield p
    if p.poll() is None:
        p.kill()
        p.wait()


def _wait(worker, root):
    try:
        rc = worker.wait(timeout=300)
    except subprocess.TimeoutExpired:
        worker.kill()
        rc = None
    assert rc == 0, f"2-device worker failed (rc={rc}):\n{(root / 'worker.log').read_text()[-4000:]}"


@pytest.fixture(scope="module")
def sim1(worker, root):  # requesting the worker first: it starts before anything compiles here
    out = root / "sim1"
    assert cli.main(["simulate", *SIM, "--out", str(out), "--devices", "1"]) == 0
    return out


def _load(folder):
    from sedflow_jax.sim import readers as SR

    return SR.load_training_set(folder, keep_only=False)


# ---------------------------------------------------------------------------------------------
# simulate over devices and hosts, merge-manifests
# ---------------------------------------------------------------------------------------------
def test_simulate_devices_2_equals_1(worker, root, sim1):
    _wait(worker, root)
    a, b = _load(sim1), _load(root / "sim2")
    # the random draws are bit-identical; the photometry split over devices to float rounding
    for k in ("theta", "z", "row"):
        assert np.array_equal(a[k], b[k]), k
    np.testing.assert_allclose(b["x"], a["x"], rtol=1e-5, atol=1e-6)
    assert np.array_equal(a["keep"], b["keep"]) and np.array_equal(a["flags"], b["flags"])
    assert np.array_equal(a["row"], np.arange(512))
    rec = (root / "sim2" / "config.toml").read_text()
    assert 'devices = 2' in rec and 'command = "simulate"' in rec


def test_hosts_and_merge_manifests(sim1, tmp_path, capsys):
    ref = _load(sim1)
    shared = tmp_path / "shared"
    assert cli.main(["simulate", *SIM, "--out", str(shared), "--process-id", "1",
                     "--num-processes", "2"]) == 0
    assert "other hosts still running" in capsys.readouterr().out
    assert sorted(p.name for p in shared.glob("shard_*.npz")) == ["shard_00001.npz",
                                                                  "shard_00003.npz"]
    assert not (shared / "manifest.json").exists()
    assert cli.main(["merge-manifests", str(shared)]) == 2  # host 0's shards are missing
    assert "shard 0 not done" in capsys.readouterr().err
    assert cli.main(["simulate", *SIM, "--out", str(shared), "--process-id", "0",
                     "--num-processes", "2"]) == 0  # the last host merges
    assert "training set complete" in capsys.readouterr().out
    assert (shared / "config.host0.toml").exists() and (shared / "config.host1.toml").exists()
    (shared / "manifest.json").unlink()
    assert cli.main(["merge-manifests", str(shared), "--verify"]) == 0
    assert "4 shards, 512 rows" in capsys.readouterr().out
    got = _load(shared)
    assert np.array_equal(got["row"], np.arange(512))  # every row once, in order
    for k in ("theta", "x", "z", "keep", "flags"):
        assert np.array_equal(got[k], ref[k]), k

    # hosts without a shared file system: one folder each, then copied together and merged
    f0, f1, dest = tmp_path / "h0", tmp_path / "h1", tmp_path / "merged"
    for pid, f in ((0, f0), (1, f1)):
        assert cli.main(["simulate", *SIM, "--out", str(f), "--process-id", str(pid),
                         "--num-processes", "2"]) == 0
    assert not (f0 / "manifest.json").exists() and not (f1 / "manifest.json").exists()
    capsys.readouterr()
    assert cli.main(["merge-manifests", str(dest), "--from", str(f0)]) == 2  # half missing
    assert "not done" in capsys.readouterr().err
    assert cli.main(["merge-manifests", str(dest), "--from", str(f0), str(f1)]) == 0
    got = _load(dest)
    assert np.array_equal(got["row"], np.arange(512))
    for k in ("theta", "x", "keep"):
        assert np.array_equal(got[k], ref[k]), k
    # a folder of another training set cannot be merged in
    other = tmp_path / "other"
    assert cli.main(["simulate", *SIM[:3], "6", *SIM[4:], "--out", str(other),
                     "--process-id", "1", "--num-processes", "2"]) == 0
    capsys.readouterr()
    assert cli.main(["merge-manifests", str(dest), "--from", str(other)]) == 2
    assert "differs" in capsys.readouterr().err


def test_host_flag_errors(tmp_path, capsys):
    out = str(tmp_path / "s")
    assert cli.main(["simulate", *SIM, "--out", out, "--process-id", "0"]) == 2
    assert "--num-processes" in capsys.readouterr().err
    assert cli.main(["simulate", *SIM, "--out", out, "--process-id", "2",
                     "--num-processes", "2"]) == 2
    assert "0 <= --process-id < --num-processes" in capsys.readouterr().err
    assert cli.main(["simulate", *SIM, "--out", out, "--devices", "64"]) == 2
    assert "xla_force_host_platform_device_count" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# data-parallel training
# ---------------------------------------------------------------------------------------------
def test_train_devices_reach_fit(sim1, tmp_path, monkeypatch):
    """`train --devices` hands a mesh over the local devices to train.fit (whose data-parallel
    results equal one-device training: tests/test_parallel.py); --devices 1 means no mesh."""
    import jax

    from sedflow_jax.nn import train as T

    seen = []

    class Stop(Exception):
        pass

    def fake_fit(*args, mesh=None, **kw):
        seen.append(mesh)
        raise Stop

    monkeypatch.setattr(T, "fit", fake_fit)
    for i, dev in enumerate(("1", "all")):
        with pytest.raises(Stop):
            cli.main(["train", "--data", str(sim1), "--out", str(tmp_path / f"m{i}"), *TRAIN,
                      "--devices", dev])
    assert seen[0] is None
    assert seen[1].axis_names == ("data",) and seen[1].devices.size == len(jax.local_devices())
    assert "devices = \"all\"" in (tmp_path / "m1" / "config.toml").read_text()


# ---------------------------------------------------------------------------------------------
# streaming inference, resume, finalize
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stream_setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream_cli")
    model = save_tiny_posterior(d / "model")
    cat = d / "cat.fits"
    good_catalog().write(cat)
    return d, model, str(cat)


INFER = ["--n-samples", N_SAMPLES, "--n-derived", 3, "--max-rounds", 1, "--seed", 7,
         "--keep-columns", "objid", "z"]


@pytest.fixture(scope="module")
def plain(stream_setup):
    """The non-streaming run (the reference)."""
    from astropy.table import Table

    d, model, cat = stream_setup
    assert run(["infer", "--model", model, "--catalog", cat, *INFER, "--out", d / "plain.fits",
                "--samples", d / "plain_s.h5"])[0] == 0
    return Table.read(d / "plain.fits")


def test_tiny_posterior_sees_the_photometry(stream_setup, plain):
    """The test model's answer depends on the fluxes (else the comparisons here could not catch
    a wrong column): brighter fluxes move every median; absurd ones leave every row ood."""
    from astropy.table import Table

    d, model, cat = stream_setup
    for name, scale in (("brighter", 2.0), ("absurd", 1e30)):
        t = good_catalog()
        t["flux_sdss_r"] *= scale
        t["flux_ivar_sdss_r"] /= scale ** 2
        t.write(d / f"{name}.fits")
        assert run(["infer", "--model", model, "--catalog", d / f"{name}.fits", *INFER,
                    "--out", d / f"{name}_out.fits"])[0] == 0
        got = Table.read(d / f"{name}_out.fits")
        a, b = filled(got["logmstar_p50"]), filled(plain["logmstar_p50"])
        with np.errstate(invalid="ignore"):
            assert not np.any(np.abs(a - b) < 1e-4), name  # NaN (nothing accepted) differs too
        if name == "absurd":
            assert np.all(np.asarray(got["ood"]))


def test_stream_equals_nonstream_and_finalize(stream_setup, plain, capsys):
    import h5py
    from astropy.table import Table

    from sedflow_jax.sbi import streaming as ST

    d, model, cat = stream_setup
    base = ["infer", "--model", model, "--catalog", cat, *INFER]
    # two hosts (one after the other here), 3 chunks of 12 rows: host 1 does chunk 1
    s_out = d / "stream.h5"
    st = [*base, "--stream", "--chunk-rows", 12, "--store-samples", "--quiet", "--out", s_out,
          "--num-processes", 2]
    rc, o = run([*st, "--process-id", 1], capsys)
    assert rc == 0 and "not all chunks are done" in o.out and not s_out.exists()
    rc, o = run([*st, "--process-id", 0], capsys)
    assert rc == 0 and s_out.exists() and f"{N_GOOD} usable" in o.out
    assert os.path.isdir(f"{s_out}.parts")  # several hosts: parts kept for `finalize`
    rc, o = run(["finalize", f"{s_out}.parts", "--out", d / "stream.fits"], capsys)
    assert rc == 0 and not os.path.exists(f"{s_out}.parts")
    t = Table.read(d / "stream.fits")
    assert np.array_equal(t["row"], np.arange(N_GOOD))
    # one rejection round, every row usable: row-keyed draws == sample_batched's draws
    assert_tables_match(plain, t)
    assert 0.3 < np.mean(t["acceptance"]) < 1.0
    with h5py.File(d / "plain_s.h5") as f1, h5py.File(s_out) as f2:
        np.testing.assert_allclose(f2["samples/theta"][...], f1["theta"][...], rtol=1e-6,
                                   atol=1e-6)
        rec = json.loads(f2.attrs[cli_config.H5_CONFIG_ATTR])
    assert rec["command"] == "infer" and rec["stream"] and rec["chunk-rows"] == 12
    assert json.loads(t.meta[cli_config.TABLE_CONFIG_KEY])["command"] == "finalize"
    assert t.meta["N_USABLE"] == N_GOOD
    # finalize again: already assembled; refuses an existing table without --overwrite
    assert run(["finalize", s_out, "--out", d / "stream.fits"], capsys)[0] == 2
    assert run(["finalize", s_out, "--out", d / "stream.ecsv"])[0] == 0
    assert_tables_match(Table.read(d / "stream.ecsv"), t, rtol=0)
    # the table's recorded `infer` configuration reruns the inference (here on one host)
    again = d / "again.h5"
    assert run(["infer", "--config", d / "stream.fits", "--out", again, "--num-processes", 1,
                "--process-id", 0])[0] == 0
    assert_tables_match(ST.read_inference(again)[0], t, rtol=0)


def test_stream_resume(stream_setup, plain, capsys):
    from sedflow_jax.sbi import streaming as ST

    d, model, cat = stream_setup
    out = d / "resume.h5"
    st = ["infer", "--model", model, "--catalog", cat, *INFER, "--stream", "--chunk-rows", 12,
          "--quiet", "--out", out]
    assert run([*st, "--process-id", 1, "--num-processes", 2])[0] == 0  # a "killed" run
    rc, o = run(st, capsys)  # single host, no --resume: refused, nothing touched
    assert rc == 2 and "--resume" in o.err
    rc, o = run([*st, "--resume"], capsys)
    assert rc == 0 and "2 chunk(s) of 12 rows computed here" in o.out  # chunk 1 was on disk
    assert out.exists() and not os.path.exists(f"{out}.parts")
    t, _ = ST.read_inference(out)
    assert np.array_equal(t["row"], np.arange(N_GOOD))
    assert_tables_match(plain, t)
    rc, o = run([*st, "--resume"], capsys)  # finished: nothing recomputed
    assert rc == 0 and "0 chunk(s)" in o.out
    rc, o = run([*st, "--resume", "--chunk-rows", 16], capsys)  # another configuration
    assert rc == 2 and "another inference run" in o.err
    rc, o = run([*st, "--samples", d / "x.h5", "--overwrite"], capsys)
    assert rc == 2 and "--store-samples" in o.err
    rc, o = run([*st[:-1], d / "x.fits"], capsys)
    assert rc == 2 and "HDF5" in o.err
