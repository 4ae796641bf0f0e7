"""ImageNet-C corruptions re-implemented for 28x28 grayscale images (Fashion-MNIST-C).

The `imagecorruptions` package assumes large RGB photos (and pulls opencv-python beside the
headless build), so these follow Hendrycks & Dietterich's code with the CIFAR-10-C severity
parameters, the closest published set for images this small. Frost needs the paper's frost
photos, which cannot be fetched here; speckle noise (one of the paper's extra corruptions)
takes its place. All take and return uint8 (N, 28, 28) and a numpy Generator.
"""
from __future__ import annotations

import cv2
import numpy as np
from scipy.ndimage import gaussian_filter, map_coordinates, zoom

SEVERITIES = (1, 2, 3, 4, 5)


def _f(x):
    return x.astype(np.float32) / 255.0


def _u8(x):
    return np.clip(x * 255.0, 0, 255).astype(np.uint8)


def gaussian_noise(x, s, rng):
    c = [0.04, 0.06, 0.08, 0.09, 0.10][s - 1]
    return _u8(_f(x) + rng.normal(size=x.shape, scale=c))


def shot_noise(x, s, rng):
    c = [500, 250, 100, 75, 50][s - 1]
    return _u8(rng.poisson(_f(x) * c) / c)


def impulse_noise(x, s, rng):
    c = [0.01, 0.02, 0.03, 0.05, 0.07][s - 1]
    y = _f(x).copy()
    mask = rng.random(x.shape)
    y[mask < c / 2] = 0.0
    y[(mask >= c / 2) & (mask < c)] = 1.0
    return _u8(y)


def speckle_noise(x, s, rng):
    c = [0.06, 0.1, 0.12, 0.16, 0.2][s - 1]
    y = _f(x)
    return _u8(y + y * rng.normal(size=x.shape, scale=c))


def _disk(radius, alias_blur):
    size = int(np.ceil(radius)) * 2 + 1 if radius > 8 else 3 if radius <= 1 else 5
    r = np.arange(size) - size // 2
    xx, yy = np.meshgrid(r, r)
    kernel = (xx ** 2 + yy ** 2 <= radius ** 2).astype(np.float32)
    kernel /= kernel.sum()
    return cv2.GaussianBlur(kernel, (3, 3), alias_blur)


def defocus_blur(x, s, rng):
    radius, alias = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)][s - 1]
    kernel = _disk(radius, alias)
    return _u8(np.stack([cv2.filter2D(img, -1, kernel) for img in _f(x)]))


def glass_blur(x, s, rng):
    sigma, delta, iterations = [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)][s - 1]
    out = []
    for img in _f(x):
        y = gaussian_filter(img, sigma)
        for _ in range(iterations):
            for h in range(28 - delta, delta, -1):
                for w in range(28 - delta, delta, -1):
                    dx, dy = rng.integers(-delta, delta, size=2)
                    hp, wp = h + dy, w + dx
                    y[h, w], y[hp, wp] = y[hp, wp], y[h, w]
        out.append(gaussian_filter(y, sigma))
    return _u8(np.stack(out))


