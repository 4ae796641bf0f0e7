"""Adaptation quality at batch size 1: Fashion-MNIST-C streams through the agent's real runtime.

    python -m bench.quality --quick        # minutes: 5 corruptions, 500 frames, severity 5, 1 seed
    python -m bench.quality                # 15 corruptions, 2000 frames, severities 3 and 5, 3 seeds
    python -m bench.quality --sweep        # the robust mode's options, one at a time (results/sweep.md)
    python -m bench.quality --lame-sweep   # LAME window / affinity / neighbours (results/lame_sweep.md)

Every method is the pipeline a camera runs (agent.pipeline.build_pipeline) under a config, on the
exported .onnx files through onnxruntime, FP32 and INT8, as users run them:
    unadapted          adaptation off, LAME off: the model on its source statistics
    faithful           the published UnMix-TNS (K=16, noisy init, momentum 1-(0.9)^(1/64)), gate off
    robust             the single-instance mode (exporters/unmix.py RobustUnMixTNS2d), gate off: full strength
    LAME               adaptation off, LAME on every frame (16-frame window, kNN 3)
    adapted            the default config's adapted output (gate, guard, unadapted pass every 30th frame)
    answer             what the agent answers under the default config (LAME auto on the adapted output)
Writes bench/results/quality.json, quality.md and quality_<stream>.png (error over time).
Also checks EfficientNet-Lite0 on an ordinary stream of scikit-image photos: how often the
adapted model agrees with the unadapted one, from the first frame on.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from agent.config import parse_config
from agent.lame import Lame
from agent.model.graph_session import GraphSession
from agent.pipeline import build_pipeline
from agent.preprocess import Preprocessor
from agent.sources import Frame

from .corruptions import CORRUPTIONS, corrupt
from .provenance import commit, machine
from .streams import ORDERS

RESULTS = Path(__file__).with_name("results")
METHODS = ("unadapted", "faithful", "robust", "LAME", "adapted", "answer")
STREAMS = ("iid", "dirichlet", "video", "continual", "mixed", "clean")


def export_models(folder: Path, layout: str = "graph") -> dict[str, Path]:
    """FP32 and INT8 Fashion-MNIST models in both modes, exported by the real exporter; the robust
    mode in the given layout (faithful runs in the graph layout only)."""
    from exporters.cli import main as export

    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for mode in ("robust", "faithful"):
        chosen = layout if mode == "robust" else "graph"
        out = folder / (f"fashion_mnist.{mode}.onnx" if chosen == "graph" else f"fashion_mnist.{mode}.{chosen}.onnx")
        if not out.exists():
            assert export(["fashion-mnist", "--mode", mode, "--layout", chosen, "--out", str(out),
                           "--calib-frames", "500", "--holdout-frames", "1000"]) == 0
        paths[f"{mode}/int8"] = out
        paths[f"{mode}/fp32"] = out.with_name(out.stem + ".fp32.onnx")
    return paths


def build_streams(images, labels, corruptions, frames, severity, seed) -> list[dict]:
    """Per-corruption iid/dirichlet/video streams, one continual and one mixed stream."""
    rng = np.random.default_rng(seed)
    subset = rng.choice(len(labels), frames, replace=False)
    corrupted = {c: corrupt(images[subset], c, severity, seed) for c in corruptions}
    y = labels[subset]
    streams = []
    for c in corruptions:
        for kind, order_fn in ORDERS.items():
            order = order_fn(y, np.random.default_rng(seed + 1))
            streams.append({"kind": kind, "corruption": c, "x": corrupted[c][order], "y": y[order], "reset": True})
    continual_x, continual_y = [], []
    for c in corruptions:
        order = rng.permutation(frames)
        continual_x.append(corrupted[c][order])
        continual_y.append(y[order])
    streams.append({"kind": "continual", "corruption": "all", "x": np.concatenate(continual_x),
                    "y": np.concatenate(continual_y), "reset": True})
    which = rng.integers(len(corruptions), size=frames * len(corruptions))
    index = rng.integers(frames, size=frames * len(corruptions))
    mixed_x = np.stack([corrupted[corruptions[w]][i] for w, i in zip(which, index)])
    streams.append({"kind": "mixed", "corruption": "all", "x": mixed_x, "y": y[index], "reset": True})
    streams.append({"kind": "clean", "corruption": "none", "x": images[subset], "y": y, "reset": True})
    return streams


def _pipeline(path: Path, method: str = "auto", mode: str = "on", lame: str = "auto", **adaptation):
    """The pipeline a camera runs under the default config but for these (`adaptation`: keys of
    advanced.adaptation), on one thread."""
    config = {"model": {"path": str(path), "device": "cpu"}, "cameras": [{"name": "bench", "source": "0"}],
              "adaptation": {"mode": mode}, "lame": {"mode": lame},
              "advanced": {"model": {"backend": "onnxruntime", "threads": 1},
                           "adaptation": {**adaptation, "method": method}}}
    return build_pipeline(parse_config(config))


UNGATED = {"gate": {"enabled": False}, "guard": {"enabled": False}, "raw_every": 0}


def run_stream(task) -> dict:
    """Every method on one stream at one precision; returns per-frame correctness and the default's strength."""
    paths, precision, stream, method = task
    robust_path = paths[f"robust/{precision}"]
    unadapted = _pipeline(robust_path, mode="off", lame="on")  # LAME alone rides on it
    robust = _pipeline(robust_path, "unmix", lame="off", **UNGATED)
    faithful = _pipeline(paths[f"faithful/{precision}"], "unmix", lame="off", **UNGATED)
    default = _pipeline(robust_path, method)
    correct = {m: np.zeros(len(stream["y"]), bool) for m in METHODS}
    strength = np.zeros(len(stream["y"]))
    for i, (image, label) in enumerate(zip(stream["x"], stream["y"])):
        frame = Frame(i, image, 0.0)
        raw, d = unadapted.process(frame), default.process(frame)
        correct["unadapted"][i] = np.argmax(raw.adapted) == label
        correct["LAME"][i] = np.argmax(raw.probs) == label
        correct["robust"][i] = np.argmax(robust.process(frame).adapted) == label
        correct["faithful"][i] = np.argmax(faithful.process(frame).adapted) == label
        correct["adapted"][i] = np.argmax(d.adapted) == label
        correct["answer"][i] = np.argmax(d.probs) == label
        strength[i] = d.strength
    return {"kind": stream["kind"], "corruption": stream["corruption"], "precision": precision,
            "correct": {m: v.tolist() for m, v in correct.items()}, "strength": float(strength.mean()),
            "guard_fired": default.guard.fired if default.guard else 0}


