"""Shuffled mini-batches over row-sharded data on disk (shared by the trainer's and the
simulator's streaming data sources; knows arrays, not galaxies)."""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np


def buffered_batches(load: Callable[[int], tuple], offsets: np.ndarray, rows: np.ndarray,
                     rng: np.random.Generator | None, batch_size: int, buffer_shards: int,
                     d_theta: int, d_context: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (theta, x) batches of the rows selected by the boolean mask ``rows``.

    ``load(i)`` returns shard i's (theta, x); shard i holds global rows offsets[i]:offsets[i+1].
    With ``rng``: shards in random order, ``buffer_shards`` at a time, rows shuffled within the
    buffer, leftovers carried over (so about ``buffer_shards`` shards are in memory); without it,
    storage order. Every batch but the last of a pass has exactly ``batch_size`` rows.
    """
    n_files = len(offsets) - 1
    order = np.arange(n_files) if rng is None else rng.permutation(n_files)
    buf = buffer_shards if rng is not None else 1
    carry_t = np.zeros((0, d_theta), np.float32)
    carry_x = np.zeros((0, d_context), np.float32)
    for s in range(0, n_files, buf):
        ts, xs = [carry_t], [carry_x]
        for i in order[s:s + buf]:
            sel = rows[offsets[i]:offsets[i + 1]]
            if not sel.any():
                continue
            t, x = load(int(i))
            ts.append(t[sel])
            xs.append(x[sel])
        t = np.concatenate(ts)
        x = np.concatenate(xs)
        if rng is not None:
            p = rng.permutation(t.shape[0])
            t, x = t[p], x[p]
        nfull = (t.shape[0] // batch_size) * batch_size
        for b in range(0, nfull, batch_size):
            yield t[b:b + batch_size], x[b:b + batch_size]
        carry_t, carry_x = t[nfull:], x[nfull:]
    if carry_t.shape[0]:
        yield carry_t, carry_x
