"""Real frames without a network: a 'camera' panning over scikit-image's photos.

Used by tests, calibration and the demo. Needs scikit-image (the `demo` extra).
"""
from __future__ import annotations

from collections.abc import Iterator

import cv2
import numpy as np

# skimage photo -> the ImageNet class an EfficientNet should see in it (None: no single class)
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "camera", "coins", "hubble_deep_field",
          "immunohistochemistry", "moon", "page", "horse", "text")


def photo(name: str) -> np.ndarray:
    """One skimage photo as an OpenCV BGR uint8 image."""
    from skimage import data

    image = getattr(data, name)()
    if image.dtype != np.uint8:
        image = (np.clip(image, 0, 1) * 255).astype(np.uint8) if image.dtype.kind == "f" else image.astype(np.uint8)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    return cv2.cvtColor(image[:, :, :3], cv2.COLOR_RGB2BGR)


def pan(image: np.ndarray, frames: int, size: tuple[int, int] = (320, 240), zoom: float = 0.8) -> Iterator[np.ndarray]:
    """A slow pan across `image`: each frame a window of `zoom` of its shorter side, resized to `size`."""
    h, w = image.shape[:2]
    side = int(min(h, w) * zoom)
    win_w, win_h = min(w, int(side * size[0] / size[1])), side
    for i in range(frames):
        t = i / max(frames - 1, 1)
        x = int((w - win_w) * t)
        y = int((h - win_h) * (0.5 + 0.5 * np.sin(np.pi * t)) / 2)
        yield cv2.resize(image[y:y + win_h, x:x + win_w], size, interpolation=cv2.INTER_AREA)


def photo_stream(frames_per_photo: int, names=PHOTOS, size=(320, 240)) -> Iterator[tuple[str, np.ndarray]]:
    """(photo name, frame) for a camera that pans over each photo in turn."""
    for name in names:
        for frame in pan(photo(name), frames_per_photo, size):
            yield name, frame
