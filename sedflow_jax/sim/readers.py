"""Readers of training sets written by :func:`sedflow_jax.sim.simulate`: whole arrays, shard
by shard, or as a streaming data source for flow training (kept rows only)."""
from __future__ import annotations

import hashlib
import io
import os
from typing import Iterator

import numpy as np

from ..batching import buffered_batches
from ..util import sha256_file
from .store import read_manifest

__all__ = ["iter_shards", "load_training_set", "ShardDataset"]


def _check_sha256(path: str, digest: str, entry: dict) -> None:
    if digest != entry["sha256"]:
        raise ValueError(f"{path}: sha256 does not match the manifest (corrupt or replaced "
                         "file); re-run simulate(...) with the same arguments to repair it")


def _read_shard(folder: str, entry: dict, verify: bool) -> dict:
    path = os.path.join(folder, entry["file"])
    with open(path, "rb") as fh:
        data = fh.read()
    if verify:
        _check_sha256(path, hashlib.sha256(data).hexdigest(), entry)
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        arrs = {k: z[k] for k in z.files}
    if arrs["keep"].shape[0] != entry["row_stop"] - entry["row_start"]:
        raise ValueError(f"{path}: {arrs['keep'].shape[0]} rows, manifest says "
                         f"{entry['row_stop'] - entry['row_start']}")
    return arrs


def _checked_manifest(path, allow_incomplete):
    folder = os.path.abspath(os.fspath(path))
    m = read_manifest(folder)
    if not m.get("complete") and not allow_incomplete:
        raise ValueError(f"{folder}: the training set is incomplete ({m.get('n_rows_done')} of "
                         f"{m.get('n')} rows); finish it by calling simulate(...) again with the "
                         "same arguments, or pass allow_incomplete=True")
    return folder, m


def iter_shards(path, *, keep_only: bool = False, verify: bool = True,
                allow_incomplete: bool = False) -> Iterator[dict]:
    """Yield one dict of arrays per shard, in row order.

    Keys as stored (``theta`` (m, 11) target, ``theta12``, ``x``, ``z``, ``keep``, ``flags``,
    and ``flux``/``sigma``/``flux_model`` if present) plus ``row`` (m,) int64, the global row
    index. ``keep_only`` drops the rows with ``keep == False``; ``verify`` checks each file's
    sha256 against the manifest.
    """
    folder, m = _checked_manifest(path, allow_incomplete)
    for e in sorted(m["shards"], key=lambda e: e["row_start"]):
        arrs = _read_shard(folder, e, verify)
        arrs["row"] = np.arange(e["row_start"], e["row_stop"], dtype=np.int64)
        if keep_only:
            k = arrs["keep"]
            arrs = {name: a[k] for name, a in arrs.items()}
        yield arrs


def load_training_set(path, *, keep_only: bool = True, verify: bool = True,
                      allow_incomplete: bool = False) -> dict:
    """All shards of a training-set folder concatenated (see :func:`iter_shards`).

    With ``keep_only`` (default) only training rows are returned, so the result can go straight
    to ``sedflow_jax.train.fit(..., data=load_training_set(path))``: ``'theta'`` is the 11-dim
    sampling-space target and ``'x'`` the conditioning. ``'theta12'`` holds the physical
    parameters.
    """
    parts = list(iter_shards(path, keep_only=keep_only, verify=verify,
                             allow_incomplete=allow_incomplete))
    if not parts:
        raise ValueError(f"{path}: no shards written yet")
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


class ShardDataset:
    """Streaming training data over the *kept* rows of a training-set folder.

    Implements the data-source protocol of :func:`sedflow_jax.train.fit` (attributes ``n``,
    ``d_theta``, ``d_context``, ``__len__`` and ``iter_batches(rng, batch_size, rows)``) without
    importing the trainer: ``theta`` is the 11-dim sampling-space target, ``x`` the
    conditioning. Only the manifest is read up front (and, with ``verify``, every file is hashed
    once against it); a shuffled pass visits the shards
    in random order, ``buffer_shards`` at a time, so about that many shards are in memory.

    ``rows`` passed to ``iter_batches`` is a boolean mask over the ``n`` kept rows (in storage
    order), as ``fit`` builds for its train/validation split.
    """

    def __init__(self, path, *, buffer_shards: int = 2, verify: bool = True,
                 allow_incomplete: bool = False):
        self.folder, self.manifest = _checked_manifest(path, allow_incomplete)
        self.entries = sorted(self.manifest["shards"], key=lambda e: e["row_start"])
        if not self.entries:
            raise ValueError(f"{path}: no shards written yet")
        if verify:  # once, up front; later reads trust the files
            for e in self.entries:
                p = os.path.join(self.folder, e["file"])
                _check_sha256(p, sha256_file(p), e)
        counts = [int(e["counts"]["n_kept"]) for e in self.entries]
        self.counts = np.asarray(counts, np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])
        self.n = int(self.offsets[-1])
        self.d_theta = len(self.manifest["theta_names"])
        self.d_context = len(self.manifest["x_names"])
        self.buffer_shards = max(1, int(buffer_shards))
        self.theta_names = tuple(self.manifest["theta_names"])
        self.x_names = tuple(self.manifest["x_names"])

    def __len__(self):
        return self.n

    def load_shard(self, i: int):
        arrs = _read_shard(self.folder, self.entries[i], verify=False)
        k = arrs["keep"]
        theta = np.asarray(arrs["theta"][k], np.float32)
        x = np.asarray(arrs["x"][k], np.float32)
        if theta.shape[0] != self.counts[i]:
            raise ValueError(f"{self.entries[i]['file']}: {theta.shape[0]} kept rows, manifest "
                             f"says {self.counts[i]}")
        return theta, x

    def arrays(self):
        """All kept rows in memory: ``(theta (n, 11), x (n, d_context))``."""
        ts, xs = zip(*(self.load_shard(i) for i in range(len(self.entries))))
        return np.concatenate(ts), np.concatenate(xs)

    def iter_batches(self, rng, batch_size, rows):
        rows = np.asarray(rows, bool)
        if rows.shape != (self.n,):
            raise ValueError(f"rows must be a boolean mask of shape ({self.n},), got {rows.shape}")
        return buffered_batches(self.load_shard, self.offsets, np.asarray(rows, bool), rng,
                                batch_size, self.buffer_shards, self.d_theta, self.d_context)
