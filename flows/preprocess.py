"""Per-kind preprocessing: raw pixel arrays -> model grid, values in [0, 1].

A bundle records the :class:`Preprocessing` its models were trained with, and the node must
feed them exactly that; :func:`Preprocessing.mismatch` says which field differs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args

import numpy as np
from scipy import ndimage

Intensity = Literal["minmax", "percentile", "window", "none"]
# "percentile": the image's 0.5th percentile maps to 0 and the 99.5th percentile of what lies
# above it (the foreground: an empty collimated field is the image's floor) to 1, as nnU-Net
# clips CT foregrounds; a hot pixel or a burned-in label brighter than the anatomy then cannot
# compress the anatomy's range as it does under "minmax", and how much of a radiograph is empty
# background (a child's, 30-80 %) does not move where the anatomy's top is clipped.
ROBUST_PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class Preprocessing:
    """How a raw image becomes a model input.

    ``window`` (for CT, in HU) maps ``[lo, hi]`` to [0, 1]; the paper's head-CT window
    ``clip(HU + 14, 0, 127)`` is ``(-14, 114)`` at 7 bits. ``minmax`` rescales each image
    to its own range (radiographs: exposure and detector gain vary between sites);
    ``percentile`` does so between robust ends (``ROBUST_PERCENTILES``), clipping beyond them.
    """

    kind: str
    shape: tuple[int, ...]
    n_bits: int = 8
    intensity: Intensity = "minmax"
    window: tuple[float, float] | None = None
    # Patch models: the isotropic voxel size (mm) volumes are resampled to before patching.
    spacing: float | None = None
    # CT patch models (intensities(); whole-image apply() ignores it): every volume's noise is
    # raised to this SD (HU, model grid) before the window, so doses look alike (harmonise_noise)
    noise_floor: float | None = None
    # Whole-image models: crop every image to its foreground (the largest connected region
    # above this raw value, e.g. -300 HU: skin, skull and brain, not air or the head holder)
    # plus CROP_MARGIN before resizing to ``shape`` (foreground_box)
    crop_above: float | None = None

    def __post_init__(self) -> None:
        if self.intensity not in get_args(Intensity):
            raise ValueError(f"unknown intensity mapping {self.intensity!r}; use one of "
                             f"{', '.join(get_args(Intensity))}")
        if self.intensity == "window" and self.window is None:
            raise ValueError("intensity='window' needs a (lo, hi) window")
        if any(int(s) <= 0 for s in self.shape):
            raise ValueError(f"model shape must be positive, got {self.shape}")
        if self.crop_above is not None and self.spacing is not None:
            raise ValueError("crop_above is for whole-image models; a patch model's volume is "
                             "resampled to its spacing, not cropped")

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["window"] = list(self.window) if self.window is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown preprocessing field(s): {sorted(unknown)}")
        window = d.get("window")
        sp, nf, crop = d.get("spacing"), d.get("noise_floor"), d.get("crop_above")
        return cls(kind=str(d["kind"]), shape=tuple(int(s) for s in d["shape"]),
                   n_bits=int(d.get("n_bits", 8)), intensity=d.get("intensity", "minmax"),
                   window=(float(window[0]), float(window[1])) if window is not None else None,
                   spacing=float(sp) if sp is not None else None,
                   noise_floor=float(nf) if nf is not None else None,
                   crop_above=float(crop) if crop is not None else None)

    def mismatch(self, other: Preprocessing) -> list[str]:
        """Human-readable differences, empty when the two are interchangeable."""
        out = []
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a != b:
                out.append(f"{f.name}: {a!r} != {b!r}")
        return out

    def apply(self, images: np.ndarray) -> np.ndarray:
        """``(N, *spatial)`` or ``(N, 1, *spatial)`` raw arrays -> ``(N, 1, *shape)`` float32 in [0, 1]."""
        return self.apply_with_boxes(images)[0]

    def apply_with_boxes(self, images: np.ndarray) -> tuple[np.ndarray, list[tuple[slice, ...]]]:
        """:meth:`apply`, and each image's :meth:`crop_box` (where its model-grid map belongs)."""
        arr = np.asarray(images)
        if arr.ndim == self.ndim + 2 and arr.shape[1] == 1:
            arr = arr[:, 0]
        if arr.ndim != self.ndim + 1:
            raise ValueError(
                f"{self.kind}: expected a batch of {self.ndim}D images shaped (N, *spatial) "
                f"or (N, 1, *spatial), got shape {arr.shape}")
        if arr.shape[0] == 0:
            raise ValueError(f"{self.kind}: empty batch")
        if not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"{self.kind}: images must be numeric, got dtype {arr.dtype}")
        bad = ~np.isfinite(arr)
        if bad.any():
            first = int(np.argwhere(bad.reshape(arr.shape[0], -1).any(axis=1))[0][0])
            raise ValueError(f"{self.kind}: {int(bad.sum())} NaN/inf pixel(s); first bad image index {first}")
        out = np.empty((arr.shape[0], 1, *self.shape), dtype=np.float32)
        boxes = []
        for i in range(arr.shape[0]):
            img = arr[i].astype(np.float32, copy=False)
            which = f"image {i}" if arr.shape[0] > 1 else "the image"
            if self.ndim == 3 and min(img.shape) < 2:
                raise ValueError(f"{self.kind}: {which} has shape {img.shape}: one slice is not a volume")
            if float(img.max()) == float(img.min()):  # blank: a failed export, not anatomy
                raise ValueError(f"{self.kind}: {which} is blank (every pixel {float(img.flat[0]):g}); "
                                 "nothing to score")
            if self.intensity == "window":
                check_hounsfield(img, self.kind)
            boxes.append(self.crop_box(img))
            out[i, 0] = np.clip(resize(self._intensity(img[boxes[-1]]), self.shape), 0.0, 1.0)
        return out, boxes

    def intensities(self, volume: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """Only the intensity mapping, on the volume's own grid (for patch models, whose
        ``shape`` is the patch, not the volume); ``mask`` is where the noise floor is measured.
        The caller checks the units on the source volume (:func:`check_hounsfield`): resampling
        first would blur away the air the check looks for."""
        arr = np.asarray(volume, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise ValueError(f"{self.kind}: {int((~np.isfinite(arr)).sum())} NaN/inf voxel(s)")
        if self.noise_floor:
            arr = harmonise_noise(arr, self.noise_floor, self.window, mask)
        return np.clip(self._intensity(arr), 0.0, 1.0).astype(np.float32)

    def crop_box(self, img: np.ndarray) -> tuple[slice, ...]:
        """The region of one raw image that :meth:`apply` resizes onto the model grid (the
        whole image unless ``crop_above`` is set); a map on the model grid belongs there."""
        if self.crop_above is None:
            return tuple(slice(0, n) for n in img.shape)
        return foreground_box(img, self.crop_above, self.kind)

    def _intensity(self, img: np.ndarray) -> np.ndarray:
        if self.intensity == "window":
            assert self.window is not None
            lo, hi = self.window
            img = np.clip((img - lo) / (hi - lo), 0.0, 1.0)
        elif self.intensity in ("minmax", "percentile"):
            lo, hi = float(img.min()), float(img.max())
            if self.intensity == "percentile":
                plo = float(np.percentile(img, ROBUST_PERCENTILES[0]))
                fg = img[img > plo]
                phi = float(np.percentile(fg, ROBUST_PERCENTILES[1])) if fg.size else plo
                if phi > plo:  # else: almost all one value; the full range keeps what is left
                    lo, hi = plo, phi
            img = rescale(img, lo, hi)
        return img


def check_hounsfield(volume: np.ndarray, what: str = "CT") -> None:
    """Refuse a CT that is plainly not in Hounsfield units: no air (its 0.5th percentile above
    -200) yet a top far above soft tissue (99.5th percentile above 900). That is how stored
    values look when the Rescale Intercept (usually -1024) was not applied on export; windowed
    as HU they would make every tissue white and the score meaningless. A skull-stripped or
    cropped CT in HU (background 0, no bone) passes."""
    v = np.asarray(volume).ravel()
    v = v[:: max(1, v.size // 1_000_000)]  # a percentile of a million voxels is plenty
    lo, hi = (float(x) for x in np.percentile(v, [0.5, 99.5]))
    if lo > -200.0 and hi > 900.0:
        raise ValueError(
            f"{what}: the values do not look like Hounsfield units (0.5th percentile {lo:.0f}, "
            f"99.5th {hi:.0f}; a CT in HU has air near -1000 and soft tissue near 40): stored "
            "values without the Rescale Intercept? Subtract the offset (usually 1024) first")


def rescale(img: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """``[lo, hi]`` (default: the image's own range) mapped linearly onto [0, 1]; all zeros
    for an image of one value."""
    lo = float(img.min()) if lo is None else lo
    hi = float(img.max()) if hi is None else hi
    return (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)


CROP_MARGIN = 0.05


def foreground_box(img: np.ndarray, above: float, what: str = "image", *,
                   detect_size: int = 128) -> tuple[slice, ...]:
    """Bounding box of the largest connected region of ``img > above``, grown by
    ``CROP_MARGIN`` of its extent on each side (clipped to the image).

    Resizing this box onto the model grid normalises position and size per axis -- the crude
    equivalent of an affine registration to a template. A whole-image flow has no translation
    or scale invariance; without it the field of view (which differs between scanners and
    sites) and head size spend the model's capacity and move the score (docs/results.md:
    the head-CT posterior followed head size, rho -0.51). A one-voxel opening first detaches
    thin attachments (cables, the head holder's shell) from the body. The region is found on
    every k-th voxel (at most ``detect_size`` per axis: a 512x512x300 CT in 0.1 s, not 6 s)
    and the box is widened to the nearest sampled background voxel, so it never cuts the
    region; it is at most k - 1 voxels too wide on a side, a fraction of one model voxel.
    """
    full = np.asarray(img)
    step = [max(1, -(-n // detect_size)) for n in full.shape]
    fg = full[tuple(slice(None, None, k) for k in step)] > above
    opened = ndimage.binary_opening(fg)
    if opened.any():
        fg = opened
    lab, n = ndimage.label(fg)
    if n == 0:
        raise ValueError(f"{what}: nothing above {above:g} to crop to (a blank image, or the "
                         "wrong kind of image for this model?)")
    largest = int(np.argmax(np.bincount(lab.ravel())[1:])) + 1
    box = ndimage.find_objects(lab)[largest - 1]
    out = []
    for sl, k, size in zip(box, step, full.shape, strict=True):
        lo = max(0, (sl.start - 1) * k + 1) if sl.start > 0 else 0  # just past the sample before
        hi = min(size, sl.stop * k)  # up to the sample after
        grow = int(np.ceil(CROP_MARGIN * (hi - lo)))
        out.append(slice(max(0, lo - grow), min(size, hi + grow)))
    return tuple(out)


def check_spacing(spacing: tuple[float, ...], ndim: int) -> np.ndarray:
    """Voxel spacing (mm) as an array, or a ValueError naming what is wrong with it."""
    sp = np.asarray(spacing, dtype=np.float64)
    if sp.shape != (ndim,) or not np.isfinite(sp).all() or (sp <= 0).any():
        raise ValueError(f"voxel spacing must be {ndim} positive numbers, got {tuple(spacing)}")
    return sp


def resample_to_spacing(volume: np.ndarray, spacing: tuple[float, ...], target: float
                        ) -> np.ndarray:
    """Resample onto an isotropic grid of ``target`` mm covering the same field of view."""
    sp = check_spacing(spacing, volume.ndim)
    if target <= 0:
        raise ValueError(f"target spacing must be positive, got {target}")
    shape = tuple(max(1, round(n * s / target)) for n, s in zip(volume.shape, sp, strict=True))
    return resize(volume.astype(np.float32, copy=False), shape)


def resize(img: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Linear resampling to ``shape`` with a Gaussian anti-alias filter when shrinking."""
    if tuple(img.shape) == tuple(shape):
        return img.astype(np.float32, copy=False)
    factors = [t / s for t, s in zip(shape, img.shape, strict=True)]
    sigma = [max(0.0, (1.0 / f - 1.0) / 2.0) for f in factors]
    if any(s > 0 for s in sigma):
        img = ndimage.gaussian_filter(img, sigma)
    return ndimage.zoom(img, factors, order=1, grid_mode=True, mode="nearest").astype(np.float32)


def noise_sd(volume: np.ndarray, window: tuple[float, float] | None = None,
             mask: np.ndarray | None = None) -> float:
    """A robust estimate of a CT volume's high-frequency noise SD, in its own units.

    The Laplacian cancels smooth anatomy and keeps noise (Immerkær 1996, in n dimensions):
    white Gaussian noise of SD ``s`` gives a Laplacian of SD ``s * sqrt(2n + 4n²)``; the
    median absolute value, over voxels whose whole neighbourhood lies inside ``window``
    (bone and air are clipped there and carry no noise), gives that SD robustly against
    the tissue edges that remain; within ``mask`` when given (the tissue the model reads),
    and never where the Laplacian is exactly 0 (padding, synthetic flat air, a constant
    fill outside the reconstruction circle). NaN when fewer than 100 voxels remain. Spatially
    correlated noise (a reconstruction kernel) reads lower than its SD: the estimate is
    of the noise power the finest scales of a model see, which is what it has to match.
    """
    v = np.asarray(volume, dtype=np.float32)
    n = v.ndim
    inside = np.ones(v.shape, dtype=bool)
    if window is not None:
        inside = (v > window[0]) & (v < window[1])
    inside = ndimage.binary_erosion(inside, iterations=1, border_value=0)
    if mask is not None:
        inside &= np.asarray(mask, dtype=bool)
    lap = np.abs(ndimage.laplace(v))[inside]
    lap = lap[lap > 0]
    if lap.size < 100:
        return float("nan")
    return float(np.median(lap) / 0.6745 / np.sqrt(2 * n + 4 * n * n))


def harmonise_noise(volume: np.ndarray, floor: float, window: tuple[float, float] | None = None,
                    mask: np.ndarray | None = None) -> np.ndarray:
    """Raise a volume's high-frequency noise to ``floor`` (same units) with added white noise.

    A density model's log-likelihood is dominated by the entropy of the acquisition noise
    (docs/results.md: r = 0.98 between a head CT's mean patch likelihood and its noise
    level), so scans of different dose are not comparable. Topping every volume up to one
    noise floor removes that term; a volume already noisier is left as it is. The added
    noise is seeded by the volume's content: the same volume always gets the same noise.
    """
    import zlib

    v = np.asarray(volume, dtype=np.float32)
    s = noise_sd(v, window, mask)
    if not np.isfinite(s) or s >= floor:
        return v
    add = float(np.sqrt(floor * floor - s * s))  # white noise adds its variance to the estimate's
    rng = np.random.default_rng(zlib.crc32(v.tobytes()))
    return v + rng.normal(0.0, add, v.shape).astype(np.float32)
