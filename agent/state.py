"""UnMix-TNS component state: initialisation from source statistics, and the .npz file layout.

Layout of a state file (numpy .npz, written atomically):
    "<layer>/<tensor>"  float32 arrays, e.g. "_blocks.0._bn1/means" of shape (K, C)
    "__meta__"          a JSON string: {"format": 1, "mode": ..., "components": K, "frames": n}
The exporter writes the initial state in this layout and the agent checkpoints into it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .contract import AdaptationSpec
from .files import write_atomic

STATE_FORMAT = 1
META_KEY = "__meta__"
NOISY_INIT_A = 0.5  # the paper's a: share of source variance moved into the spread of the means


class StateError(ValueError):
    """A state file that does not fit the model; the message names the layer or key."""


def initial_state(spec: AdaptationSpec, source_stats: dict, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Components for every layer, reproducible from the seed.

    faithful: the paper's noisy init, M_k = mu + sqrt(aK/(K-1)) sqrt(var) n_k, V_k = (1-a) var.
    robust: every component empty (count 0) at the source statistics; data seeds them.
    """
    rng = np.random.default_rng(seed)
    k = spec.components
    state = {}
    for layer in spec.layers:
        mean, var = (np.asarray(a, np.float64) for a in source_stats[layer.name])
        if spec.mode == "faithful":
            noise = rng.standard_normal((k, mean.size))
            means = mean + np.sqrt(NOISY_INIT_A * k / (k - 1)) * np.sqrt(var) * noise
            variances = np.broadcast_to((1 - NOISY_INIT_A) * var, (k, mean.size))
            state[layer.name] = {"means": means.astype(np.float32), "vars": variances.astype(np.float32)}
        elif spec.mode == "robust":
            state[layer.name] = {"means": np.tile(mean, (k, 1)).astype(np.float32),
                                 "vars": np.tile(var, (k, 1)).astype(np.float32),
                                 "counts": np.zeros((k, 1), np.float32)}
        else:
            raise StateError(f"unknown adaptation mode {spec.mode!r}")
    return state


def save_state(path: str | Path, state: dict, spec: AdaptationSpec, frames: int = 0) -> None:
    """Written atomically, so a crash never leaves a torn state file."""
    path = Path(path)
    arrays = {f"{layer}/{name}": np.ascontiguousarray(t)
              for layer, tensors in state.items() for name, t in tensors.items()}
    meta = {"format": STATE_FORMAT, "mode": spec.mode, "components": spec.components, "frames": int(frames)}
    arrays[META_KEY] = np.array(json.dumps(meta))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: np.savez(f, **arrays))


def load_state(path: str | Path, spec: AdaptationSpec) -> tuple[dict, dict]:
    """Read a state file and check it against the model's spec; returns (state, meta)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except Exception as exc:  # a damaged zip raises any of a dozen types (BadZipFile, zlib.error, ...)
        raise StateError(f"state file {path} is unreadable: {type(exc).__name__}: {exc}") from exc
    try:
        meta = json.loads(str(arrays.pop(META_KEY)))
        if not isinstance(meta, dict) or not isinstance(meta.get("frames", 0), int):
            raise ValueError("not a mapping with an integer frame count")
    except (KeyError, ValueError) as exc:
        raise StateError(f"state file {path} has no valid {META_KEY} entry") from exc
    if meta.get("mode") != spec.mode or meta.get("components") != spec.components:
        raise StateError(
            f"state file {path} is for mode={meta.get('mode')} K={meta.get('components')}, "
            f"the model uses mode={spec.mode} K={spec.components}"
        )
    state = {}
    for layer in spec.layers:
        state[layer.name] = {}
        for name in spec.state_tensors:
            key = f"{layer.name}/{name}"
            if key not in arrays:
                raise StateError(f"state file {path} lacks {key}")
            if not np.issubdtype(arrays[key].dtype, np.floating):
                raise StateError(f"state file {path}: {key} holds {arrays[key].dtype}, not floats")
            tensor = arrays[key].astype(np.float32, copy=False)
            expected = (spec.components, 1 if name == "counts" else layer.channels)
            if tensor.shape != expected:
                raise StateError(f"state file {path}: {key} has shape {tensor.shape}, expected {expected}")
            if not np.all(np.isfinite(tensor)):
                raise StateError(f"state file {path}: {key} holds non-finite values")
            state[layer.name][name] = tensor
    return state, meta
