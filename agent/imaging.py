"""What the drift detector reads of a camera frame: four imaging statistics and a coarse picture of the view.

Measured on a small grey copy of the frame (`observe`), so that every camera costs the same whatever its
resolution: log brightness, contrast, sharpness and colourfulness; unit-norm thumbnails of intensity and of
edge strength, which say which view the frame shows; and the colourfulness of a coarser thumbnail, where
pixel noise has averaged out (an infrared picture is grey region by region, a noisy grey scene only pixel by
pixel).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

STATISTICS = ("brightness", "contrast", "sharpness", "colour")
WORK_WIDTH = 192  # pixels: the grey copy the statistics are measured on
VIEW_SIZE = (24, 18)
TINT_SIZE = (12, 9)


@dataclass
class Observation:
    """One frame as the drift detector sees it."""
    statistics: np.ndarray  # (4,) log brightness, contrast, sharpness, colourfulness
    view: np.ndarray  # (2, 432) unit-norm, zero-mean intensity and edge thumbnails
    tint: float = 0.0  # log colourfulness of a TINT_SIZE thumbnail, where pixel noise has averaged out


def _unit(v: np.ndarray) -> np.ndarray:
    v = v.ravel() - v.mean()
    return v / max(float(np.linalg.norm(v)), 1e-6)


def observe(image: np.ndarray) -> Observation:
    """A camera frame (BGR or grey uint8, any size) -> its imaging statistics and view."""
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    h, w = image.shape[:2]
    size = (WORK_WIDTH, max(1, round(h * WORK_WIDTH / w)))
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    grey = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
    mean, std = cv2.meanStdDev(grey)
    sharpness = cv2.mean(cv2.convertScaleAbs(cv2.Laplacian(grey, cv2.CV_16S)))[0]
    colour, tint = (_colourfulness(x) for x in (small, cv2.resize(small, TINT_SIZE, interpolation=cv2.INTER_AREA)))
    statistics = np.log(np.array([mean[0, 0] + 1, std[0, 0] + 1, sharpness + 0.5, colour + 4]))
    grey = grey.astype(np.float32)
    edges = cv2.magnitude(cv2.Sobel(grey, cv2.CV_32F, 1, 0), cv2.Sobel(grey, cv2.CV_32F, 0, 1))
    view = np.stack([_unit(cv2.resize(x, VIEW_SIZE, interpolation=cv2.INTER_AREA)) for x in (grey, edges)])
    return Observation(statistics, view, float(np.log(tint + 4)))


def _colourfulness(image: np.ndarray) -> float:
    b, g, r = cv2.split(image.astype(np.int16))
    return float(np.abs(r - g).mean() + np.abs(((r + g) >> 1) - b).mean())