def motion_blur(x, s, rng):
    radius, sigma = [(10, 1), (10, 1.5), (10, 2), (10, 2.5), (12, 3)][s - 1]
    out = []
    for img in _f(x):
        length = max(3, int(round(sigma * 2)) * 2 + 1)
        kernel = np.zeros((length, length), np.float32)
        weights = np.exp(-np.arange(length // 2 + 1) ** 2 / (2 * sigma ** 2))
        kernel[length // 2, length // 2:] = weights
        angle = rng.uniform(-45, 45)
        rot = cv2.getRotationMatrix2D((length // 2, length // 2), angle, 1.0)
        kernel = cv2.warpAffine(kernel, rot, (length, length))
        kernel /= max(kernel.sum(), 1e-6)
        out.append(cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REPLICATE))
    return _u8(np.stack(out))


def zoom_blur(x, s, rng):
    zooms = [np.arange(1, 1.06, 0.01), np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01),
             np.arange(1, 1.21, 0.01), np.arange(1, 1.26, 0.01)][s - 1]
    out = []
    for img in _f(x):
        acc = np.zeros_like(img)
        for z in zooms:
            zoomed = zoom(img, z, order=1)
            top = (zoomed.shape[0] - 28) // 2
            acc += zoomed[top:top + 28, top:top + 28]
        out.append((img + acc) / (len(zooms) + 1))
    return _u8(np.stack(out))


def _plasma(size, wibbledecay, rng):
    """Diamond-square plasma fractal, as in ImageNet-C's fog."""
    n = 1
    while n < size:
        n *= 2
    maparray = np.zeros((n, n), np.float64)
    step = n
    wibble = 100.0
    maparray[0, 0] = 0
    while step >= 2:
        half = step // 2
        corners = maparray[0:n:step, 0:n:step]
        sq = (corners + np.roll(corners, -1, 0) + np.roll(corners, -1, 1) + np.roll(np.roll(corners, -1, 0), -1, 1))
        maparray[half:n:step, half:n:step] = sq / 4 + rng.uniform(-wibble, wibble, sq.shape)
        ltsum = maparray[0:n:step, 0:n:step] + np.roll(maparray[0:n:step, 0:n:step], -1, 1)
        lt = maparray[half:n:step, half:n:step] + np.roll(maparray[half:n:step, half:n:step], 1, 0)
        maparray[0:n:step, half:n:step] = (ltsum + lt) / 4 + rng.uniform(-wibble, wibble, lt.shape)
        ltsum = maparray[0:n:step, 0:n:step] + np.roll(maparray[0:n:step, 0:n:step], -1, 0)
        lt = maparray[half:n:step, half:n:step] + np.roll(maparray[half:n:step, half:n:step], 1, 1)
        maparray[half:n:step, 0:n:step] = (ltsum + lt) / 4 + rng.uniform(-wibble, wibble, lt.shape)
        step //= 2
        wibble /= wibbledecay
    maparray -= maparray.min()
    return (maparray / maparray.max())[:size, :size]


def fog(x, s, rng):
    strength, decay = [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)][s - 1]
    out = []
    for img in _f(x):
        peak = img.max()
        y = img + strength * _plasma(32, decay, rng)[:28, :28]
        out.append(y * peak / (peak + strength))
    return _u8(np.stack(out))


def snow(x, s, rng):
    loc, scale, zoom_f, threshold, radius, sigma, blend = [
        (0.1, 0.2, 1, 0.6, 10, 4, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)][s - 1]
    out = []
    for img in _f(x):
        layer = rng.normal(loc, scale, (28, 28))
        layer = zoom(layer, zoom_f, order=1)[:28, :28] if zoom_f > 1 else layer
        layer = np.where(layer < threshold, 0, layer).astype(np.float32)
        layer = motion_blur(_u8(layer[None]), min(5, max(1, int(sigma / 3))), rng)[0].astype(np.float32) / 255
        y = blend * img + (1 - blend) * np.maximum(img, img * 1.5 + 0.5)
        out.append(y + layer + np.rot90(layer, k=2))
    return _u8(np.stack(out))


def brightness(x, s, rng):
    c = [0.05, 0.1, 0.15, 0.2, 0.3][s - 1]
    return _u8(_f(x) + c)


def contrast(x, s, rng):
    c = [0.75, 0.5, 0.4, 0.3, 0.15][s - 1]
    y = _f(x)
    means = y.mean(axis=(1, 2), keepdims=True)
    return _u8((y - means) * c + means)


def elastic_transform(x, s, rng):
    """A small random affine warp, then a smooth random displacement field (amplitude in pixels)."""
    amplitude, smooth, affine = [(0.5, 2.0, 0.5), (0.75, 2.0, 0.75), (1.0, 1.75, 1.0), (1.25, 1.5, 1.25),
                                 (1.5, 1.5, 1.5)][s - 1]
    grid_y, grid_x = np.meshgrid(np.arange(28), np.arange(28), indexing="ij")
    out = []
    for img in _f(x):
        src = np.float32([[18, 18], [18, 10], [10, 10]])
        dst = src + rng.uniform(-affine, affine, src.shape).astype(np.float32)
        y = cv2.warpAffine(img, cv2.getAffineTransform(src, dst), (28, 28), borderMode=cv2.BORDER_REFLECT_101)
        field = [gaussian_filter(rng.uniform(-1, 1, (28, 28)), smooth, mode="reflect") for _ in range(2)]
        dy, dx = (f / max(f.std(), 1e-6) * amplitude for f in field)
        out.append(map_coordinates(y, (grid_y + dy, grid_x + dx), order=1, mode="reflect"))
    return _u8(np.stack(out))


def pixelate(x, s, rng):
    c = [0.95, 0.9, 0.85, 0.75, 0.65][s - 1]
    side = int(28 * c)
    return np.stack([cv2.resize(cv2.resize(img, (side, side), interpolation=cv2.INTER_AREA), (28, 28),
                                interpolation=cv2.INTER_NEAREST) for img in x])


def jpeg_compression(x, s, rng):
    q = [80, 65, 58, 50, 40][s - 1]
    return np.stack([cv2.imdecode(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, q])[1], cv2.IMREAD_GRAYSCALE)
                     for img in x])


CORRUPTIONS = {f.__name__: f for f in (
    gaussian_noise, shot_noise, impulse_noise, defocus_blur, glass_blur, motion_blur, zoom_blur, snow,
    speckle_noise, fog, brightness, contrast, elastic_transform, pixelate, jpeg_compression)}


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be 1..5, got {severity}")
    return CORRUPTIONS[name](images, severity, np.random.default_rng(seed))
