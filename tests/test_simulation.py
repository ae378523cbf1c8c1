"""Tests of sedflow_jax.simulation: determinism across chunk sizes and restarts, manifest, readers,
keep/drop accounting, and consistency of x with theta and z.

Small blocks (256 rows) keep every call cheap; all calls share one model and one block size so
the block kernel compiles once for the module.
"""
import hashlib
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sedflow_jax.sim import noise as N
from sedflow_jax.sim import prior as P
from sedflow_jax.sim import simulate as S
from sedflow_jax.sim import readers as SR
from sedflow_jax.sim import layout

BLOCK = 256
N_ROWS = 2000  # 8 blocks (last one partial: 2000 = 7*256 + 208)
LN = 2.5 / math.log(10.0)
ARRAYS = ("theta", "theta12", "x", "z", "keep", "flags")


@pytest.fixture(scope="module")
def model():
    from sedflow_jax.sed.model import load_model

    return load_model(z_max=0.2)


@pytest.fixture(scope="module")
def reference(model):
    """The uninterrupted in-memory run every other run must reproduce bit for bit."""
    return S.simulate(7, N_ROWS, model, block=BLOCK, chunk=10_000, include_flux=True,
                      progress=False)


def _as_disk(res):
    """An in-memory result under the on-disk key names."""
    return {"theta": res.theta_s, "theta12": res.theta, "x": res.x, "z": res.z,
            "keep": res.keep, "flags": res.flags}


def _assert_same(a, b, keys=ARRAYS):
    for k in keys:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        # bitwise (NaN payloads included: x holds NaN where a noisy flux <= 0)
        assert np.array_equal(a[k].view(np.uint8), b[k].view(np.uint8)), k


# ---------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------
def test_bit_identical_for_any_chunk(model, reference, tmp_path):
    ref = _as_disk(reference)
    for chunk in (1, 300, 512, 1999):
        r = S.simulate(7, N_ROWS, model, block=BLOCK, chunk=chunk, progress=False)
        _assert_same(_as_disk(r), ref)
    r = S.simulate(7, N_ROWS, model, block=BLOCK, chunk=700, out=tmp_path / "a", progress=False)
    assert r.theta is None and r.out == str(tmp_path / "a")
    assert r.manifest["layout"]["rows_per_shard"] == 768  # rounded up to whole blocks
    assert len(r.manifest["shards"]) == 3
    _assert_same(SR.load_training_set(r.out, keep_only=False), ref)


def test_prefix_stable_and_seed_dependent(model, reference):
    small = S.simulate(7, 300, model, block=BLOCK, progress=False)
    for k in ("theta", "theta_s", "x", "z", "flags"):
        assert np.array_equal(getattr(small, k), getattr(reference, k)[:300], equal_nan=True)
    other = S.simulate(8, 300, model, block=BLOCK, progress=False)
    assert not np.array_equal(other.theta, small.theta)
    # a typed key with the same bits is the same stream
    keyed = S.simulate(jax.random.key(7), 300, model, block=BLOCK, progress=False)
    assert np.array_equal(keyed.theta, small.theta)


def test_kill_and_resume_is_bit_identical(model, reference, tmp_path):
    out = tmp_path / "run"
    r1 = S.simulate(7, N_ROWS, model, block=BLOCK, chunk=512, out=out, include_flux=True,
                    progress=False, _stop_after_shards=1)
    assert not r1.complete
    m1 = S.read_manifest(out)
    assert not m1["complete"] and len(m1["shards"]) == 1 and m1["n_rows_done"] == 512
    with pytest.raises(ValueError, match="incomplete"):
        SR.load_training_set(out)
    part = SR.load_training_set(out, keep_only=False, allow_incomplete=True)
    assert part["keep"].shape == (512,)

    # a second crash mid-way, then a leftover temporary file as a kill during a write leaves
    S.simulate(7, N_ROWS, model, block=BLOCK, chunk=512, out=out, include_flux=True,
               progress=False, _stop_after_shards=1)
    assert len(S.read_manifest(out)["shards"]) == 2
    (out / "shard_00002.npz.tmp-12345").write_bytes(b"partial")

    r3 = S.simulate(7, N_ROWS, model, block=BLOCK, chunk=512, out=out, include_flux=True,
                    progress=False)
    assert r3.complete and r3.timings["rows_computed"] == N_ROWS - 1024
    assert not (out / "shard_00002.npz.tmp-12345").exists()
    got = SR.load_training_set(out, keep_only=False)
    _assert_same(got, _as_disk(reference))
    for k in ("flux", "sigma", "flux_model"):
        assert np.array_equal(got[k], getattr(reference, k), equal_nan=True)
    assert r3.n_kept == reference.n_kept and r3.dropped == reference.dropped

    # nothing left to do: no shard is rewritten
    mtimes = {p: os.stat(p).st_mtime_ns for p in out.glob("shard_*.npz")}
    r4 = S.simulate(7, N_ROWS, model, block=BLOCK, chunk=512, out=out, include_flux=True,
                    progress=False)
    assert r4.timings["rows_computed"] == 0
    assert mtimes == {p: os.stat(p).st_mtime_ns for p in out.glob("shard_*.npz")}


