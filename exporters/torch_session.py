"""The same adaptive model run by torch: the way to a GPU where onnxruntime has no CUDA provider.

The agent finds it through the `tta_agent.backends` entry point (pyproject.toml), only when
`advanced.model.backend: torch` is asked for, or when `model.device: cuda` is asked for and torch is the
only way to the GPU (agent.model.sessions.open_session): the agent itself imports nothing of the torch
half. It builds the torch model the file names (`tta.source`), swaps its BatchNorm layers for the exporter's UnMix-TNS
modules with the file's own adaptation spec (exporters/unmix.py, the references the graphs are
tested against), and offers GraphSession's interface: step/reset/save/load/state.

The components are mirrored on the CPU after every committed frame, so when the GPU fails
(CUDA error, device lost, out of memory) the model is rebuilt on the CPU with the components
of the last good frame and the failed frame is rerun there.
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path

import numpy as np
import torch

from agent.contract import ContractError, ModelInfo, read_model_info
from agent.model.adaptive import Checkpoints, StepOutput
from agent.state import initial_state

from .export import with_features
from .unmix import replace_batchnorm

log = logging.getLogger(__name__)


def torch_cuda_available() -> bool:
    return torch.cuda.is_available()


class TorchSession(Checkpoints):
    def __init__(self, path: str | Path, device: str = "cuda", threads: int | None = None, seed: int = 0,
                 info: ModelInfo | None = None):
        self.path = Path(path)
        self.info = info or read_model_info(path)
        if self.info.adaptation.layout != "graph":
            raise ContractError(f"{self.path} is a {self.info.adaptation.layout}-layout model; the torch backend runs "
                                "graph-layout models only (tta-export --layout graph), or use advanced.model.backend: "
                                "onnxruntime")
        if self.info.source is None:
            raise ContractError(f"{self.path} does not name its torch model (tta.source): export it with this "
                                "tta-export, or use the onnxruntime backend")
        if threads:
            torch.set_num_threads(threads)
        self.seed = seed
        self.fallback_reason: str | None = None
        self.fallbacks = 0
        wanted = "cuda" if device in ("cuda", "auto") and torch.cuda.is_available() else "cpu"
        self.provider_reason = (f"torch backend on {wanted}" if wanted == "cuda" or device == "cpu" else
                                f"torch backend: {device} requested but torch sees no CUDA device; on the CPU")
        self._build(torch.device(wanted), initial_state(self.info.adaptation, self.info.source_stats, seed))
        self.frames = 0
        log.info("model %s on %s (%s)", self.path.name, self.provider, self.provider_reason)

    def _build(self, device: torch.device, state: dict) -> None:
        module_name, _, function = self.info.source["builder"].partition(":")
        try:
            model = getattr(importlib.import_module(module_name), function)()
        except (ImportError, AttributeError) as exc:
            raise ContractError(f"{self.path}: cannot build its torch model {self.info.source['builder']}: {exc}"
                                ) from exc
        weights = self.info.source.get("weights")
        if weights:
            model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        spec = self.info.adaptation
        options = spec.options if spec.mode == "robust" else {"momentum": spec.momentum}
        self.layers = replace_batchnorm(model, state, mode=spec.mode, temperature=spec.temperature, **options)
        self.model = with_features(model).eval().to(device)
        self.device = device
        self.on_gpu = device.type != "cpu"
        name = torch.cuda.get_device_name(device) if self.on_gpu else "cpu"
        self.provider = f"torch/{device.type} ({name})"
        self._mirror = {name: {t: np.array(v, np.float32) for t, v in tensors.items()}
                        for name, tensors in state.items()}

    def step(self, image: np.ndarray, strength: float = 1.0, update: bool = True, measure: bool = False) -> StepOutput:
        """As GraphSession.step; every frame is measured."""
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"adaptation strength must be in [0, 1], got {strength}")
        commit = strength > 0 and update
        try:
            out = self._forward(image, strength, commit)
        except RuntimeError as exc:  # CUDA errors, out of memory (torch.OutOfMemoryError is one)
            if not self.on_gpu:
                raise
            self._fall_back(exc)
            out = self._forward(image, strength, commit)
        if commit:
            self._mirror = self._read_state()
            self.frames += 1
        return out

    def _forward(self, image: np.ndarray, strength: float, commit: bool) -> StepOutput:
        tensors = self.info.adaptation.state_tensors
        kept = None if commit else {n: {t: getattr(layer, t).clone() for t in tensors} for n, layer in
                                    self.layers.items()}
        for layer in self.layers.values():
            layer.strength = strength
        with torch.no_grad():
            logits, features = self.model(torch.from_numpy(np.ascontiguousarray(image, np.float32)).to(self.device))
            shift = torch.stack([self.layers[layer.name].shift for layer in self.info.adaptation.layers])
        if kept is not None:
            for name, buffers in kept.items():
                for key, value in buffers.items():
                    getattr(self.layers[name], key).copy_(value)
        return StepOutput(logits[0].cpu().numpy(), features[0].cpu().numpy(), shift.cpu().numpy())

    def _read_state(self) -> dict:
        tensors = self.info.adaptation.state_tensors
        return {name: {t: getattr(layer, t).cpu().numpy().copy() for t in tensors} for name, layer in
                self.layers.items()}

    def _fall_back(self, exc: Exception) -> None:
        self.fallback_reason = (f"{self.provider} failed ({type(exc).__name__}: {str(exc)[:200]}); "
                                "switched to the CPU")
        self.fallbacks += 1
        log.error("%s", self.fallback_reason)
        self._build(torch.device("cpu"), self._mirror)
        self.provider_reason = self.fallback_reason

    @property
    def state(self) -> dict[str, dict[str, np.ndarray]]:
        return {name: {t: v.copy() for t, v in tensors.items()} for name, tensors in self._mirror.items()}

    def _set_state(self, state: dict) -> None:
        for name, layer in self.layers.items():
            for t, value in state[name].items():
                getattr(layer, t).copy_(torch.as_tensor(np.asarray(value, np.float32)))
        self._mirror = self._read_state()
