"""CT-3DFlow's patch-aggregated Log P map, in 2D and 3D.

Overlapping patches (default 48 per axis, 10 voxels of overlap) tile the whole volume; each
patch gets one log-likelihood per voxel from a patch Glow (or, with a mixture patch model
too, the posterior ratio ``log p1 - log p0``), and the patch scores are aggregated into a
voxel map with Gaussian weights centred on each patch. Everything here works on the model
grid; :func:`to_source_grid` puts a map back on the series' own grid.

Speed: patches are cut with strided views and scored in batches; the Gaussian weight sum
depends only on the grid, so aggregation is one weighted scatter-add per patch.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from flows.errors import ScoringError
from flows.glow import FlowModel
from flows.pair import ModelPair
from flows.quantize import dequantize
from flows.trace import ShapeTraced

PatchScorer = Callable[[torch.Tensor], torch.Tensor]


class PatchMapError(ValueError):
    """Input the patch map cannot work with, with the reason."""


def axis_starts(length: int, patch: int, overlap: int) -> list[int]:
    """Start offsets along one axis: stride ``patch - overlap``, the last patch flush with the end.

    ``length`` must be >= ``patch`` (pad smaller volumes first).
    """
    if patch <= 0 or not 0 <= overlap < patch:
        raise PatchMapError(f"need patch > 0 and 0 <= overlap < patch, got {patch}, {overlap}")
    if length < patch:
        raise PatchMapError(f"axis of {length} is shorter than the patch ({patch}); pad first")
    stride = patch - overlap
    starts = list(range(0, length - patch + 1, stride))
    if starts[-1] != length - patch:
        starts.append(length - patch)
    return starts


@dataclass(frozen=True)
class PatchGrid:
    """Where the patches of a volume lie (on the model grid, after padding)."""

    shape: tuple[int, ...]  # padded volume shape
    patch: tuple[int, ...]
    overlap: int
    pad_before: tuple[int, ...]  # padding added in front of each axis
    original: tuple[int, ...]  # shape before padding

    @classmethod
    def plan(cls, shape: tuple[int, ...], patch: int | tuple[int, ...], overlap: int) -> PatchGrid:
        p = (patch,) * len(shape) if isinstance(patch, int) else tuple(patch)
        if len(p) != len(shape):
            raise PatchMapError(f"patch {p} and volume {shape} differ in dimensionality")
        if any(s <= 0 for s in shape):
            raise PatchMapError(f"empty volume of shape {shape}")
        padded = tuple(max(s, q) for s, q in zip(shape, p, strict=True))
        before = tuple((t - s) // 2 for t, s in zip(padded, shape, strict=True))
        for s, q in zip(padded, p, strict=True):
            axis_starts(s, q, overlap)  # validates
        return cls(padded, p, overlap, before, tuple(shape))

    def starts(self) -> list[tuple[int, ...]]:
        per_axis = [axis_starts(s, q, self.overlap) for s, q in zip(self.shape, self.patch, strict=True)]
        return list(itertools.product(*per_axis))

    def slices(self, start: tuple[int, ...]) -> tuple[slice, ...]:
        return tuple(slice(a, a + q) for a, q in zip(start, self.patch, strict=True))

    def pad(self, volume: np.ndarray, value: float) -> np.ndarray:
        if volume.shape == self.shape:
            return volume
        widths = [(b, t - s - b) for b, t, s in zip(self.pad_before, self.shape, volume.shape, strict=True)]
        return np.pad(volume, widths, mode="constant", constant_values=value)

    def crop(self, padded: np.ndarray) -> np.ndarray:
        return padded[tuple(slice(b, b + s) for b, s in zip(self.pad_before, self.original, strict=True))]


def gaussian_weights(patch: tuple[int, ...], sigma_scale: float = 0.125) -> np.ndarray:
    """Separable Gaussian importance map over a patch (MONAI's convention: sigma = 0.125 * size)."""
    w = np.ones(patch, dtype=np.float64)
    for axis, n in enumerate(patch):
        c = (n - 1) / 2.0
        g = np.exp(-0.5 * ((np.arange(n) - c) / max(sigma_scale * n, 1e-6)) ** 2)
        w = w * g.reshape([-1 if a == axis else 1 for a in range(len(patch))])
    return np.maximum(w / w.max(), 1e-3)  # never zero: every covered voxel gets a value


def select_patches(grid: PatchGrid, mask: np.ndarray | None, min_fraction: float) -> list[tuple[int, ...]]:
    """All patch starts, or those whose mask fraction is at least ``min_fraction``."""
    starts = grid.starts()
    if mask is None:
        return starts
    m = grid.pad(mask.astype(bool), False)
    if not m.any():
        raise PatchMapError("the mask is empty: no patch can be selected (check the mask or "
                            "run without one)")
    keep = [s for s in starts if m[grid.slices(s)].mean() >= min_fraction]
    if not keep:  # a tiny mask: at least the patches that touch it
        keep = [s for s in starts if m[grid.slices(s)].any()]
    return keep


@dataclass
class PatchMap:
    """A voxel map on the model grid and what produced it."""

    values: np.ndarray  # aggregated per-voxel score; NaN where no selected patch covers
    patch_scores: np.ndarray  # one score per evaluated patch
    starts: list[tuple[int, ...]]
    grid: PatchGrid

    @property
    def covered(self) -> np.ndarray:
        return np.isfinite(self.values)


class _Aggregator:
    """The Gaussian-weighted average of patch scores at every voxel, built up a batch at a
    time (so a per-voxel map never needs every patch's scores at once)."""

    def __init__(self, grid: PatchGrid, sigma_scale: float) -> None:
        self.grid = grid
        self.w = gaussian_weights(grid.patch, sigma_scale)
        self.num = np.zeros(grid.shape, dtype=np.float64)
        self.den = np.zeros(grid.shape, dtype=np.float64)

    def add(self, starts: list[tuple[int, ...]], scores: np.ndarray) -> None:
        for s, v in zip(starts, scores, strict=True):
            sl = self.grid.slices(s)
            self.num[sl] += self.w * v
            self.den[sl] += self.w

    def values(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(self.den > 0, self.num / np.where(self.den > 0, self.den, 1.0), np.nan)
        return self.grid.crop(out)


def aggregate(grid: PatchGrid, starts: list[tuple[int, ...]], scores: np.ndarray,
              sigma_scale: float = 0.125) -> np.ndarray:
    """Gaussian-weighted average of per-patch scores at every voxel (NaN where uncovered).

    ``scores`` holds one number per patch ``(M,)``, or one map per patch ``(M, *patch)``
    (the per-voxel decomposition of each patch's log-density).
    """
    if len(starts) != len(scores):
        raise PatchMapError(f"{len(starts)} patches but {len(scores)} scores")
    agg = _Aggregator(grid, sigma_scale)
    agg.add(starts, scores)
    return agg.values()


def _batches(volume: np.ndarray, grid: PatchGrid, starts: list[tuple[int, ...]],
             batch_size: int) -> Iterator[np.ndarray]:
    for i in range(0, len(starts), batch_size):
        yield np.stack([volume[grid.slices(s)] for s in starts[i:i + batch_size]])[:, None]


def glow_patch_scorer(m0: FlowModel, m1: FlowModel | None, n_bits: int,
                      per_voxel: bool = False, trace: bool = True) -> PatchScorer:
    """Score a batch of [0, 1] patches: ``-log p0 / V`` or ``(log p1 - log p0) / V`` per patch,
    or with ``per_voxel`` the same as maps over each patch (the exact per-position
    decomposition, :meth:`flows.glow.Glow.log_p_map`, whose mean is the per-patch value).

    Higher is more abnormal in every case. With ``trace`` CPU batches run through a
    TorchScript trace made once per patch shape and kept with the scorer
    (:class:`flows.trace.ShapeTraced`); it keeps no input checks, so it belongs behind
    :func:`patch_map`'s own. One model or a pair, the trace makes a CPU batch about 1.27x
    faster (docs/benchmarks.md, session 12).
    """
    pair = ModelPair(m0, m1) if m1 is not None else None

    def eager(x01: torch.Tensor) -> torch.Tensor:
        x = dequantize(x01, n_bits, noise=False)
        if pair is None:
            s = -(m0.log_p_map(x) if per_voxel else m0(x).log_p)
        else:
            lp0, lp1 = pair.log_p_maps(x) if per_voxel else pair.log_p(x)
            s = lp1 - lp0
        return s if per_voxel else s / float(np.prod(x.shape[2:]))

    return ShapeTraced(eager, [m0, m1], "patch scorer") if trace else eager


MAP_SOURCES = ("likelihood", "posterior")


def glow_map_sources_scorer(m0: FlowModel, m1: FlowModel, n_bits: int, trace: bool = True
                            ) -> PatchScorer:
    """Both per-voxel maps of a batch of patches from one pass of the pair, stacked
    ``(B, 2, *patch)`` in :data:`MAP_SOURCES` order: ``-log p0`` and ``log p1 - log p0`` per
    position. What four :func:`glow_patch_scorer` passes (each source, per patch and per
    voxel) give, for a third of the model evaluations: :func:`patch_maps`."""
    pair = ModelPair(m0, m1)

    def eager(x01: torch.Tensor) -> torch.Tensor:
        lp0, lp1 = pair.log_p_maps(dequantize(x01, n_bits, noise=False))
        return torch.stack([-lp0, lp1 - lp0], dim=1)

    return ShapeTraced(eager, [m0, m1], "map sources scorer") if trace else eager


def _plan(volume01: np.ndarray, patch: int | tuple[int, ...], overlap: int, mask: np.ndarray | None,
          min_mask_fraction: float, pad_value: float
          ) -> tuple[PatchGrid, list[tuple[int, ...]], np.ndarray]:
    """The patch grid, the selected patches and the padded volume, after the input checks."""
    vol = np.asarray(volume01)
    if vol.ndim not in (2, 3):
        raise PatchMapError(f"expected a 2D image or a 3D volume, got shape {vol.shape}")
    if not np.isfinite(vol).all():
        raise PatchMapError(f"volume holds {int((~np.isfinite(vol)).sum())} NaN/inf value(s)")
    if mask is not None and mask.shape != vol.shape:
        raise PatchMapError(f"mask shape {mask.shape} differs from the volume's {vol.shape}")
    grid = PatchGrid.plan(vol.shape, patch, overlap)
    starts = select_patches(grid, mask, min_mask_fraction)
    return grid, starts, grid.pad(vol.astype(np.float32, copy=False), pad_value)


def _scored(padded: np.ndarray, grid: PatchGrid, starts: list[tuple[int, ...]], scorer: PatchScorer,
            batch_size: int, device: str | torch.device
            ) -> Iterator[tuple[list[tuple[int, ...]], np.ndarray]]:
    """(the batch's patch starts, their scores) batch by batch; a non-finite score is an error
    once every batch is counted."""
    bad = 0
    for i, batch in enumerate(_batches(padded, grid, starts, batch_size)):
        scores = scorer(torch.from_numpy(batch).to(device)).double().cpu().numpy()
        bad += int((~np.isfinite(scores)).sum())
        yield starts[i * batch_size:(i + 1) * batch_size], scores
    if bad:
        raise ScoringError(f"{bad} non-finite patch score value(s)")


@torch.no_grad()
def patch_map(volume01: np.ndarray, scorer: PatchScorer, *, patch: int | tuple[int, ...] = 48,
              overlap: int = 10, mask: np.ndarray | None = None, min_mask_fraction: float = 0.1,
              batch_size: int = 16, pad_value: float = 0.0, sigma_scale: float = 0.125,
              device: str | torch.device = "cpu") -> PatchMap:
    """The aggregated map of one preprocessed volume (or image) with values in [0, 1]. The
    scorer gives one score per patch ``(B,)`` or a map per patch ``(B, *patch)``; either is
    aggregated batch by batch."""
    grid, starts, padded = _plan(volume01, patch, overlap, mask, min_mask_fraction, pad_value)
    agg = _Aggregator(grid, sigma_scale)
    per_patch = []
    for batch_starts, scores in _scored(padded, grid, starts, scorer, batch_size, device):
        agg.add(batch_starts, scores)
        per_patch.append(scores.reshape(len(scores), -1).mean(axis=1))
    return PatchMap(agg.values(), np.concatenate(per_patch), starts, grid)


@torch.no_grad()
def patch_maps(volume01: np.ndarray, scorer: PatchScorer, sources: tuple[str, ...] = MAP_SOURCES, *,
               patch: int | tuple[int, ...] = 48, overlap: int = 10, mask: np.ndarray | None = None,
               min_mask_fraction: float = 0.1, batch_size: int = 16, pad_value: float = 0.0,
               sigma_scale: float = 0.125, device: str | torch.device = "cpu") -> dict[str, PatchMap]:
    """From one pass of a scorer that gives per-voxel maps of several sources ``(B, S, *patch)``
    (:func:`glow_map_sources_scorer`), each source's per-patch map (named as the source: every
    patch contributes the mean of its map) and per-voxel map (``source:voxel``) — what
    :func:`patch_map` gives with the per-patch and the per-voxel scorer of each source."""
    grid, starts, padded = _plan(volume01, patch, overlap, mask, min_mask_fraction, pad_value)
    names = [n for src in sources for n in (src, f"{src}:voxel")]
    aggs = {n: _Aggregator(grid, sigma_scale) for n in names}
    per_patch: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for batch_starts, scores in _scored(padded, grid, starts, scorer, batch_size, device):
        if scores.shape[1] != len(sources):
            raise PatchMapError(f"the scorer gave {scores.shape[1]} maps per patch for "
                                f"{len(sources)} sources")
        for k, src in enumerate(sources):
            voxel = scores[:, k]
            means = voxel.reshape(len(voxel), -1).mean(axis=1)
            for name, values, patch_values in ((src, means, means),
                                               (f"{src}:voxel", voxel, means)):
                aggs[name].add(batch_starts, values)
                per_patch[name].append(patch_values)
    return {n: PatchMap(aggs[n].values(), np.concatenate(per_patch[n]), starts, grid) for n in names}


def to_source_grid(values: np.ndarray, source_shape: tuple[int, ...]) -> np.ndarray:
    """Resample a model-grid map onto the source grid (the inverse of the preprocessing's resize).

    Both grids span the same field of view with voxel centres at ``(i + 0.5) * spacing``
    (``grid_mode=True``), so a lesion lines up with its source position. Uncovered (NaN)
    voxels stay NaN.
    """
    if len(source_shape) != values.ndim:
        raise PatchMapError(f"map is {values.ndim}D but the source grid is {source_shape}")
    factors = [t / s for t, s in zip(source_shape, values.shape, strict=True)]
    finite = np.isfinite(values)
    # float32 (what the node stores) and a uint8 coverage: a full-size CT's map and coverage
    # take half and a quarter of the memory they took in float64 and float32
    filled = np.where(finite, values, np.nanmin(values) if finite.any() else 0.0).astype(np.float32)
    out = ndimage.zoom(filled, factors, order=1, grid_mode=True, mode="nearest")
    if not finite.all():
        cov = ndimage.zoom(finite.astype(np.uint8), factors, order=0, grid_mode=True, mode="nearest")
        out[cov == 0] = np.nan
    return out


def sample_patches(volumes01: np.ndarray, masks: np.ndarray | None, patch: int | tuple[int, ...],
                   per_volume: int, rng: np.random.Generator, *,
                   min_mask_fraction: float = 0.1, pad_value: float = 0.0) -> np.ndarray:
    """Training patches ``(M, 1, *patch)``: up to ``per_volume`` random patches per volume whose
    mask fraction is at least ``min_mask_fraction`` (CT-3DFlow: the lung mask guides selection).

    Patches are drawn at random offsets (not on the inference grid), so the model sees every
    alignment of anatomy within a patch. Volumes smaller than a patch are padded.
    """
    vols = np.asarray(volumes01)
    if vols.ndim < 3:
        raise PatchMapError(f"expected a batch of images or volumes, got shape {vols.shape}")
    if masks is not None and vols.ndim == masks.ndim + 1 and vols.shape[1] == 1:
        vols = vols[:, 0]  # (N, 1, *spatial) with masks (N, *spatial)
    if masks is not None and masks.shape != vols.shape:
        raise PatchMapError(f"masks {masks.shape} and volumes {vols.shape} differ in shape")
    if per_volume <= 0:
        raise PatchMapError("per_volume must be positive")
    out = []
    for i, vol in enumerate(vols):
        grid = PatchGrid.plan(vol.shape, patch, 0)
        v = grid.pad(vol, pad_value)
        m = grid.pad(masks[i].astype(bool), False) if masks is not None else None
        hi = [s - q + 1 for s, q in zip(grid.shape, grid.patch, strict=True)]
        if m is not None:
            # candidate starts: patch centres inside the mask
            centres = np.argwhere(m)
            if len(centres) == 0:
                continue
            half = np.array(grid.patch) // 2
            starts = np.clip(centres - half, 0, np.array(hi) - 1)
            pick = starts[rng.choice(len(starts), min(len(starts), per_volume * 4), replace=False)]
        else:
            pick = np.stack([rng.integers(0, h, per_volume) for h in hi], axis=1)
        got = 0
        for s in pick:
            sl = grid.slices(tuple(int(a) for a in s))
            if m is not None and m[sl].mean() < min_mask_fraction:
                continue
            out.append(v[sl])
            got += 1
            if got == per_volume:
                break
    if not out:
        raise PatchMapError("no patch met the mask criterion: the masks are empty or too small")
    return np.stack(out)[:, None].astype(np.float32)