def test_resume_repairs_deleted_and_corrupt_shards(model, reference, tmp_path):
    out = tmp_path / "run"
    S.simulate(7, N_ROWS, model, block=BLOCK, chunk=512, out=out, progress=False)
    (out / "shard_00003.npz").unlink()
    with open(out / "shard_00001.npz", "r+b") as fh:  # flip a byte in the payload
        fh.seek(-20, 2)
        b = fh.read(1)
        fh.seek(-20, 2)
        fh.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(ValueError, match="sha256"):
        SR.load_training_set(out)
    # a resume with another chunk keeps the folder's layout (and says so)
    with pytest.warns(UserWarning, match="shard size"):
        r = S.simulate(7, N_ROWS, model, block=BLOCK, chunk=2000, out=out, progress=False)
    assert r.timings["rows_computed"] == 512 + (N_ROWS - 3 * 512)
    _assert_same(SR.load_training_set(out, keep_only=False), _as_disk(reference))


# ---------------------------------------------------------------------------------------------
# folder handling and argument errors
# ---------------------------------------------------------------------------------------------
def test_different_config_refused_and_overwrite(model, tmp_path):
    out = tmp_path / "run"
    S.simulate(1, 500, model, block=BLOCK, out=out, progress=False)
    for kw, what in (({"n": 600}, "n"), ({"key_or_seed": 2}, "key_data"),
                     ({"range_cut": False}, "range_cut"),
                     ({"prior": P.provabgs_prior().replace(n_dust=(-1.0, 1.0))}, "prior")):
        args = {"key_or_seed": 1, "n": 500, **kw}
        with pytest.raises(ValueError, match=f"different configuration.*{what}"):
            S.simulate(args.pop("key_or_seed"), args.pop("n"), model, block=BLOCK, out=out,
                       progress=False, **args)
    r = S.simulate(2, 600, model, block=BLOCK, out=out, overwrite=True, progress=False)
    m = S.read_manifest(out)
    assert m["seed"] == 2 and m["n"] == 600 and m["complete"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard_00000.npz"]
    assert SR.load_training_set(out, keep_only=False)["keep"].shape == (600,)
    assert r.n_requested == 600


def test_foreign_shards_without_manifest_refused(model, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "shard_00000.npz").write_bytes(b"not ours")
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="no manifest"):
        S.simulate(1, 100, model, block=BLOCK, out=out, progress=False)
    S.simulate(1, 100, model, block=BLOCK, out=out, overwrite=True, progress=False)
    assert (out / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("n", [0, -3, 0.0])
def test_n_must_be_positive(n, tmp_path):
    with pytest.raises(ValueError, match="n must be > 0"):
        S.simulate(0, n, out=tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="whole number"):
        S.simulate(0, 10.5, model)
    with pytest.raises(ValueError, match="chunk"):
        S.simulate(0, 10, model, chunk=0)
    with pytest.raises(ValueError, match="z_max"):
        S.simulate(0, 10, model, P.provabgs_prior(zmax=0.5))
    with pytest.raises(KeyError, match="galex_fuv"):
        S.simulate(0, 10, model, noise=N.default_noise_model(("sdss_g", "galex_fuv")))


def test_unwritable_out_fails_before_computing(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    t0 = time.perf_counter()
    with pytest.raises((PermissionError, NotADirectoryError), match="a_file"):
        S.simulate(0, 10, out=blocker / "sub")  # model=None: would be loaded after the check
    with pytest.raises(NotADirectoryError):
        S.simulate(0, 10, out=blocker)
    assert time.perf_counter() - t0 < 5.0


# ---------------------------------------------------------------------------------------------
# content
# ---------------------------------------------------------------------------------------------
def test_x_consistent_with_theta_and_z(model, reference):
    r = reference
    nb = len(model.filter_names)
    assert r.x.shape == (N_ROWS, 2 * nb + 1) and r.theta.shape == (N_ROWS, 12)
    assert r.theta_s.shape == (N_ROWS, 11)
    assert np.array_equal(r.x[:, -1], r.z)
    prior = P.provabgs_prior()
    assert bool(jnp.all(P.in_support(prior, r.theta_s)))
    assert np.allclose(np.asarray(P.from_sampling(r.theta_s)), r.theta, rtol=1e-6, atol=0)
    assert np.allclose(np.asarray(P.to_sampling(r.theta)), r.theta_s, rtol=1e-4, atol=1e-5)

    k = r.keep
    f, s = r.flux[k], r.sigma[k]
    mag, smag = r.x[k, :nb], r.x[k, nb:2 * nb]
    assert np.all(np.isfinite(r.x[k]))
    np.testing.assert_allclose(mag, 22.5 - 2.5 * np.log10(f), rtol=0, atol=2e-5)
    np.testing.assert_allclose(smag, LN * s / f, rtol=2e-6)
    assert np.all(smag > 0)

    # the noiseless photometry of a few kept rows, recomputed with the eager API
    rows = np.flatnonzero(k)[:12]
    f_true = np.asarray(model.photometry(r.theta[rows], r.z[rows]))
    np.testing.assert_allclose(r.flux_model[rows], f_true, rtol=1e-5)
    pull = (r.flux[rows] - f_true) / r.sigma[rows]
    assert np.all(np.abs(pull) < 6)
    mag_true = 22.5 - 2.5 * np.log10(f_true)
    assert np.all(np.abs(r.x[rows, :nb] - mag_true) < 6 * r.x[rows, nb:2 * nb] + 1e-3)

    # noise statistics over all kept rows: pulls ~ N(0, 1)
    pulls = ((r.flux - r.flux_model) / r.sigma)[k]
    assert abs(pulls.mean()) < 0.1 and abs(pulls.std() - 1) < 0.1


def test_keep_flags_and_counts(model, reference):
    r = reference
    assert r.n_kept + r.n_dropped == r.n_requested == N_ROWS
    assert r.n_kept == int(r.keep.sum()) and 0 < r.n_kept < N_ROWS
    assert sum(r.dropped.values()) == r.n_dropped
    bits = {name: 1 << i for i, name in enumerate(S.DROP_REASONS)}
    assert np.array_equal(r.keep, r.flags == 0)  # range_cut=True: every flag drops
    for name, bit in bits.items():
        assert r.flagged[name] == int(np.count_nonzero(r.flags & bit))
    # the definitions of the flags
    f, fm, s = r.flux, r.flux_model, r.sigma
    assert np.array_equal((r.flags & bits["sigma_nonpositive"]) != 0, np.any(~(s > 0), axis=1))
    assert np.array_equal((r.flags & bits["noisy_flux_nonpositive"]) != 0, np.any(f <= 0, axis=1))
    fr = np.asarray(N.default_noise_model(model.filter_names).flux_range)
    out = np.any((fm < fr[:, 0]) | (fm > fr[:, 1]), axis=1)
    assert np.array_equal((r.flags & bits["out_of_range"]) != 0, out)
    assert r.flagged["out_of_range"] > 0 and r.flagged["sigma_nonpositive"] > 0
    # NaN only in dropped rows, and every NaN row is flagged
    nan_rows = np.any(~np.isfinite(r.x), axis=1)
    assert nan_rows.any() and not np.any(nan_rows & r.keep)
    assert np.array_equal(nan_rows, (r.flags & bits["x_nonfinite"]) != 0)

    # without the range cut, out-of-range rows with no other flag are kept
    r2 = S.simulate(7, N_ROWS, model, block=BLOCK, range_cut=False, progress=False)
    assert np.array_equal(r2.flags, r.flags)
    assert np.array_equal(r2.keep, (r.flags & ~np.uint8(bits["out_of_range"])) == 0)
    assert r2.n_kept > r.n_kept and r2.dropped["out_of_range"] == 0
    assert r2.flagged["out_of_range"] == r.flagged["out_of_range"]


def _fake_model(model):
    """A cheap stand-in model whose photometry is <= 0 or NaN for some rows."""
    class Fake:
        filter_names = model.filter_names
        config = model.config
        grid = model.grid
        tables = {"scale": jnp.ones((len(model.filter_names),), jnp.float32)}

        @staticmethod
        @jax.jit
        def phot_batch(theta, z, tables):
            f = 10 ** (0.4 * (theta[:, :1] - 7.0)) * tables["scale"] * 10.0
            f = jnp.where(theta[:, 5:6] < 0.1, -1.0, f)  # fburst < 0.1: non-positive flux
            return jnp.where(theta[:, 9:10] < 0.2, jnp.nan, f)  # tau_bc < 0.2: NaN
    return Fake()


def test_invalid_model_flux_flagged(model):
    fake = _fake_model(model)
    r = S.simulate(3, 1000, fake, block=BLOCK, progress=False)
    bad = (r.theta[:, 5] < 0.1) | (r.theta[:, 9] < 0.2)
    bit = 1 << S.DROP_REASONS.index("model_flux_invalid")
    assert bad.any()
    assert np.array_equal((r.flags & bit) != 0, bad)
    assert not np.any(r.keep & bad)
    assert r.dropped["model_flux_invalid"] == int(bad.sum())
    assert sum(r.dropped.values()) == r.n_dropped


def test_manifest_contents(model, tmp_path):
    out = tmp_path / "run"
    r = S.simulate(11, 1000, model, block=BLOCK, chunk=300, out=out, include_flux=True,
                   progress=False)
    m = json.loads((out / "manifest.json").read_text())
    assert m == r.manifest
    import sedflow_jax

    assert m["format"] == S.FORMAT and m["complete"] is True
    assert m["seed"] == 11 and m["n"] == 1000 and m["config"]["n"] == 1000
    assert m["config"]["key_data"] == [int(v) for v in jax.random.key_data(jax.random.key(11))]
    assert m["layout"] == {"block": BLOCK, "rows_per_shard": 512, "n_shards": 2,
                           "chunk_requested": 300}
    assert m["environment"]["sedflow_jax"] == sedflow_jax.__version__
    assert m["environment"]["jax"] == jax.__version__
    cfg = m["config"]
    assert cfg["grid"]["name"] == model.grid.name
    assert cfg["grid"]["provenance"] == model.grid.provenance
    assert cfg["filters"] == list(model.filter_names) == m["bands"]
    assert cfg["prior"]["logmstar"] == [7.0, 12.5] and cfg["prior"]["name"] == "provabgs"
    assert cfg["noise_model"]["format"] == "sedflow_jax.noise_model"
    assert cfg["model_config"]["z_max"] == 0.2
    assert m["theta_names"] == list(P.SAMPLING_NAMES)
    assert m["theta12_names"] == list(P.PARAM_NAMES)
    assert m["x_names"] == list(layout.x_names(model.filter_names))
    assert m["x_names"][0] == "mag_sdss_u" and m["x_names"][5] == "sigma_mag_sdss_u"
    assert m["x_names"][-1] == "z"
    # shards: contiguous row ranges, sha256 of the files, counts adding up
    starts = 0
    for e in m["shards"]:
        assert e["row_start"] == starts
        starts = e["row_stop"]
        data = (out / e["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == e["sha256"] and len(data) == e["bytes"]
        with np.load(out / e["file"]) as z:
            assert set(z.files) == {"theta", "theta12", "x", "z", "keep", "flags", "flux",
                                    "sigma", "flux_model"}
            assert z["theta"].shape == (e["n_rows"], 11) and z["theta12"].shape[1] == 12
            assert int(z["keep"].sum()) == e["counts"]["n_kept"]
    assert starts == 1000
    assert m["n_kept"] + m["n_dropped"] == 1000 == m["n_rows_done"]
    assert m["n_kept"] == sum(e["counts"]["n_kept"] for e in m["shards"])
    assert sum(m["dropped"].values()) == m["n_dropped"]
    assert m["timings"]["compute_s"] > 0 and m["sessions"][-1]["rows_computed"] == 1000


def test_readers_and_dataset(model, tmp_path):
    out = tmp_path / "run"
    r = S.simulate(5, 1500, model, block=BLOCK, chunk=512, out=out, progress=False)
    full = SR.load_training_set(out, keep_only=False)
    kept = SR.load_training_set(out)
    assert kept["theta"].shape == (r.n_kept, 11) and np.all(kept["keep"])
    assert np.array_equal(kept["row"], np.flatnonzero(full["keep"]))
    assert np.all(np.isfinite(kept["x"]))
    parts = list(SR.iter_shards(out))
    assert [p["keep"].shape[0] for p in parts] == [512, 512, 476]

    ds = SR.ShardDataset(out, buffer_shards=2)
    assert len(ds) == ds.n == r.n_kept and (ds.d_theta, ds.d_context) == (11, 11)
    rows = np.ones(ds.n, bool)
    t, x = map(np.concatenate, zip(*ds.iter_batches(None, 100, rows)))
    assert np.array_equal(t, kept["theta"]) and np.array_equal(x, kept["x"])
    sel = np.random.default_rng(0).random(ds.n) < 0.7
    batches = list(ds.iter_batches(np.random.default_rng(1), 64, sel))
    assert all(b[0].shape[0] == 64 for b in batches[:-1])
    t2 = np.concatenate([b[0] for b in batches])
    order = np.lexsort(kept["theta"][sel].T)
    assert np.array_equal(t2[np.lexsort(t2.T)], kept["theta"][sel][order])

    from sedflow_jax.nn.data import DataSource  # the trainer's protocol, duck-typed

    assert isinstance(ds, DataSource)
