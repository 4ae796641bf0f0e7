"""The graph layout's session: UnMix-TNS runs inside the graph, its components carried frame to frame.

The components live in two preallocated sets of arrays bound with IOBinding: each frame reads one set and
writes the other, then they swap, so nothing is allocated or copied per frame."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import contract
from ..contract import ModelInfo, read_model_info
from .adaptive import StepOutput, check_strength
from .providers import OnnxSession, bind_output


class GraphSession(OnnxSession):
    """step() runs one frame; the updated components become the next frame's inputs.

    `strength` is the adaptation strength in [0, 1] (the graph's `adapt` input): 0 runs the frame on the source
    statistics and leaves the components as they are (the unadapted model), 1 (or True) is
    full UnMix-TNS, values between blend the two and move the components that much less
    (agent/gate.py sets it). `update=False` adapts without moving the components (frozen).
    `measure=True` asks for this frame's shift whatever the session's cadence (the graph layout
    measures every frame; FoldedSession may not).
    """

    LAYOUT = "graph"
    METHODS = ("unmix",)  # what adaptation.method may name for this layout; the first is `auto`
    OUTPUTS = (contract.LOGITS, contract.FEATURES, contract.SHIFT)

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None,
                 seed: int = 0, info: ModelInfo | None = None):
        info = info or read_model_info(path)
        spec = info.adaptation
        # (layer, tensor, graph input, graph output) for every state tensor
        self._state_io = [(layer.name, t, contract.state_input(layer.name, t), contract.state_output(layer.name, t))
                          for layer in spec.layers for t in spec.state_tensors]
        self._adapt = np.zeros(1, np.float32)
        super().__init__(path, device=device, threads=threads, seed=seed, info=info)

    @classmethod
    def open(cls, path: str | Path, info: ModelInfo, method: str, statistics_every: int,
             rebake_divergence: float | None, **placement) -> GraphSession:
        """sessions.open_session's way in: the graph measures every frame, so the cadence does not apply."""
        return cls(path, info=info, **placement)

    def _set_state(self, state: dict) -> None:
        self._current = {i: np.array(state[layer][t], np.float32, order="C") for layer, t, i, _ in self._state_io}
        self._spare = {i: np.empty_like(a) for i, a in self._current.items()}
        self._scratch = {i: np.empty_like(a) for i, a in self._current.items()}

    def step(self, image: np.ndarray, strength: float = 1.0, update: bool = True, measure: bool = False) -> StepOutput:
        check_strength(strength)
        self._adapt[0] = strength
        commit = strength > 0 and update
        target = self._spare if commit else self._scratch
        self._run_or_fall_back(lambda: self._run(image, target))
        if commit:
            self._current, self._spare = self._spare, self._current
            self.frames += 1
        out = self._outputs
        return StepOutput(out[contract.LOGITS][0].copy(), out[contract.FEATURES][0].copy(),
                          out[contract.SHIFT][0].copy())

    def _run(self, image: np.ndarray, target: dict) -> None:
        binding = self.session.io_binding()
        binding.bind_cpu_input(contract.IMAGE, np.ascontiguousarray(image, np.float32))
        binding.bind_cpu_input(contract.ADAPT, self._adapt)
        for _, _, name_in, name_out in self._state_io:
            binding.bind_cpu_input(name_in, self._current[name_in])
            bind_output(binding, name_out, target[name_in])
        for name, array in self._outputs.items():
            bind_output(binding, name, array)
        self.session.run_with_iobinding(binding)

    @property
    def state_feeds(self) -> dict[str, np.ndarray]:
        """The components as the next step's session inputs (copies)."""
        return {name: a.copy() for name, a in self._current.items()}

    @property
    def state(self) -> dict[str, dict[str, np.ndarray]]:
        nested: dict[str, dict[str, np.ndarray]] = {}
        for layer, t, name_in, _ in self._state_io:
            nested.setdefault(layer, {})[t] = self._current[name_in].copy()
        return nested
