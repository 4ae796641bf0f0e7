"""tta-export: build the adaptive INT8 (and FP32) .onnx files the agent runs.

    tta-export efficientnet-lite0 --out models/efficientnet_lite0.onnx [--calib DIR|VIDEO]
    tta-export fashion-mnist --out models/fashion_mnist.onnx
    tta-export custom --model pkg.module:build --weights w.pt --input-size 224 224 \\
        --labels labels.txt --mean 123.7 116.3 103.5 --std 58.4 57.1 57.4 --out models/mine.onnx
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from agent import contract
from agent.contract import LAYOUTS, Preprocess, read_model_info
from agent.state import initial_state, save_state

from .export import ExportError, adaptation_spec, build_adaptive, save_atomic, set_metadata
from .quantize import add_shift_reference, quantize, read_frames
from .unmix import K_DEFAULT, MOMENTUM_BATCH1, TEMPERATURE, batchnorm_layers

log = logging.getLogger("tta-export")
MODES = ("robust", "faithful")


def _efficientnet(args):
    from .models import efficientnet_lite as eff

    if args.calib is None:
        from agent.samples import photo_stream

        frames = [frame for _, frame in photo_stream(24)]
        # every 4th photo's pan is held out entirely, so agreement is measured on unseen images
        held = {i for i in range(len(frames)) if (i // 24) % 4 == 3}
        calib = [f for i, f in enumerate(frames) if i not in held]
        holdout = [f for i, f in enumerate(frames) if i in held]
    else:
        calib, holdout = _split(args)
    shape = (1, 3, eff.IMAGE_SIZE, eff.IMAGE_SIZE)
    source = {"builder": "exporters.models.efficientnet_lite:pretrained"}
    return eff.pretrained(), shape, eff.imagenet_labels(), eff.PREPROCESS, calib, holdout, source


def _fashion_mnist(args):
    from .models import fashion_mnist as fm

    if args.calib is None:
        train, _ = fm.load_split("train")
        test, _ = fm.load_split("t10k")
        calib, holdout = list(train[: args.calib_frames]), list(test[: args.holdout_frames])
    else:
        calib, holdout = _split(args)
    source = {"builder": "exporters.models.fashion_mnist:pretrained"}
    return fm.pretrained(), (1, 1, 28, 28), fm.LABELS, fm.PREPROCESS, calib, holdout, source


def _custom(args):
    if not args.model or ":" not in args.model:
        raise ExportError("--model must be 'module:function' returning an nn.Module")
    module_name, _, function = args.model.partition(":")
    try:
        build = getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError) as exc:
        raise ExportError(f"--model {args.model}: {exc}") from exc
    model = build()
    if args.weights is not None:
        _load_weights(model, args.weights)
    if not args.labels or not args.labels.is_file():
        raise ExportError(f"--labels {args.labels}: file not found (one class name per line)")
    labels = [line.strip() for line in args.labels.read_text(encoding="utf-8").splitlines() if line.strip()]
    channels = 1 if args.channel_order == "GRAY" else 3
    for name in ("mean", "std"):
        if len(getattr(args, name)) != channels:
            raise ExportError(f"--{name} needs {channels} values for channel order {args.channel_order}")
    preprocess = {"size": args.input_size, "resize": args.resize, "resize_to": args.resize_to, "crop": args.crop,
                  "channel_order": args.channel_order, "mean": args.mean, "std": args.std, "padding": args.padding}
    if args.calib is None:
        raise ExportError("--calib DIR|VIDEO is required for a custom model")
    calib, holdout = _split(args)
    source = {"builder": args.model, "weights": str(args.weights.resolve()) if args.weights else None}
    return model, (1, channels, *args.input_size), labels, preprocess, calib, holdout, source


def _load_weights(model, path: Path) -> None:
    import torch

    if not path.is_file():
        raise ExportError(f"weights file {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ExportError(f"weights file {path} cannot be read: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ExportError(f"weights file {path} does not match the model: missing keys {result.missing_keys[:5]}, "
                          f"unexpected keys {result.unexpected_keys[:5]}")


def _split(args):
    frames = read_frames(args.calib, limit=args.calib_frames + args.holdout_frames)
    if args.holdout is not None:
        return frames[: args.calib_frames], read_frames(args.holdout, limit=args.holdout_frames)
    cut = max(1, int(len(frames) * 0.8))
    if cut >= len(frames):
        raise ExportError(f"calibration source {args.calib} gave {len(frames)} frame(s): too few to hold some out")
    return frames[:cut], frames[cut:]


BUILDERS = {"efficientnet-lite0": _efficientnet, "fashion-mnist": _fashion_mnist, "custom": _custom}


def _check_writable(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"output folder {path.parent} cannot be made: {exc.strerror}") from None
    if not os.access(path.parent, os.W_OK):
        raise ExportError(f"output folder {path.parent} is not writable")


def export(args) -> dict:
    out: Path = args.out
    fp32_out: Path = args.fp32_out or out.with_name(out.stem + ".fp32.onnx")
    for path in (out, fp32_out):
        _check_writable(path)
    model, shape, labels, preprocess, calib, holdout, source = BUILDERS[args.model_name](args)
    layers = None
    if args.adapt_layers is not None:
        layers = list(batchnorm_layers(model))[: args.adapt_layers]
    layout = args.layout or ("graph" if args.mode == "faithful" else "folded")
    spec = adaptation_spec(model, mode=args.mode, components=args.components, momentum=args.momentum,
                           temperature=args.temperature, layers=layers, layout=layout)
    log.info("exporting %d adapted layers, %s layout, mode %s, K=%d", len(spec.layers), layout, spec.mode,
             spec.components)
    onnx_model = build_adaptive(model, shape, spec, labels, Preprocess.from_json(json.dumps(preprocess)))
    set_metadata(onnx_model, {contract.KEY_SOURCE: json.dumps(source)})  # for the agent's torch backend
    save_atomic(onnx_model, fp32_out)
    info = read_model_info(fp32_out)
    report = quantize(fp32_out, out, info, calib, holdout, method=args.calibration)
    add_shift_reference(fp32_out, info, calib)
    if args.state_out:
        save_state(args.state_out, initial_state(spec, info.source_stats, args.seed), spec)
    sizes = {"fp32_bytes": fp32_out.stat().st_size, "int8_bytes": out.stat().st_size}
    return {"int8": str(out), "fp32": str(fp32_out), **sizes, **report}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tta-export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_name", choices=sorted(BUILDERS), help="which model to export")
    p.add_argument("--out", type=Path, required=True, help="the INT8 model file to write")
    p.add_argument("--fp32-out", type=Path, help="the FP32 model file (default: <out stem>.fp32.onnx)")
    p.add_argument("--calib", type=Path, help="folder of images or a video file for INT8 calibration")
    p.add_argument("--holdout", type=Path, help="frames for the INT8-vs-FP32 agreement (default: last 20%% of --calib)")
    p.add_argument("--calib-frames", type=int, default=256)
    p.add_argument("--holdout-frames", type=int, default=256)
    p.add_argument("--calibration", choices=("minmax", "percentile", "entropy"), default="percentile")
    p.add_argument("--mode", choices=MODES, default="robust",
                   help="robust: the single-instance variant (default); faithful: the published algorithm")
    p.add_argument("--layout", choices=LAYOUTS,
                   help="folded (default; robust mode only): BatchNorm folded into the INT8 convolutions, the "
                        "adaptation (the camera anchor) in the agent; graph (the faithful mode's): UnMix-TNS "
                        "inside the ONNX graph (docs/architecture.md)")
    p.add_argument("--components", type=int, default=K_DEFAULT, help="K, UnMix-TNS components per layer")
    p.add_argument("--adapt-layers", type=int, metavar="N",
                   help="adapt only the first N BatchNorm layers (the rest keep source statistics, folded)")
    p.add_argument("--momentum", type=float, default=MOMENTUM_BATCH1)
    p.add_argument("--temperature", type=float, default=TEMPERATURE)
    p.add_argument("--state-out", type=Path, help="also write the initial components (.npz)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial components")
    custom = p.add_argument_group("custom model")
    custom.add_argument("--model", help="module:function returning the torch nn.Module")
    custom.add_argument("--weights", type=Path, help="state_dict file for it")
    custom.add_argument("--labels", type=Path, help="class names, one per line")
    custom.add_argument("--input-size", type=int, nargs=2, default=[224, 224], metavar=("H", "W"))
    custom.add_argument("--channel-order", choices=("RGB", "BGR", "GRAY"), default="RGB")
    custom.add_argument("--mean", type=float, nargs="+", default=[123.675, 116.28, 103.53])
    custom.add_argument("--std", type=float, nargs="+", default=[58.395, 57.12, 57.375])
    custom.add_argument("--resize", choices=("shorter_side", "stretch"), default="shorter_side")
    custom.add_argument("--resize-to", type=int)
    custom.add_argument("--crop", choices=("center", "none"), default="center")
    custom.add_argument("--padding", default="symmetric")
    return p


def _quiet_libraries() -> None:
    """torch.onnx, onnxscript and onnx_ir narrate every pass; the user needs our lines and real problems."""
    for name in ("torch", "onnxscript", "onnx_ir", "agent.model"):
        logging.getLogger(name).setLevel(logging.ERROR if name != "agent.model" else logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\..*")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    _quiet_libraries()
    args = parser().parse_args(argv)
    try:
        result = export(args)
    except (ExportError, ValueError, OSError) as exc:  # OSError: a dataset or file it names is missing
        print(f"tta-export: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
