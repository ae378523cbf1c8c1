"""Small helpers every layer shares, each written once: atomic writes, JSON, hashes, versions,
PRNG keys. Imports nothing of the package (layer 0).

- :func:`atomic_write_bytes` / :func:`atomic_write_json` / :func:`atomic_output`: a file appears
  whole or not at all (temporary name unique across hosts, then ``os.replace``).
- :func:`jsonable` / :func:`canonical_json`: numpy-aware JSON values; sorted, compact text for
  hashing configurations.
- :func:`sha256_file`, :func:`sha256_arrays`: content hashes of files and of array pytrees.
- :func:`versions`, :func:`utc_now`: provenance recorded beside saved files.
- :func:`as_key`, :func:`key_parts`: an int seed or a ``jax.random`` key -> a typed key.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import platform
import socket
import uuid
from typing import Iterator

import numpy as np

from .version import __version__

__all__ = [
    "temp_name",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_output",
    "jsonable",
    "canonical_json",
    "sha256_file",
    "sha256_bytes",
    "sha256_arrays",
    "package_version",
    "versions",
    "utc_now",
    "as_key",
    "key_parts",
]


# ---------------------------------------------------------------------------------------------
# atomic files
# ---------------------------------------------------------------------------------------------
def temp_name(path) -> str:
    """A temporary name beside ``path``, unique across machines and processes:
    ``<path>.tmp-<host>-<pid>-<random>`` (folders clean leftovers with the glob ``*.tmp-*``)."""
    return f"{os.fspath(path)}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file, fsync, then ``os.replace``.
    Safe when several hosts write the same file at once (each uses its own temporary name)."""
    path = os.fspath(path)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_json(path, obj, *, indent: int = 1, sort_keys: bool = False) -> None:
    """``obj`` (numpy values allowed, see :func:`jsonable`) as JSON text, written atomically."""
    text = json.dumps(jsonable(obj), indent=indent, sort_keys=sort_keys, allow_nan=True)
    atomic_write_bytes(path, text.encode() + b"\n")


@contextlib.contextmanager
def atomic_output(*paths) -> Iterator[list]:
    """All-or-nothing outputs: yields one temporary path per target (None stays None); when the
    block finishes, every temporary file is renamed onto its target; when it raises, every
    temporary file is removed and no target is touched.

    >>> with atomic_output("table.fits", "draws.h5") as (t, d):
    ...     write_table(t); write_draws(d)
    """
    tmps = [None if p is None else temp_name(p) for p in paths]
    try:
        yield tmps
        for p, t in zip(paths, tmps):
            if p is not None and not os.path.exists(t):
                raise FileNotFoundError(f"nothing was written for {p}")
        for p, t in zip(paths, tmps):
            if p is not None:
                os.replace(t, p)
    finally:
        for t in tmps:
            if t is not None and os.path.exists(t):
                os.remove(t)


# ---------------------------------------------------------------------------------------------
# JSON and hashes
# ---------------------------------------------------------------------------------------------
def jsonable(o):
    """``o`` with numpy scalars / arrays turned into Python values, tuples into lists, dict keys
    into strings; anything else unknown becomes its ``str``."""
    if isinstance(o, dict):
        return {str(k): jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [jsonable(v) for v in o]
    if isinstance(o, (np.bool_,)):
        return bool(o)
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray) or (hasattr(o, "__array__") and hasattr(o, "shape")):
        return jsonable(np.asarray(o).tolist())
    if isinstance(o, (str, int, float, bool)) or o is None:
        return o
    return str(o)


def canonical_json(d) -> str:
    """Sorted, compact JSON of ``d``: equal configurations give equal text (and hashes)."""
    return json.dumps(jsonable(d), sort_keys=True, separators=(",", ":"), allow_nan=True)


def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def sha256_file(path) -> str:
    """Hex sha256 of a file's bytes (read in 4 MiB pieces)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_arrays(leaves, extra=None) -> str:
    """Hex sha256 of a sequence of arrays (dtype, shape and bytes of each), plus an optional
    JSON-able ``extra`` (hashed as :func:`canonical_json` with sorted keys)."""
    h = hashlib.sha256()
    for leaf in leaves:
        a = np.asarray(leaf)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    if extra is not None:
        h.update(json.dumps(jsonable(extra), sort_keys=True).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# provenance
# ---------------------------------------------------------------------------------------------
def package_version(name: str = "sedflow-jax"):
    """Installed version of a distribution (None if unknown); ``sedflow-jax`` is ours."""
    if name == "sedflow-jax":
        return str(__version__)
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # pragma: no cover
        return None


def versions(*extra_packages: str) -> dict:
    """Versions recorded beside saved files: sedflow_jax, jax, jaxlib, numpy, python, the JAX
    backend and device kind, and any ``extra_packages``."""
    import jax

    dev = jax.devices()[0]
    out = {
        "sedflow_jax": package_version(),
        "jax": jax.__version__,
        "jaxlib": package_version("jaxlib"),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "device": getattr(dev, "device_kind", str(dev)),
    }
    for name in extra_packages:
        out[name] = package_version(name)
    return out


def utc_now() -> str:
    """ISO-8601 UTC time, seconds precision."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# PRNG keys
# ---------------------------------------------------------------------------------------------
def as_key(key):
    """An int seed or a ``jax.random`` key (typed, or a legacy uint32 raw key) -> a typed key.
    Bools and other types are refused (TypeError)."""
    return key_parts(key)[3]


def key_parts(key):
    """``(seed or None, key_data uint32 array, impl name, typed key)`` of an int seed or a
    single ``jax.random`` key."""
    import jax
    import jax.numpy as jnp

    if isinstance(key, (bool, np.bool_)):
        raise TypeError("key must be an int seed or a jax.random key, not a bool")
    if isinstance(key, (int, np.integer)):
        k = jax.random.key(int(key))
        return int(key), np.asarray(jax.random.key_data(k), np.uint32), \
            str(jax.random.key_impl(k)), k
    try:
        k = jnp.asarray(key)
    except TypeError:
        raise TypeError(f"key must be an int seed or a jax.random key, got "
                        f"{type(key).__name__}") from None
    if jnp.issubdtype(k.dtype, jax.dtypes.prng_key):
        if k.shape != ():
            raise ValueError(f"expected a single PRNG key, got a key array of shape {k.shape}")
        return None, np.asarray(jax.random.key_data(k), np.uint32), \
            str(jax.random.key_impl(k)), k
    if k.dtype == jnp.uint32 and k.ndim == 1:  # legacy raw key (jax.random.PRNGKey)
        typed = jax.random.wrap_key_data(k)
        return None, np.asarray(k, np.uint32), str(jax.random.key_impl(typed)), typed
    raise TypeError(f"key must be an int seed or a jax.random key, got {type(key).__name__} "
                    f"with dtype {getattr(k, 'dtype', None)}")
