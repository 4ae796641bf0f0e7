"""What every adaptive session is: the `AdaptiveModel` protocol the pipeline is typed with, its step's
output, and the checkpoints every session keeps the same way."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from ..contract import ModelInfo
from ..state import initial_state, load_state, save_state


@dataclass
class StepOutput:
    logits: np.ndarray  # (classes,)
    features: np.ndarray  # (D,)
    shift: np.ndarray | None  # (layers,); None on a frame that measured no statistics (FoldedSession)
    # (layers,) an unadapted measured frame's KL from the camera's usual statistics (the camera anchor's reference)
    departure: np.ndarray | None = None


@runtime_checkable
class AdaptiveModel(Protocol):
    """What a camera's pipeline runs: one frame at a time, carrying its adaptation from frame to frame.

    Implemented by GraphSession (graph layout), FoldedSession (folded layout) and the exporter's
    TorchSession; tests/test_sessions.py holds every kind to it."""

    info: ModelInfo
    frames: int  # adapted frames that updated the state
    fallbacks: int  # accelerator failures carried over to the CPU
    fallback_reason: str | None
    provider_reason: str

    @property
    def provider(self) -> str: ...

    @property
    def state(self) -> dict[str, dict[str, np.ndarray]]: ...

    def step(self, image: np.ndarray, strength: float = 1.0, update: bool = True,
             measure: bool = False) -> StepOutput:
        """`strength` 0 is the unadapted model; `update=False` leaves the state alone (frozen, off)."""
        ...

    def reset(self) -> None: ...

    def save(self, path: str | Path) -> None: ...

    def load(self, path: str | Path) -> None: ...


def check_strength(strength: float) -> None:
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"adaptation strength must be in [0, 1], got {strength}")


class Checkpoints:
    """reset/save/load for a session that keeps `info`, `seed`, `frames`, a `state` property and
    `_set_state` (both backends)."""

    def reset(self) -> None:
        """Back to the initial components (from the source statistics and the seed)."""
        self._set_state(initial_state(self.info.adaptation, self.info.source_stats, self.seed))
        self.frames = 0

    def save(self, path: str | Path) -> None:
        save_state(path, self.state, self.info.adaptation, frames=self.frames)

    def load(self, path: str | Path) -> None:
        state, meta = load_state(path, self.info.adaptation)
        self._set_state(state)
        self.frames = int(meta.get("frames", 0))
