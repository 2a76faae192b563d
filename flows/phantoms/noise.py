"""Texture and acquisition-noise models for the phantoms.

Chest radiograph (projection) model, applied in this order by :mod:`flows.phantoms.cxr`:

1. *Anatomical texture.* Lung parenchyma is not smooth: the lung's attenuation is
   modulated by correlated power-law ("1/f^beta") Gaussian noise (:func:`power_law_noise`,
   beta 2.6-3.2: clustered, scale-free blobs), and vascular markings are the ridges
   (:func:`ridge_texture`) of a noise field laid out in polar coordinates around each
   hilum: lines radiating outwards that thin and fade towards the periphery.
2. *Image formation.* The line integral of attenuation A (in units of the water
   attenuation coefficient times path length) gives the expected primary fluence
   ``N0 * exp(-A)`` per pixel, plus a low-frequency scatter veil (a blurred copy of the
   primary, scatter-to-primary ratio 0.1-0.4, :func:`lowpass`). The focal spot and the
   sampling blur the anatomy slightly.
3. *Quantum + electronic noise* (:func:`poisson_gaussian`): the detected count is
   Poisson-distributed around the expected fluence (the dose ``N0`` is drawn per image, so
   the signal-to-noise ratio varies between images) plus zero-mean Gaussian electronic
   noise.
4. *Detector* (:func:`gaussian_psf`): the scintillator spreads light, a Gaussian point
   spread function (sigma 0.3-0.9 pixel) that also correlates the noise; the flat-field
   correction leaves a slight multiplicative gain non-uniformity (:func:`gain_field`,
   a few per cent, smooth).
5. The log transform, window/level, gamma and unsharp-mask "processing" that turns the
   detected signal into a displayed image live in :mod:`flows.phantoms.cxr`.

Head CT model, applied by :mod:`flows.phantoms.headct`: partial volume from slice
thickness (averaging sub-slices), a reconstruction-kernel blur of the image (Gaussian,
in plane), and additive Gaussian noise whose in-plane correlation is that of the kernel
(:func:`ct_noise`: white noise blurred in plane and rescaled to a random standard
deviation of 3-7 HU, the "dose" of that scan).

The random functions take an explicit ``numpy.random.Generator``; nothing keeps global
state.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = [
    "ct_noise",
    "gain_field",
    "gaussian_psf",
    "lowpass",
    "poisson_gaussian",
    "power_law_noise",
    "ridge_texture",
]


def power_law_noise(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    beta: float,
    *,
    cutoff: float = 0.0,
) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian noise with power spectrum ~ 1 / |f|^beta.

    ``cutoff`` (cycles/pixel) flattens the spectrum below that frequency so that a large
    beta does not make the field a single gradient. Works in 2-D and 3-D.
    """
    white = rng.standard_normal(shape).astype(np.float32)
    spec = np.fft.rfftn(white)
    freqs = [np.fft.fftfreq(s) for s in shape[:-1]] + [np.fft.rfftfreq(shape[-1])]
    grids = np.meshgrid(*freqs, indexing="ij", sparse=True)
    f2 = sum(g.astype(np.float32) ** 2 for g in grids)
    f = np.sqrt(np.maximum(f2, (cutoff if cutoff > 0 else 1.0 / max(shape)) ** 2))
    spec *= f ** (-beta / 2.0)
    out = np.fft.irfftn(spec, s=shape, axes=tuple(range(len(shape)))).astype(np.float32)
    out -= out.mean()
    sd = float(out.std())
    return out / sd if sd > 0 else out


def ridge_texture(field: np.ndarray, width: float | np.ndarray = 0.15) -> np.ndarray:
    """Thin branching ridges where a zero-mean field crosses zero, values in [0, 1];
    ``width`` (a scalar or a per-pixel array) sets how thick they are."""
    return np.clip(1.0 - np.abs(field) / width, 0.0, 1.0) ** 2


def lowpass(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian low-pass of a 2-D image; large sigmas are done on a decimated grid."""
    if sigma_px <= 0:
        return img
    factor = int(max(1, sigma_px // 4))
    if factor == 1:
        return ndimage.gaussian_filter(img, sigma_px, mode="nearest")
    h, w = img.shape
    hp, wp = -(-h // factor) * factor, -(-w // factor) * factor
    padded = np.pad(img, ((0, hp - h), (0, wp - w)), mode="edge")
    small = padded.reshape(hp // factor, factor, wp // factor, factor).mean(axis=(1, 3))
    small = ndimage.gaussian_filter(small, sigma_px / factor, mode="nearest")
    big = ndimage.zoom(small, factor, order=1, mode="nearest", grid_mode=True)
    return big[:h, :w].astype(img.dtype, copy=False)


def poisson_gaussian(rng: np.random.Generator, expected: np.ndarray, electronic_sigma: float) -> np.ndarray:
    """Detected counts: Poisson(expected) + N(0, electronic_sigma^2)."""
    lam = np.maximum(expected, 0.0).astype(np.float64)
    counts = rng.poisson(lam).astype(np.float32)
    if electronic_sigma > 0:
        counts += rng.normal(0.0, electronic_sigma, size=expected.shape).astype(np.float32)
    return counts


def gaussian_psf(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Detector blur: a Gaussian point spread function of ``sigma_px`` pixels."""
    if sigma_px <= 0:
        return img
    return ndimage.gaussian_filter(img, sigma_px, mode="nearest")


def gain_field(rng: np.random.Generator, shape: tuple[int, int], amplitude: float) -> np.ndarray:
    """Smooth multiplicative gain ``1 + amplitude * g``, g a random low-order surface in
    about [-1, 1] (residual of the flat-field correction, heel effect)."""
    h, w = shape
    y = np.linspace(-1.0, 1.0, h, dtype=np.float32)[:, None]
    x = np.linspace(-1.0, 1.0, w, dtype=np.float32)[None, :]
    c = rng.normal(0.0, 1.0, size=6).astype(np.float32)
    g = c[0] * x + c[1] * y + 0.5 * (c[2] * x * x + c[3] * y * y + c[4] * x * y)
    g += 0.3 * c[5] * np.cos(np.pi * (x + y))
    g /= max(float(np.abs(g).max()), 1e-6)
    return (1.0 + amplitude * g).astype(np.float32)


def ct_noise(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    sigma_hu: float,
    kernel_sigma_px: float,
) -> np.ndarray:
    """Additive CT noise (D, H, W): white Gaussian noise blurred in plane by the
    reconstruction kernel (``kernel_sigma_px``) and rescaled to std ``sigma_hu``."""
    n = rng.standard_normal(shape).astype(np.float32)
    if kernel_sigma_px > 0:
        n = ndimage.gaussian_filter(n, (0.0, kernel_sigma_px, kernel_sigma_px), mode="wrap")
    sd = float(n.std())
    return n * (sigma_hu / sd) if sd > 0 else n