def effnet_agreement(frames_per_photo: int = 25, layout: str = "graph", method: str = "auto") -> dict:
    """EfficientNet-Lite0 on ordinary photos: share of frames where the adapted top-1 equals the
    unadapted one, over all 12 photos and over the 3 the exporter held out of calibration (and of
    the gate's shift reference)."""
    from agent.samples import photo_stream
    from exporters.cli import main as export

    folder = RESULTS / "models"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"robust": folder / ("efficientnet_lite0.robust.onnx" if layout == "graph"
                                 else f"efficientnet_lite0.robust.{layout}.onnx"),
             "faithful": folder / "efficientnet_lite0.faithful.onnx"}
    for mode, path in paths.items():
        if not path.exists():
            assert export(["efficientnet-lite0", "--mode", mode, "--layout", layout if mode == "robust" else "graph",
                           "--out", str(path)]) == 0
    frames = [frame for _, frame in photo_stream(frames_per_photo)]
    held_out = np.array([(i // frames_per_photo) % 4 == 3 for i in range(len(frames))])  # as exporters/cli.py
    result = {}
    for name, path, learner, adaptation in (
            ("default", paths["robust"], method, {"raw_every": 1}),
            ("robust", paths["robust"], "unmix", {**UNGATED, "raw_every": 1}),
            ("faithful", paths["faithful"], "unmix", {**UNGATED, "raw_every": 1})):
        pipeline = _pipeline(path, learner, lame="off", **adaptation)
        same = np.array([np.argmax(r.adapted) == np.argmax(r.raw)
                         for r in (pipeline.process(Frame(i, f, 0.0)) for i, f in enumerate(frames))])
        result[name] = {"frames": len(same), "agreement": float(same.mean()), "first_frame": bool(same[0]),
                          "agreement_held_out": float(same[held_out].mean())}
    return result


def summarize(runs: list[dict]) -> dict:
    """Mean error (%) per stream kind, method, precision and severity, with the spread over seeds."""
    table: dict = {}
    for run in runs:
        for method, correct in run["correct"].items():
            key = (run["severity"], run["kind"], run["precision"], method)
            table.setdefault(key, {}).setdefault(run["seed"], []).append(100 * (1 - np.mean(correct)))
    summary = {}
    for (severity, kind, precision, method), by_seed in table.items():
        per_seed = [np.mean(v) for v in by_seed.values()]  # mean over corruptions, per seed
        summary[f"{severity}/{kind}/{precision}/{method}"] = {"error": float(np.mean(per_seed)),
                                                              "std": float(np.std(per_seed)), "seeds": len(per_seed)}
    return summary


def markdown(summary: dict, severities, precisions) -> str:
    lines = []
    for severity in severities:
        for precision in precisions:
            lines.append(f"\n**Severity {severity}, {precision.upper()}: error % (mean over corruptions"
                         " +- std over seeds)**\n")
            lines.append("| method | " + " | ".join(STREAMS) + " |")
            lines.append("|---|" + "---|" * len(STREAMS))
            for method in METHODS:
                cells = []
                for kind in STREAMS:
                    s = summary.get(f"{severity}/{kind}/{precision}/{method}")
                    cells.append(f"{s['error']:.1f} +- {s['std']:.1f}" if s else "-")
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: list[dict], severity: int, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for kind in STREAMS:
        run = next((r for r in runs if r["kind"] == kind and r["precision"] == "int8" and r["severity"] == severity
                    and r["seed"] == 0), None)
        if run is None:
            continue
        fig, ax = plt.subplots(figsize=(9, 3.2))
        window = 100
        for method, correct in run["correct"].items():
            err = 100 * (1 - np.convolve(np.asarray(correct, float), np.ones(window) / window, mode="valid"))
            ax.plot(err, label=f"{method} ({100 * (1 - np.mean(correct)):.1f}%)", lw=1)
        ax.set_title(f"{kind} stream, {run['corruption']}, severity {severity}, INT8")
        ax.set_xlabel("frame")
        ax.set_ylabel(f"error, {window}-frame mean (%)")
        ax.legend(fontsize=7, ncol=3)
        fig.tight_layout()
        path = folder / f"quality_{kind}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


SWEEP = [
    ("default", {}, None),
    ("K=4", {"components": 4}, None), ("K=32", {"components": 32}, None),
    ("temperature 0.02", {"temperature": 0.02}, None), ("temperature 0.2", {"temperature": 0.2}, None),
    ("memory 200 frames", {"options": {"decay": 1 / 200}}, None),
    ("memory 2000 frames", {"options": {"decay": 1 / 2000}}, None),
    ("instance weight 0", {"options": {"instance": 0.0}}, None),
    ("instance weight 0.1", {"options": {"instance": 0.1}}, None),
    ("support 1", {"options": {"support": 1.0}}, None), ("support 16", {"options": {"support": 16.0}}, None),
    ("source prior 1", {"options": {"prior": 1.0}}, None), ("source prior 32", {"options": {"prior": 32.0}}, None),
    ("first 3 of 9 layers", {}, 3),
]


def _sweep_task(task) -> tuple[str, str, float]:
    name, path, stream = task
    session = GraphSession(path, threads=1)
    preprocess = Preprocessor(session.info.preprocess)
    strength = float(name != "unadapted")
    wrong = [np.argmax(session.step(preprocess(x), strength=strength).logits) != y
             for x, y in zip(stream["x"], stream["y"])]
    return name, stream["kind"], 100 * float(np.mean(wrong))


def sweep(workers: int, frames: int = 400) -> str:
    """Each robust option moved alone (FP32, severity 5, 8 corruptions, iid/dirichlet/video)."""
    import json as _json

    from agent.contract import Preprocess
    from exporters.export import adaptation_spec, build_adaptive, save_atomic
    from exporters.models import fashion_mnist as fm
    from exporters.unmix import batchnorm_layers

    folder = RESULTS / "sweep"
    folder.mkdir(parents=True, exist_ok=True)
    model = fm.pretrained()
    paths = {}
    for name, kwargs, first in SWEEP:
        layers = list(batchnorm_layers(model))[:first] if first else None
        spec = adaptation_spec(model, mode="robust", layers=layers, **kwargs)
        onnx_model = build_adaptive(model, (1, 1, 28, 28), spec, fm.LABELS,
                                    Preprocess.from_json(_json.dumps(fm.PREPROCESS)))
        paths[name] = save_atomic(onnx_model, folder / f"{name.replace(' ', '_')}.onnx")
    paths = {"unadapted": paths["default"], **paths}
    images, labels = fm.load_split("t10k")
    corruptions = ["gaussian_noise", "shot_noise", "contrast", "fog", "motion_blur", "pixelate", "brightness",
                   "jpeg_compression"]
    streams = [s for s in build_streams(images, labels, corruptions, frames, 5, 0) if s["kind"] in ORDERS]
    errors: dict = {}
    with ProcessPoolExecutor(workers) as pool:
        tasks = [(name, path, s) for name, path in paths.items() for s in streams]
        for name, kind, err in pool.map(_sweep_task, tasks):
            errors.setdefault(name, {}).setdefault(kind, []).append(err)
    lines = ["| robust variant (FP32, severity 5) | iid | dirichlet | video |", "|---|---|---|---|"]
    for name in paths:
        lines.append(f"| {name} | " + " | ".join(f"{np.mean(errors[name][k]):.1f}" for k in ORDERS) + " |")
    table = "\n".join(lines)
    (RESULTS / "sweep.md").write_text(table + "\n")
    return table


class _Recorder:
    """Takes LAME's place in a pipeline and keeps what LAME would be given."""

    def __init__(self):
        self.rows: list[tuple[np.ndarray, np.ndarray]] = []

    def update(self, features: np.ndarray, probs: np.ndarray) -> np.ndarray:
        self.rows.append((features, probs))
        return probs

    def reset(self) -> None:
        self.rows.clear()


def _lame_sweep_task(task) -> tuple[str, dict]:
    """Gated and unadapted outputs of one stream, then every LAME variant over them (LAME does not
    feed back into adaptation, so the outputs are computed once)."""
    path, stream = task
    errors = {}
    for name, mode in (("adapted", "on"), ("unadapted", "off")):
        pipeline = _pipeline(path, mode=mode, lame="on", raw_every=0)
        pipeline.lame = recorder = _Recorder()
        for i, x in enumerate(stream["x"]):
            pipeline.process(Frame(i, x, 0.0))
        rows, y = recorder.rows, stream["y"]
        errors[(name, "none")] = 100 * float(np.mean([np.argmax(p) != t for (_, p), t in zip(rows, y)]))
        for window, kind, k in LAME_VARIANTS:
            lame = Lame(window, kind, k)
            wrong = [np.argmax(lame.update(f, p)) != t for (f, p), t in zip(rows, y)]
            errors[(name, f"window {window}, {kind} {k}")] = 100 * float(np.mean(wrong))
    return stream["kind"], errors


LAME_VARIANTS = [(w, kind, k) for w in (16, 32, 64) for kind in ("knn", "rbf") for k in (1, 3, 5)]


def lame_sweep(workers: int, frames: int = 300) -> str:
    """LAME's options on the default adapted and the unadapted INT8 outputs (severity 5, 5 corruptions)."""
    from exporters.models.fashion_mnist import load_split

    paths = export_models(RESULTS / "models")
    images, labels = load_split("t10k")
    corruptions = ["gaussian_noise", "defocus_blur", "fog", "contrast", "jpeg_compression"]
    streams = [s for s in build_streams(images, labels, corruptions, frames, 5, 0) if s["kind"] in ORDERS]
    table: dict = {}
    with ProcessPoolExecutor(workers) as pool:
        for kind, errors in pool.map(_lame_sweep_task, [(paths["robust/int8"], s) for s in streams]):
            for key, err in errors.items():
                table.setdefault(key, {}).setdefault(kind, []).append(err)
    lines = ["| outputs | LAME | iid | dirichlet | video |", "|---|---|---|---|---|"]
    for (name, variant), by_kind in table.items():
        lines.append(f"| {name} | {variant} | " + " | ".join(f"{np.mean(by_kind[k]):.1f}" for k in ORDERS) + " |")
    text = "\n".join(lines)
    (RESULTS / "lame_sweep.md").write_text(text + "\n")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--frames", type=int)
    parser.add_argument("--seeds", type=int)
    parser.add_argument("--severities", type=int, nargs="+")
    parser.add_argument("--corruptions", nargs="+")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--layout", choices=("graph", "folded"), default="graph",
                        help="the robust mode's model layout (tta-export --layout)")
    parser.add_argument("--method", choices=("auto", "anchor", "unmix"), default="auto",
                        help="the default config's advanced.adaptation.method")
    parser.add_argument("--sweep", action="store_true", help="the robust mode's options, one at a time")
    parser.add_argument("--lame-sweep", action="store_true", help="LAME's window, affinity and neighbours")
    args = parser.parse_args()
    if args.sweep:
        print(sweep(args.workers))
        return
    if args.lame_sweep:
        RESULTS.mkdir(exist_ok=True)
        print(lame_sweep(args.workers))
        return
    quick = args.quick
    frames = args.frames or (500 if quick else 2000)
    seeds = args.seeds or (1 if quick else 3)
    severities = args.severities or ([5] if quick else [5, 3])
    corruptions = args.corruptions or (["gaussian_noise", "defocus_blur", "fog", "contrast", "jpeg_compression"]
                                       if quick else list(CORRUPTIONS))
    RESULTS.mkdir(exist_ok=True)
    paths = export_models(RESULTS / "models", args.layout)
    from exporters.models.fashion_mnist import load_split

    images, labels = load_split("t10k")
    runs = []
    started, revision = time.time(), commit()  # the commit measured, even if HEAD moves meanwhile
    with ProcessPoolExecutor(args.workers) as pool:
        for severity in severities:
            for seed in range(seeds):
                streams = build_streams(images, labels, corruptions, frames, severity, seed)
                tasks = [(paths, precision, s, args.method) for s in streams for precision in ("int8", "fp32")]
                for i, result in enumerate(pool.map(run_stream, tasks)):
                    runs.append({**result, "severity": severity, "seed": seed})
                    print(f"severity {severity} seed {seed}: {i + 1}/{len(tasks)} streams "
                          f"({time.time() - started:.0f} s)", flush=True)
    summary = summarize(runs)
    effnet = effnet_agreement(10 if quick else 25, args.layout, args.method)
    strengths = {kind: float(np.mean([r["strength"] for r in runs if r["kind"] == kind])) for kind in STREAMS}
    fired = {kind: int(sum(r["guard_fired"] for r in runs if r["kind"] == kind)) for kind in STREAMS}
    report = {"config": {"layout": args.layout, "method": args.method, "frames": frames, "seeds": seeds,
                         "severities": severities, "corruptions": corruptions},
              "summary": summary, "efficientnet_ordinary_stream": effnet, "gate_strength": strengths,
              "guard_fired": fired,
              "seconds": round(time.time() - started)}
    suffix = "" if args.layout == "graph" else f".{args.layout}"
    suffix += "" if args.method == "auto" else f".{args.method}"
    (RESULTS / f"quality{suffix}.json").write_text(json.dumps(report, indent=1))
    table = markdown(summary, severities, ("int8", "fp32"))
    effnet_line = "\n".join(
        [f"\nEfficientNet-Lite0 INT8 on an ordinary stream of {effnet['default']['frames']} photo frames, top-1 "
         "agreement of the adapted with the unadapted model:"] +
        [f"- {method}: {100 * r['agreement']:.1f}% (held-out photos {100 * r['agreement_held_out']:.1f}%; first frame "
         f"{'agrees' if r['first_frame'] else 'differs'})" for method, r in effnet.items()]) + "\n"
    effnet_line += "\nMean adaptation strength of the default per stream (0: unadapted, 1: full): " + ", ".join(
        f"{kind} {v:.2f}" for kind, v in strengths.items()) + "\n"
    effnet_line += f"\nCollapse guard firings (all streams of each kind, INT8 and FP32): {fired}\n"
    command = "python -m bench.quality " + " ".join(sys.argv[1:])
    header = (f"# Adaptation quality: Fashion-MNIST-C streams\n\n`{command.strip()}` on {machine()}, "
              f"commit {revision}, {time.strftime('%Y-%m-%d')}, {(time.time() - started) / 60:.0f} min. "
              f"Layout {args.layout}, advanced.adaptation.method {args.method}; every other key at its default. "
              "Labels: the dataset's.\n")
    (RESULTS / f"quality{suffix}.md").write_text(header + table + "\n" + effnet_line)
    print(table)
    print(effnet_line)
    for path in plot(runs, severities[0], RESULTS):
        print(f"plot: {path}")


if __name__ == "__main__":
    main()
