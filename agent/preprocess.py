"""Frames (OpenCV BGR/BGRA/gray uint8 arrays of any size) -> the network's input tensor, per the model's metadata."""
from __future__ import annotations

import cv2
import numpy as np

from .contract import Preprocess


class FrameError(ValueError):
    """A frame that cannot be converted; the message is the reason counted in stats."""


class Preprocessor:
    def __init__(self, spec: Preprocess):
        self.spec = spec
        channels = 1 if spec.channel_order == "GRAY" else 3
        self.mean = np.asarray(spec.mean, np.float32)
        self.inv_std = 1.0 / np.asarray(spec.std, np.float32)
        self.channels = channels

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        """Returns float32 (1, C, H, W); raises FrameError for frames that are not images."""
        image = self._resize_crop(self._to_channels(frame))
        planes = image[:, :, None] if image.ndim == 2 else image
        out = np.empty((1, self.channels, *planes.shape[:2]), np.float32)
        for c in range(self.channels):  # one pass per channel plane, straight into the NCHW tensor
            np.subtract(planes[:, :, c], self.mean[c], out=out[0, c], dtype=np.float32)
            out[0, c] *= self.inv_std[c]
        return out

    def _to_channels(self, frame: np.ndarray) -> np.ndarray:
        if not isinstance(frame, np.ndarray) or frame.size == 0:
            raise FrameError("empty frame")
        if frame.dtype != np.uint8:
            raise FrameError(f"frame dtype {frame.dtype}, expected uint8")
        if frame.ndim in (2, 3) and min(frame.shape[:2]) < 2:
            raise FrameError(f"frame of {frame.shape[1]}x{frame.shape[0]} pixels is too small")
        if frame.ndim == 3 and frame.shape[2] == 1:
            frame = frame[:, :, 0]
        if frame.ndim == 2:
            gray = frame
            if self.channels == 1:
                return gray
            frame = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
        elif frame.ndim == 3 and frame.shape[2] == 4:
            frame = cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)
        elif not (frame.ndim == 3 and frame.shape[2] == 3):
            raise FrameError(f"frame shape {frame.shape} is not an image (H, W[, 1|3|4])")
        order = self.spec.channel_order
        if order == "GRAY":
            return cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB) if order == "RGB" else frame

    def _resize_crop(self, image: np.ndarray) -> np.ndarray:
        out_h, out_w = self.spec.size
        if self.spec.resize == "stretch":
            return _resize(image, out_w, out_h)
        h, w = image.shape[:2]
        shorter = self.spec.resize_to or min(out_h, out_w)
        scale = shorter / min(h, w)
        image = _resize(image, max(out_w, round(w * scale)), max(out_h, round(h * scale)))
        if self.spec.crop == "none":
            return _resize(image, out_w, out_h)
        h, w = image.shape[:2]
        top, left = (h - out_h) // 2, (w - out_w) // 2
        return image[top:top + out_h, left:left + out_w]


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    if image.shape[1] == width and image.shape[0] == height:
        return image
    shrink = width < image.shape[1] or height < image.shape[0]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
