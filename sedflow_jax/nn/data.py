"""Training data for flows: array pairs (theta, x) in memory or streamed from npz shards.

A :class:`DataSource` yields batches of rows; the trainer never needs to know what the rows
mean. Wrappers that transform batches (coordinates, band dropout) live with the science that
defines them and follow the same protocol.
"""
from __future__ import annotations

import os
import zipfile
from typing import Iterator, Protocol, Sequence, runtime_checkable

import numpy as np

from ..batching import buffered_batches
from .flow import ZScoreStats

__all__ = ["DataSource", "ArrayData", "NpzShards", "as_source", "streaming_stats"]


@runtime_checkable
class DataSource(Protocol):
    """What :func:`fit` needs from a data set of ``n`` rows (theta, x).

    ``iter_batches(rng, batch_size, rows)`` yields ``(theta, x)`` float32 numpy batches of the
    rows where the boolean mask ``rows`` (shape (n,)) is True: shuffled with the
    ``np.random.Generator`` ``rng``, or in storage order when ``rng`` is None.  Every batch but
    the last of a pass has exactly ``batch_size`` rows.
    """

    n: int
    d_theta: int
    d_context: int

    def __len__(self) -> int: ...

    def iter_batches(self, rng: np.random.Generator | None, batch_size: int,
                     rows: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...


class ArrayData:
    """In-memory :class:`DataSource` over arrays theta (n, d_theta) and x (n, d_context)."""

    def __init__(self, theta, x):
        theta = np.asarray(theta, np.float32)
        x = np.asarray(x, np.float32)
        if theta.ndim != 2 or x.ndim != 2 or theta.shape[0] != x.shape[0]:
            raise ValueError(f"need theta (n, d_theta) and x (n, d_context) with equal n; got "
                             f"{theta.shape} and {x.shape}")
        if not (np.all(np.isfinite(theta)) and np.all(np.isfinite(x))):
            raise ValueError("theta and x must be finite (drop or fix non-finite rows first)")
        self.theta, self.x = theta, x
        self.n, self.d_theta, self.d_context = theta.shape[0], theta.shape[1], x.shape[1]

    def __len__(self):
        return self.n

    def iter_batches(self, rng, batch_size, rows):
        idx = np.flatnonzero(rows)
        if rng is not None:
            idx = idx[rng.permutation(idx.size)]
        for s in range(0, idx.size, batch_size):
            b = idx[s:s + batch_size]
            yield self.theta[b], self.x[b]


def _npz_member_shape(path: str, name: str) -> tuple[int, ...]:
    """Shape of array ``name`` inside an .npz without loading it."""
    with zipfile.ZipFile(path) as zf:
        with zf.open(name + ".npy") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, _ = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _, _ = np.lib.format.read_array_header_2_0(f)
    return tuple(shape)


class NpzShards:
    """Streaming :class:`DataSource` over ``.npz`` files each holding ``theta`` and ``x``.

    Only row counts are read up front (from the .npy headers).  A shuffled pass visits the shards
    in random order, ``buffer_shards`` at a time, shuffles the selected rows of the buffer and
    yields full batches (leftover rows carry over to the next buffer), so at most about
    ``buffer_shards`` shards are in memory.  Shards should hold i.i.d. rows (simulations are).
    """

    def __init__(self, paths: Sequence[str | os.PathLike], buffer_shards: int = 2):
        self.paths = [os.fspath(p) for p in paths]
        if not self.paths:
            raise ValueError("NpzShards needs at least one file")
        counts, dth, dx = [], None, None
        for p in self.paths:
            try:
                st, sx = _npz_member_shape(p, "theta"), _npz_member_shape(p, "x")
            except (KeyError, OSError, zipfile.BadZipFile, ValueError) as e:
                raise ValueError(f"{p}: not an .npz with arrays 'theta' and 'x' ({e})") from e
            if len(st) != 2 or len(sx) != 2 or st[0] != sx[0]:
                raise ValueError(f"{p}: theta {st} and x {sx} must be 2-d with equal rows")
            if dth is None:
                dth, dx = st[1], sx[1]
            elif (st[1], sx[1]) != (dth, dx):
                raise ValueError(f"{p}: dims {(st[1], sx[1])} differ from the first shard's "
                                 f"{(dth, dx)}")
            counts.append(st[0])
        self.counts = np.asarray(counts, np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])
        self.n, self.d_theta, self.d_context = int(self.offsets[-1]), int(dth), int(dx)
        self.buffer_shards = max(1, int(buffer_shards))

    def __len__(self):
        return self.n

    def _load(self, i: int):
        with np.load(self.paths[i]) as z:
            theta = np.asarray(z["theta"], np.float32)
            x = np.asarray(z["x"], np.float32)
        return theta, x

    def iter_batches(self, rng, batch_size, rows):
        return buffered_batches(self._load, self.offsets, np.asarray(rows, bool), rng,
                                batch_size, self.buffer_shards, self.d_theta, self.d_context)


def as_source(data) -> DataSource:
    if isinstance(data, DataSource) and hasattr(data, "iter_batches"):
        return data
    if isinstance(data, dict):
        return ArrayData(data["theta"], data["x"])
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return ArrayData(*data)
    raise TypeError("data must be (theta, x), {'theta':..., 'x':...}, or a DataSource "
                    "(n, d_theta, d_context, __len__, iter_batches)")


def streaming_stats(source: DataSource, rows: np.ndarray, chunk: int = 65536) -> ZScoreStats:
    """Mean and unbiased std of theta and x over ``rows`` in one streaming pass (Chan et al.'s
    parallel Welford update, float64), with sbi's floors."""
    acc = {}
    for name in ("theta", "x"):
        acc[name] = [0, None, None]  # count, mean, M2
    for t, x in source.iter_batches(None, chunk, rows):
        for name, a in (("theta", t), ("x", x)):
            a = np.asarray(a, np.float64)
            nb, mb = a.shape[0], a.mean(0)
            m2b = ((a - mb) ** 2).sum(0)
            n, m, m2 = acc[name]
            if m is None:
                acc[name] = [nb, mb, m2b]
            else:
                tot = n + nb
                delta = mb - m
                acc[name] = [tot, m + delta * nb / tot, m2 + m2b + delta ** 2 * n * nb / tot]
    n = acc["theta"][0]
    if n < 2:
        raise ValueError(f"need at least 2 training rows for z-scoring, got {n}")
    return ZScoreStats.from_moments(acc["theta"][1], acc["theta"][2] / (n - 1),
                                    acc["x"][1], acc["x"][2] / (n - 1))
