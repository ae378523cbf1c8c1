"""A non-editable install works on its own: the wheel's contents (every subpackage, the data
files, and the default SSP grid packaged from the repository's ``ssp_templates/`` as
``sedflow_jax/ssp_templates/``) are installed into a temporary folder, and a fresh interpreter
that sees that folder -- not the repository -- loads the grid, the filters and the NMF bases and
computes photometry.

Offline and quick: the install uses the setuptools already present (no build isolation, no
index): ``pip install --no-deps --no-build-isolation --no-index --target`` when setuptools can
build wheels itself (>= 70.1) or ``wheel`` is installed, else setuptools' ``build_py`` (the
files a wheel would hold). It runs on a copy of the sources so the checkout stays untouched.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "sedflow_jax"

setuptools = pytest.importorskip("setuptools", reason="building needs setuptools")


def _can_build_wheels() -> bool:
    major, minor = (int(p) for p in setuptools.__version__.split(".")[:2])
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


def _copy_sources(dest: Path) -> Path:
    src = dest / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(PKG, src / "sedflow_jax", ignore=ignore)
    shutil.copytree(ROOT / "ssp_templates", src / "ssp_templates", ignore=ignore)
    return src


def _install(src: Path, target: Path) -> None:
    env = dict(os.environ, PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    if _can_build_wheels():
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
               "--no-build-isolation", "--no-index", "--target", str(target), str(src)]
    else:
        cmd = [sys.executable, "-c", "import setuptools; setuptools.setup()", "--quiet",
               "build_py", "--build-lib", str(target)]
    r = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}"


CHECK = r"""
import json, sys
import numpy as np
import sedflow_jax
from sedflow_jax.sed import photometry, sfh, ssp

grid = sedflow_jax.load_ssp_grid()
filt = photometry.load_filter("sdss_r")
nmf = sfh.load_nmf_bases()
model = sedflow_jax.load_model()
theta = np.array([10.5, 0.25, 0.25, 0.25, 0.25, 0.1, 2.0, 1e-3, 1e-3, 0.5, 0.5, -0.3])
f = np.asarray(model.photometry(theta, 0.1), float)
print(json.dumps({
    "file": sedflow_jax.__file__,
    "grid_path": str(ssp.default_grid_path()),
    "grid_shape": list(np.shape(grid.spec)),
    "filter_points": int(np.size(filt.wave)),
    "nmf_ok": all(np.all(np.isfinite(np.asarray(a))) for a in nmf),
    "bands": list(model.filter_names),
    "flux": f.tolist(),
}))
"""


def _source_subpackages() -> set:
    return {".".join(p.parent.relative_to(ROOT).parts) for p in PKG.rglob("__init__.py")
            if "__pycache__" not in p.parts}


def _data_files(folder: Path, base: Path) -> set:
    return {str(p.relative_to(base)) for p in folder.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".py", ".pyc")}


def test_non_editable_install_is_self_contained(tmp_path):
    src = _copy_sources(tmp_path)
    target = tmp_path / "site"
    _install(src, target)
    installed = target / "sedflow_jax"
    # every subpackage of the source tree, every data file, the grid with its NOTICE / README
    missing = sorted(p for p in _source_subpackages()
                     if not (target.joinpath(*p.split(".")) / "__init__.py").is_file())
    assert not missing, f"subpackages not installed (add them to pyproject.toml): {missing}"
    want = _data_files(PKG / "data", PKG)
    have = _data_files(installed / "data", installed)
    assert want <= have, f"data files not installed: {sorted(want - have)}"
    for name in ("ssp_bc03_2016_miles_kroupa.npz", "NOTICE", "README.md"):
        got, ref = installed / "ssp_templates" / name, ROOT / "ssp_templates" / name
        assert got.is_file() and got.stat().st_size == ref.stat().st_size, name

    # a fresh interpreter that sees the install, not the repository
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "SEDFLOW_JAX_SSP_GRID", "PYTHONSTARTUP")}
    env.update(PYTHONPATH=str(target), JAX_PLATFORMS="cpu", PYTHONNOUSERSITE="1")
    r = subprocess.run([sys.executable, "-c", CHECK], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert Path(out["file"]).resolve().is_relative_to(target.resolve()), out["file"]
    # the grid comes from the packaged resource, not from the repository's ssp_templates/
    assert Path(out["grid_path"]).resolve().is_relative_to(installed.resolve()), out["grid_path"]
    assert len(out["grid_shape"]) == 3 and min(out["grid_shape"]) > 0
    assert out["filter_points"] > 10 and out["nmf_ok"]
    assert len(out["flux"]) == len(out["bands"]) == 5
    assert all(v > 0 and v == v and v != float("inf") for v in out["flux"]), out["flux"]
