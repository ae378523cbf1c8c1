"""Missing and bad bands, and the training set's (flux, sigma) support, for real catalogs.

Band masks
----------
A *band mask* is a boolean array ``mask`` (n, n_bands), True where a band's measurement is used.
:func:`sedflow_jax.io.read_photometry` builds it from the data (NaN / inf, sentinel values
such as -9999, flux = 0 with ivar = 0 ("not observed"), ivar <= 0, flux <= 0, a user-set S/N
floor, a band with no usable value in the whole catalog) and counts every reason.

A *mask-aware* posterior (``train_posterior(..., band_dropout=p)``) is a flow conditioned on

    x_m = [mag_b (masked -> fill_b) ..., sigma_mag_b (masked -> fill'_b) ..., z, m_b ...]

(d = 3 n_bands + 1), where ``m_b`` is 1.0 for a used band and 0.0 for a masked one and the fill
values are the training-set means (z-scored to ~0). It is trained with random band dropout
(:class:`BandDropout`): each training row, with probability ``p``, loses k ~ U{1..n_bands -
min_bands} bands chosen at random, freshly drawn every epoch. Because the dropout is
independent of theta and of the data, the flow learns p(theta | observed bands) = the posterior
marginalised over the dropped bands, for every mask with >= ``min_bands`` bands: masking a band
can only widen the posterior on average. (It assumes missingness carries no information, i.e.
missing at random; a band missing *because* the galaxy is faint there is treated as unobserved.)

Band *groups* that real catalogs miss together (GALEX FUV + NUV: most SDSS rows have no GALEX
match) are drawn with ``group_drop={"galex": ((0, 1), 0.6)}`` (:func:`group_band_mask`): with
probability 0.6 a row loses the whole group, independently per group, and on top of that the
random dropout above acts on the bands the row still has (never leaving fewer than
``min_bands``). Without ``group_drop`` the masks are bit-identical to plain dropout.

Training support
----------------
:class:`TrainingSupport` records, per band, which cells of a 2-d grid in (magnitude, log10
sigma_mag) hold at least ``min_count`` training rows, and the training redshift range. A catalog
band lies "inside the support" when its cell is occupied; :func:`support_fractions` gives the
fraction of real rows inside per band. Bands outside the support are handled according to the
policy of :func:`infer_catalog`: ``'mask'`` (default for mask-aware posteriors: the band is
masked and counted, the row is fit from the others if >= ``min_bands`` remain, else flagged),
``'flag'`` (the row is flagged ``FLAG_NOISE_OOS`` and not fit) or ``'ood'`` (default for plain
posteriors: fit, marked ``ood`` and counted). Rows are never silently fit with noise the flow has
not seen.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..sim.layout import n_bands_from_x

__all__ = [
    "apply_mask",
    "split_context",
    "random_band_mask",
    "group_band_mask",
    "normalize_group_drop",
    "BandDropout",
    "TrainingSupport",
    "support_fractions",
    "plot_support",
]


# ---------------------------------------------------------------------------------------------
# context layout helpers
# ---------------------------------------------------------------------------------------------


def apply_mask(x, mask, fill) -> np.ndarray:
    """Masked conditioning vector for a mask-aware flow.

    x : (n, 2 nb + 1) = [mags, sigma_mags, z] (masked entries may be NaN);
    mask : (n, nb) bool, True = band used (None: all used); fill : (2 nb,) values put in the
    masked bands' mag and sigma_mag slots. Returns (n, 3 nb + 1) float32
    [mags', sigma_mags', z, mask as 0/1].
    """
    x = np.atleast_2d(np.asarray(x, np.float32))
    nb = n_bands_from_x(x.shape[1])
    mask = np.ones((x.shape[0], nb), bool) if mask is None else np.atleast_2d(np.asarray(mask, bool))
    if mask.shape != (x.shape[0], nb):
        raise ValueError(f"mask must have shape {(x.shape[0], nb)}, got {mask.shape}")
    fill = np.asarray(fill, np.float32)
    if fill.shape != (2 * nb,):
        raise ValueError(f"fill must have shape ({2 * nb},), got {fill.shape}")
    m2 = np.concatenate([mask, mask], axis=1)
    vals = np.where(m2, x[:, :2 * nb], fill[None, :])
    return np.concatenate([vals, x[:, 2 * nb:], mask.astype(np.float32)], axis=1)


def split_context(xm):
    """Inverse of :func:`apply_mask` up to the fill: (n, 3 nb + 1) -> (x (n, 2 nb + 1) with
    NaN in masked slots, mask (n, nb) bool)."""
    xm = np.atleast_2d(np.asarray(xm, np.float32))
    if (xm.shape[1] - 1) % 3:
        raise ValueError(f"a masked context has 3 n_bands + 1 columns; got {xm.shape[1]}")
    nb = (xm.shape[1] - 1) // 3
    mask = xm[:, 2 * nb + 1:] > 0.5
    x = xm[:, :2 * nb + 1].copy()
    x[:, :2 * nb][~np.concatenate([mask, mask], 1)] = np.nan
    return x, mask


def random_band_mask(rng: np.random.Generator, n: int, n_bands: int, p_drop: float,
                     min_bands: int = 2) -> np.ndarray:
    """(n, n_bands) bool mask: with probability ``p_drop`` a row loses k ~ U{1..n_bands -
    min_bands} distinct random bands; other rows keep all bands."""
    mask = np.ones((n, n_bands), bool)
    max_drop = n_bands - int(min_bands)
    if max_drop < 1 or p_drop <= 0:
        return mask
    rows = np.flatnonzero(rng.random(n) < p_drop)
    if rows.size == 0:
        return mask
    k = rng.integers(1, max_drop + 1, size=rows.size)
    perm = np.argsort(rng.random((rows.size, n_bands)), axis=1)  # a uniform permutation per row
    mask[rows] = ~(perm < k[:, None])  # exactly k positions hold a value < k: a uniform k-subset
    return mask


def normalize_group_drop(group_drop, bands) -> dict:
    """``{name: ((band indices...), p)}`` with checked indices and probabilities.

    group_drop : {name: (bands, p)}; bands are indices into ``bands`` or band names, p in [0, 1]
    the probability that a row loses the whole group. Groups must not overlap.
    """
    bands = tuple(bands)
    out, seen = {}, set()
    for name, spec in dict(group_drop).items():
        members, prob = spec
        idx = tuple(int(bands.index(b)) if isinstance(b, str) else int(b) for b in members)
        if not idx or any(not 0 <= i < len(bands) for i in idx) or len(set(idx)) != len(idx):
            raise ValueError(f"band group {name!r}: bad members {members} for bands {bands}")
        if seen & set(idx):
            raise ValueError(f"band group {name!r} overlaps another group")
        if not 0.0 <= float(prob) <= 1.0:
            raise ValueError(f"band group {name!r}: probability must be in [0, 1], got {prob}")
        seen |= set(idx)
        out[str(name)] = (idx, float(prob))
    return out


def group_band_mask(rng: np.random.Generator, n: int, n_bands: int, p_drop: float,
                    min_bands: int, groups: dict) -> np.ndarray:
    """(n, n_bands) bool mask with band groups missing together plus random dropout.

    groups : {name: ((indices...), p)} (see :func:`normalize_group_drop`): each row loses each
    group with its probability (independently); then, with probability ``p_drop``, it loses
    k ~ U{1..n_left - min_bands} further random bands among the n_left it still has (none when
    n_left <= min_bands).
    """
    mask = np.ones((n, n_bands), bool)
    for idx, prob in groups.values():
        gone = rng.random(n) < prob
        mask[np.ix_(gone, np.asarray(idx, int))] = False
    n_left = mask.sum(1)
    if n_left.min() < int(min_bands):
        raise ValueError("band groups leave fewer than min_bands bands")
    max_drop = n_left - int(min_bands)
    hit = (rng.random(n) < p_drop) & (max_drop >= 1)
    k = np.where(hit, np.floor(rng.random(n) * max_drop).astype(int) + 1, 0)
    u = np.where(mask, rng.random((n, n_bands)), 2.0)  # dropped bands rank last
    rank = np.argsort(np.argsort(u, axis=1), axis=1)  # a uniform order of the kept bands
    return mask & ~(rank < k[:, None])


class BandDropout:
    """A training :class:`sedflow_jax.train.DataSource` wrapper adding random band dropout.

    Wraps a source of (theta, x) with x = [mags, sigma_mags, z] and yields (theta,
    :func:`apply_mask` (x, mask, fill)) with a fresh :func:`random_band_mask` per batch, drawn from
    the shuffling generator in training and from a fixed-seed generator when ``rng`` is None
    (validation and z-scoring passes: the same masks every epoch).

    group_drop : optional {name: (band indices, p)}: groups of bands missing together in a
    fraction p of rows (:func:`group_band_mask`), e.g. ``{"galex": ((0, 1), 0.6)}``. None (default)
    draws exactly the masks of :func:`random_band_mask`.
    """

    def __init__(self, source, fill, p_drop: float = 0.5, min_bands: int = 2, seed: int = 0,
                 group_drop: dict | None = None):
        if not 0.0 < float(p_drop) <= 1.0:
            raise ValueError(f"band dropout probability must be in (0, 1], got {p_drop}")
        self.source = source
        self.n_bands = n_bands_from_x(source.d_context)
        if not 1 <= int(min_bands) < self.n_bands:
            raise ValueError(f"min_bands must be in [1, {self.n_bands - 1}], got {min_bands}")
        self.fill = np.asarray(fill, np.float32)
        self.p_drop, self.min_bands, self.seed = float(p_drop), int(min_bands), int(seed)
        self.n, self.d_theta = source.n, source.d_theta
        self.d_context = source.d_context + self.n_bands
        self.group_drop = (normalize_group_drop(group_drop, range(self.n_bands))
                           if group_drop else None)
        if self.group_drop:
            gone = sum(len(idx) for idx, _ in self.group_drop.values())
            if self.n_bands - gone < self.min_bands:
                raise ValueError(f"dropping every band group leaves {self.n_bands - gone} bands, "
                                 f"fewer than min_bands={self.min_bands}")

    def __len__(self):
        return self.n

    def iter_batches(self, rng, batch_size, rows):
        r = rng if rng is not None else np.random.default_rng([self.seed, 0xD50])
        for t, x in self.source.iter_batches(rng, batch_size, rows):
            if self.group_drop:
                m = group_band_mask(r, x.shape[0], self.n_bands, self.p_drop, self.min_bands,
                                    self.group_drop)
            else:
                m = random_band_mask(r, x.shape[0], self.n_bands, self.p_drop, self.min_bands)
            yield t, apply_mask(x, m, self.fill)


# ---------------------------------------------------------------------------------------------
# training support in (mag, log10 sigma_mag) per band
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainingSupport:
    """Occupied cells of the training set's (mag, log10 sigma_mag) plane, per band.

    mag_edges, lsig_edges : (nb, n_grid + 1) cell edges [mag, log10 mag];
    counts : (nb, n_grid, n_grid) training rows per cell; z_range : (2,) training z range;
    min_count : a cell is inside the support if it holds >= min_count rows.
    """

    bands: tuple
    mag_edges: np.ndarray
    lsig_edges: np.ndarray
    counts: np.ndarray
    z_range: np.ndarray
    min_count: int = 3

    @classmethod
    def from_x(cls, x, bands, *, n_grid: int = 24, min_count: int = 3) -> "TrainingSupport":
        """From training contexts x (n, 2 nb + 1) (one pass; see :meth:`accumulate` for more)."""
        sup = cls.empty(np.nanmin(x, 0), np.nanmax(x, 0), bands, n_grid=n_grid,
                        min_count=min_count)
        sup.accumulate(x)
        return sup

    @classmethod
    def empty(cls, x_lo, x_hi, bands, *, n_grid: int = 24, min_count: int = 3):
        """Empty grids spanning the training range x_lo..x_hi ((2 nb + 1,) each)."""
        bands = tuple(bands)
        nb = len(bands)
        x_lo, x_hi = np.asarray(x_lo, float), np.asarray(x_hi, float)
        if x_lo.shape != (2 * nb + 1,):
            raise ValueError(f"x range must have {2 * nb + 1} entries for {nb} bands")
        me, le = [], []
        for b in range(nb):
            me.append(np.linspace(x_lo[b], x_hi[b] + 1e-6, n_grid + 1))
            slo = np.log10(max(x_lo[nb + b], 1e-8))
            le.append(np.linspace(slo, np.log10(max(x_hi[nb + b], 1e-8)) + 1e-6, n_grid + 1))
        return cls(bands, np.asarray(me), np.asarray(le), np.zeros((nb, n_grid, n_grid), np.int64),
                   np.asarray([x_lo[-1], x_hi[-1]], float), int(min_count))

    def _cells(self, x):
        x = np.atleast_2d(np.asarray(x, float))
        nb = len(self.bands)
        n_grid = self.counts.shape[1]
        with np.errstate(invalid="ignore", divide="ignore"):
            ls = np.log10(x[:, nb:2 * nb])
        im = np.empty((x.shape[0], nb), np.int64)
        il = np.empty((x.shape[0], nb), np.int64)
        inside = np.isfinite(x[:, :2 * nb]).reshape(-1, 2, nb).all(1) & np.isfinite(ls)
        for b in range(nb):
            im[:, b] = np.searchsorted(self.mag_edges[b], x[:, b], side="right") - 1
            il[:, b] = np.searchsorted(self.lsig_edges[b], ls[:, b], side="right") - 1
        inside &= (im >= 0) & (im < n_grid) & (il >= 0) & (il < n_grid)
        return np.clip(im, 0, n_grid - 1), np.clip(il, 0, n_grid - 1), inside

    def accumulate(self, x):
        """Add training rows x (n, 2 nb + 1) to the counts (in place)."""
        im, il, inside = self._cells(x)
        for b in range(len(self.bands)):
            np.add.at(self.counts[b], (im[inside[:, b], b], il[inside[:, b], b]), 1)
        return self

    def band_inside(self, x) -> np.ndarray:
        """(n, nb) True where a band's (mag, sigma_mag) falls in an occupied training cell
        (False for NaN entries, e.g. masked bands)."""
        im, il, inside = self._cells(x)
        occ = np.stack([self.counts[b][im[:, b], il[:, b]] for b in range(len(self.bands))], 1)
        return inside & (occ >= self.min_count)

    def z_inside(self, z) -> np.ndarray:
        z = np.asarray(z, float)
        return np.isfinite(z) & (z >= self.z_range[0]) & (z <= self.z_range[1])

    def to_dict(self) -> dict:
        return {"bands": list(self.bands), "mag_edges": self.mag_edges.tolist(),
                "lsig_edges": self.lsig_edges.tolist(), "counts": self.counts.tolist(),
                "z_range": self.z_range.tolist(), "min_count": int(self.min_count)}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainingSupport":
        return cls(tuple(d["bands"]), np.asarray(d["mag_edges"], float),
                   np.asarray(d["lsig_edges"], float), np.asarray(d["counts"], np.int64),
                   np.asarray(d["z_range"], float), int(d.get("min_count", 3)))


def support_fractions(support: TrainingSupport, x, mask=None) -> dict:
    """Fraction of catalog rows inside the training support, per band (over the rows where the
    band is used: ``mask`` (n, nb) True) and for all bands at once. x : (n, 2 nb + 1)."""
    x = np.atleast_2d(np.asarray(x, float))
    ins = support.band_inside(x)
    mask = np.isfinite(x[:, :len(support.bands)]) if mask is None else np.asarray(mask, bool)
    out = {b: float(ins[mask[:, i], i].mean()) if mask[:, i].any() else float("nan")
           for i, b in enumerate(support.bands)}
    out["all_bands"] = float(np.mean((ins | ~mask).all(1)))
    out["n_rows"] = int(x.shape[0])
    return out


def plot_support(support: TrainingSupport, x, path=None, *, mask=None, fractions=None):
    """Per band: the training support (occupied cells) and the catalog's (mag, sigma_mag) rows,
    the ones outside marked. Saves to ``path`` (PNG) if given; returns the Figure."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    x = np.atleast_2d(np.asarray(x, float))
    nb = len(support.bands)
    ins = support.band_inside(x)
    mask = np.isfinite(x[:, :nb]) if mask is None else np.asarray(mask, bool)
    fr = fractions or support_fractions(support, x, mask)
    fig, axes = plt.subplots(1, nb, figsize=(3.0 * nb, 3.0), squeeze=False)
    for b in range(nb):
        ax = axes[0][b]
        occ = (support.counts[b] >= support.min_count).T.astype(float)
        ax.pcolormesh(support.mag_edges[b], 10 ** support.lsig_edges[b],
                      np.where(occ > 0, np.log10(support.counts[b].T + 1), np.nan),
                      cmap="Blues", shading="flat", rasterized=True)
        use = mask[:, b]
        ok, bad = use & ins[:, b], use & ~ins[:, b]
        ax.scatter(x[ok, b], x[ok, nb + b], s=1, c="k", alpha=0.3, lw=0, rasterized=True)
        ax.scatter(x[bad, b], x[bad, nb + b], s=6, c="C3", marker="x", lw=0.7)
        ax.set_yscale("log")
        ax.set_xlabel(f"{support.bands[b]} [AB mag]")
        ax.set_title(f"{support.bands[b]}: {100 * fr[support.bands[b]]:.1f}% inside", fontsize=9)
        if b == 0:
            ax.set_ylabel(r"$\sigma$ [mag]")
        good = use & np.isfinite(x[:, b])
        if good.any():
            lo, hi = np.percentile(x[good, b], [0.1, 99.9])
            ax.set_xlim(min(lo, support.mag_edges[b][0]) - 0.5, hi + 1.5)
    fig.suptitle("training set (blue cells) vs catalog (black; red x: outside)", fontsize=9)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=90)
    return fig


# ---------------------------------------------------------------------------------------------
# catalog inference with masks, support checks and counts
# ---------------------------------------------------------------------------------------------


