"""Shared fixtures: the real models, exported once per test session by the real exporter; and the tiers.

Every test gets one tier marker, from what it needs: `system` (a module that runs the daemon, a broker
or the CLI end to end), `model` (an exported model: the fixtures below), else `unit` (numpy, OpenCV and
config only). `slow` marks the long ones of any tier. `pytest -m unit` is the quick check."""
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
    assert main([name.removesuffix("-folded"), "--out", str(out), "--state-out", str(state), *extra]) == 0
    return {"int8": out, "fp32": folder / f"{name}.fp32.onnx", "state": state}


SYSTEM_MODULES = {"test_demo", "test_faults", "test_mqtt", "test_operations", "test_unattended"}
MODEL_FIXTURES = {"effnet", "effnet_folded", "fmnist", "fmnist_folded", "effnet_faithful", "fmnist_faithful"}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.module.__name__ in SYSTEM_MODULES:
            item.add_marker(pytest.mark.system)
        elif MODEL_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.model)
        elif item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.unit)


@pytest.fixture
def broker(tmp_path):
    """A mosquitto process of the test's own, on a free port."""
    from helpers import Mosquitto

    b = Mosquitto(tmp_path).start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def effnet(tmp_path_factory) -> dict[str, Path]:
    """EfficientNet-Lite0 with its real ImageNet weights, FP32 and INT8, graph layout."""
    return _export(tmp_path_factory, "efficientnet-lite0", "--layout", "graph")


@pytest.fixture(scope="session")
def effnet_folded(tmp_path_factory) -> dict[str, Path]:
    """EfficientNet-Lite0 with its real ImageNet weights, folded layout (the camera anchor's)."""
    return _export(tmp_path_factory, "efficientnet-lite0-folded")


@pytest.fixture(scope="session")
def fmnist(tmp_path_factory) -> dict[str, Path]:
    """The committed Fashion-MNIST ResNet, FP32 and INT8, graph layout."""
    return _export(tmp_path_factory, "fashion-mnist", "--layout", "graph", "--calib-frames", "200",
                   "--holdout-frames", "500")


@pytest.fixture(scope="session")
def fmnist_folded(tmp_path_factory) -> dict[str, Path]:
    """The committed Fashion-MNIST ResNet in the folded layout, FP32 and INT8."""
    return _export(tmp_path_factory, "fashion-mnist-folded", "--layout", "folded", "--calib-frames", "200",
                   "--holdout-frames", "500")


def _export_fp32(tmp_path_factory, name: str, module, shape, mode: str) -> Path:
    import json

    from agent.contract import Preprocess
    from exporters.export import adaptation_spec, build_adaptive, save_atomic

    model = module.pretrained()
    labels = module.imagenet_labels() if hasattr(module, "imagenet_labels") else module.LABELS
    onnx_model = build_adaptive(model, shape, adaptation_spec(model, mode=mode), labels,
                                Preprocess.from_json(json.dumps(module.PREPROCESS)))
    return save_atomic(onnx_model, tmp_path_factory.mktemp(f"{name}-{mode}") / f"{name}.{mode}.fp32.onnx")


@pytest.fixture(scope="session")
def effnet_faithful(tmp_path_factory) -> Path:
    """EfficientNet-Lite0 with the published UnMix-TNS, FP32 only."""
    from exporters.models import efficientnet_lite

    return _export_fp32(tmp_path_factory, "efficientnet-lite0", efficientnet_lite, (1, 3, 224, 224), "faithful")


@pytest.fixture(scope="session")
def fmnist_faithful(tmp_path_factory) -> Path:
    from exporters.models import fashion_mnist

    return _export_fp32(tmp_path_factory, "fashion-mnist", fashion_mnist, (1, 1, 28, 28), "faithful")


@pytest.fixture(scope="session")
def figures(tmp_path_factory):
    """Figures the fault tests measure (docs/operations.md), merged into the JSON file named by
    $TTA_FIGURES, else into one in pytest's temporary folder."""
    import json
    import os

    measured: dict = {}
    yield measured
    if measured:
        path = Path(os.environ.get("TTA_FIGURES") or tmp_path_factory.getbasetemp() / "reliability.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        previous = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**previous, **measured}, indent=1) + "\n")
