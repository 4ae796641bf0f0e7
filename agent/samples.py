"""Real frames without a network: a 'camera' panning over scikit-image's photos.

Used by tests, calibration and the demo. Needs scikit-image (the `demo` extra).
"""
from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

# Every skimage photo usable as a camera scene.
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


# Photos whose ImageNet classes are unambiguous, with the classes accepted as correct.
LABELLED_PHOTOS = {
    "chelsea": ("tabby, tabby cat", "tiger cat", "Egyptian cat"),
    "coffee": ("espresso", "cup"),
    "rocket": ("missile", "projectile, missile", "space shuttle"),
    "camera": ("tripod", "reflex camera", "Polaroid camera, Polaroid Land camera"),
}
CONDITIONS = ("clean", "fog", "night", "clean")


def apply_condition(frame: np.ndarray, condition: str, rng: np.random.Generator) -> np.ndarray:
    """ImageNet-C-like corruptions a camera meets: fog (low contrast haze), night (dark, sensor noise)."""
    if condition == "clean":
        return frame
    x = frame.astype(np.float32)
    if condition == "fog":
        h, w = frame.shape[:2]
        haze = cv2.resize(rng.random((max(h // 32, 2), max(w // 32, 2))).astype(np.float32), (w, h),
                          interpolation=cv2.INTER_CUBIC)
        haze = 200 + 55 * haze[:, :, None]
        x = 0.35 * x + 0.65 * haze
    elif condition == "night":
        x = 0.25 * x * np.array([1.15, 0.9, 0.8], np.float32)  # dim, bluish (BGR)
        x += rng.normal(0, 18, x.shape).astype(np.float32)
    else:
        raise ValueError(f"unknown condition {condition!r}")
    return np.clip(x, 0, 255).astype(np.uint8)


def render_sample_video(path, frames_per_photo: int = 30, fps: float = 10.0, size=(320, 240),
                        conditions=CONDITIONS, seed: int = 0) -> list[dict]:
    """Write an .mp4 of a camera panning over the labelled photos, once per condition, and a
    labels/conditions sidecar next to it (<video>.labels.csv); returns the sidecar rows."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write video {path}")
    rows = []
    photos = {name: photo(name) for name in LABELLED_PHOTOS}
    try:
        for condition in conditions:
            for name, image in photos.items():
                for frame in pan(image, frames_per_photo, size):
                    writer.write(apply_condition(frame, condition, rng))
                    rows.append({"frame": len(rows), "label": "|".join(LABELLED_PHOTOS[name]),
                                 "condition": condition})
    finally:
        writer.release()
    with open(sidecar_path(path), "w", newline="", encoding="utf-8") as f:
        out = csv.DictWriter(f, fieldnames=["frame", "label", "condition"])
        out.writeheader()
        out.writerows(rows)
    return rows


def sidecar_path(video) -> Path:
    video = Path(video)
    return video.with_name(video.stem + ".labels.csv")
