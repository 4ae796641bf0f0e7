"""Shared fixtures: the real models, exported once per test session by the real exporter."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _export(tmp_path_factory, name: str, *extra: str) -> dict[str, Path]:
    from exporters.cli import main

    folder = tmp_path_factory.mktemp(name)
    out = folder / f"{name}.onnx"
    state = folder / f"{name}.init.npz"
    assert main([name, "--out", str(out), "--state-out", str(state), *extra]) == 0
    return {"int8": out, "fp32": folder / f"{name}.fp32.onnx", "state": state}


@pytest.fixture(scope="session")
def effnet(tmp_path_factory) -> dict[str, Path]:
    """EfficientNet-Lite0 with its real ImageNet weights, FP32 and INT8."""
    return _export(tmp_path_factory, "efficientnet-lite0")


@pytest.fixture(scope="session")
def fmnist(tmp_path_factory) -> dict[str, Path]:
    """The committed Fashion-MNIST ResNet, FP32 and INT8."""
    return _export(tmp_path_factory, "fashion-mnist", "--calib-frames", "200", "--holdout-frames", "500")
