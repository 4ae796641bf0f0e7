"""One adaptive model in an onnxruntime session, with its UnMix-TNS components carried frame to frame."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from . import contract
from .contract import ModelInfo, read_model_info
from .state import initial_state, load_state, save_state

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    logits: np.ndarray  # (classes,)
    features: np.ndarray  # (D,)
    shift: np.ndarray  # (layers,)


class AdaptiveSession:
    """step() runs one frame; the updated components become the next frame's inputs.

    `adapt=False` runs the frame on the source statistics and leaves the components as
    they are (the unadapted model); `update=False` adapts without moving the components
    (frozen adaptation).
    """

    def __init__(self, path: str | Path, providers: list | None = None, threads: int | None = None,
                 seed: int = 0, info: ModelInfo | None = None):
        self.info = info or read_model_info(path)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
        self.seed = seed
        spec = self.info.adaptation
        self._state_pairs = [(contract.state_input(layer.name, t), contract.state_output(layer.name, t))
                             for layer in spec.layers for t in spec.state_tensors]
        self._outputs = [contract.LOGITS, contract.FEATURES, contract.SHIFT] + [o for _, o in self._state_pairs]
        self._on = np.ones(1, np.float32)
        self._off = np.zeros(1, np.float32)
        self.frames = 0
        self.reset()

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def reset(self) -> None:
        """Back to the initial components (from the source statistics and the seed)."""
        self._feeds = self._flatten(initial_state(self.info.adaptation, self.info.source_stats, self.seed))
        self.frames = 0

    def step(self, image: np.ndarray, adapt: bool = True, update: bool = True) -> StepOutput:
        feeds = {contract.IMAGE: image, contract.ADAPT: self._on if adapt else self._off, **self._feeds}
        logits, features, shift, *states = self.session.run(self._outputs, feeds)
        if adapt and update:
            self._feeds = {name: value for (name, _), value in zip(self._state_pairs, states)}
            self.frames += 1
        return StepOutput(logits[0], features[0], shift[0])

    @property
    def state_feeds(self) -> dict[str, np.ndarray]:
        """The components as the next step's session inputs."""
        return dict(self._feeds)

    @property
    def state(self) -> dict[str, dict[str, np.ndarray]]:
        nested: dict[str, dict[str, np.ndarray]] = {}
        spec = self.info.adaptation
        for layer in spec.layers:
            nested[layer.name] = {t: self._feeds[contract.state_input(layer.name, t)] for t in spec.state_tensors}
        return nested

    def save(self, path: str | Path) -> None:
        save_state(path, self.state, self.info.adaptation, frames=self.frames)

    def load(self, path: str | Path) -> None:
        state, meta = load_state(path, self.info.adaptation)
        self._feeds = self._flatten(state)
        self.frames = int(meta.get("frames", 0))

    @staticmethod
    def _flatten(state: dict) -> dict[str, np.ndarray]:
        return {contract.state_input(layer, t): np.ascontiguousarray(a, np.float32)
                for layer, tensors in state.items() for t, a in tensors.items()}
