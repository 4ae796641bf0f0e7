"""Camera benchmark for ImageNet-class models: real photos watched by a camera, reference ImageNet-C corruptions.

    python -m bench.camera [--layouts graph folded] [--severities 3 5] [--workers 2]
    python -m bench.camera --layouts folded --severities 3 --views 0 3 6 9 12 15 18 21 --condition-frames 160 \
        --set advanced.adaptation.folded.statistics_every=11 --name camera.cadence-11
                                       (a cadence on longer conditions: docs/decisions.md)
    python -m bench.camera --layouts folded --return-frames 120 --name camera.return
                                       (each fixed camera's condition clears: what the camera answers after)
    python -m bench.camera --layouts folded --conditions shot_noise --severities 5 --views 0 12 \
        --condition-frames 6000 --return-frames 120 --name camera.long
                                       (ten minutes at 10 frames/s: the gain to the last frame, the guard)

Views: 24 crops of 13 real photos that install offline (3 of scikit-image's, 10 of Debian's
opencv-doc), each one whose clean FP32 top-1 is confident and sensible (VIEWS; the table lists
them). Every camera first runs clean (its history: LEAD_IN frames, what an installed camera
has seen), then its conditions change; that history is run once, checkpointed as the daemon
checkpoints (components and drift state), and each condition starts from it. Streams, all
through the agent's own pipeline as the daemon builds it from the default config
(agent.pipeline.build_pipeline; LAME `auto`, gate and guard on, unadapted every 30th):
  fixed      a camera watching one view (a few pixels of shake): CONDITION_FRAMES frames per view, 24 views;
             with --return-frames R, R clean frames of the same view follow (scored apart: the first
             AFTER_RETURN frames after the condition clears, and the clean frames after those)
  pan        a camera panning over six of the photos in turn, 24 frames each
  continual  one view clean, then fog, night, contrast (severity 3), then clean, SEGMENT frames each (8 views)
Conditions: the 15 ImageNet-C corruptions of the reference implementation (PyPI imagecorruptions)
and `night` (darker and sensor noise), per severity, plus clean. Labels: the FP32 model's top-1
on the clean frame. Reported per condition and severity: unadapted (the model with its source
statistics on every frame), adapted (before LAME), answer (what the agent publishes) and the
mean adaptation strength. Writes bench/results/camera.md and camera.json (`--name`: other names).
`--set KEY=VALUE` overrides a key of the config the adapting agent runs (the values read as YAML).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from agent.config import apply_overrides, parse_config, parse_overrides
from agent.contract import read_model_info
from agent.pipeline import build_pipeline
from agent.samples import photo
from agent.sources import Frame

from .provenance import measured

RESULTS = Path(__file__).resolve().parent / "results"
OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")
SIZE = 224
FRAMES_PER_VIEW = 24  # a pan's frames per photo
VARIANTS = 4  # shaken crops per view, each corrupted on its own
LEAD_IN = 120  # clean frames a camera has run before its conditions change (the drift warm-up is 100)
CONDITION_FRAMES = 32
SEGMENT = 200
CONTINUAL_VIEWS = 8
CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
               "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
               "jpeg_compression")
CONDITIONS = CORRUPTIONS + ("night",)
CONTINUAL = (("fog", 3), ("night", 3), ("contrast", 3), ("clean", 0))
AFTER_RETURN = 30  # frames right after a condition clears, scored on their own
LONG = 1000  # conditions of at least this many frames are also reported over time
# (photo, zoom of the shorter side, centre x, centre y as fractions of the free room): clean FP32 top-1
VIEWS = {
    ("skimage:coffee", 1.0, 0.5, 0.5): "espresso", ("skimage:coffee", 0.6, 0.2, 0.2): "espresso",
    ("skimage:camera", 1.0, 0.5, 0.5): "tripod", ("skimage:camera", 0.6, 0.8, 0.8): "tripod",
    ("skimage:chelsea", 0.6, 0.2, 0.2): "Egyptian cat", ("skimage:chelsea", 0.6, 0.8, 0.8): "Egyptian cat",
    ("opencv:baboon.jpg", 1.0, 0.5, 0.5): "baboon", ("opencv:baboon.jpg", 0.6, 0.2, 0.8): "baboon",
    ("opencv:squirrel_cls.jpg", 1.0, 0.5, 0.5): "fox squirrel",
    ("opencv:squirrel_cls.jpg", 0.6, 0.5, 0.5): "fox squirrel",
    ("opencv:squirrel_cls.jpg", 0.6, 0.8, 0.2): "fox squirrel",
    ("opencv:chicky_512.png", 1.0, 0.5, 0.5): "Pekinese", ("opencv:chicky_512.png", 0.6, 0.2, 0.2): "Pekinese",
    ("opencv:fruits.jpg", 1.0, 0.5, 0.5): "lemon", ("opencv:fruits.jpg", 0.6, 0.2, 0.8): "orange",
    ("opencv:fruits.jpg", 0.6, 0.2, 0.2): "orange",
    ("opencv:board.jpg", 1.0, 0.5, 0.5): "modem",
    ("opencv:sudoku.png", 1.0, 0.5, 0.5): "crossword puzzle", ("opencv:sudoku.png", 0.6, 0.8, 0.2): "crossword puzzle",
    ("opencv:messi5.jpg", 1.0, 0.5, 0.5): "soccer ball",
    ("opencv:orange.jpg", 1.0, 0.5, 0.5): "orange", ("opencv:orange.jpg", 0.6, 0.8, 0.2): "orange",
    ("opencv:graf1.png", 0.6, 0.5, 0.5): "comic book",
    ("opencv:stuff.jpg", 0.6, 0.8, 0.2): "ping-pong ball",
}
CONTINUAL_CAMERAS = range(0, len(VIEWS), len(VIEWS) // CONTINUAL_VIEWS)
# set from the command line before the worker processes fork: the fixed views, and the adapting agent's overrides
FIXED_VIEWS = list(range(len(VIEWS)))
OVERRIDES: dict[str, object] = {}
RETURN_FRAMES = 0
PANS = ("skimage:coffee", "skimage:camera", "opencv:squirrel_cls.jpg", "opencv:chicky_512.png", "opencv:fruits.jpg",
        "opencv:sudoku.png")
NIGHT = {1: (0.6, 4.0), 2: (0.45, 7.0), 3: (0.35, 10.0), 4: (0.25, 14.0), 5: (0.18, 18.0)}  # light, noise sd


def load_photo(name: str) -> np.ndarray:
    source, file = name.split(":", 1)
    if source == "skimage":
        return photo(file)
    image = cv2.imread(str(OPENCV_DATA / file))
    if image is None:
        raise SystemExit(f"{OPENCV_DATA / file} not found: apt-get install opencv-doc")
    return image


def view_frames(image: np.ndarray, zoom: float, fx: float, fy: float, rng: np.random.Generator) -> list[np.ndarray]:
    """VARIANTS crops of one view, each shaken by up to 2% of its side."""
    h, w = image.shape[:2]
    side = int(min(h, w) * zoom)
    frames = []
    for _ in range(VARIANTS):
        shake = int(0.02 * side)
        x0 = int(np.clip((w - side) * fx + rng.integers(-shake, shake + 1), 0, w - side))
        y0 = int(np.clip((h - side) * fy + rng.integers(-shake, shake + 1), 0, h - side))
        frames.append(cv2.resize(image[y0:y0 + side, x0:x0 + side], (SIZE, SIZE), interpolation=cv2.INTER_AREA))
    return frames


def pan_frames(image: np.ndarray, frames: int = FRAMES_PER_VIEW) -> list[np.ndarray]:
    """A slow pan and zoom (0.8 -> 0.6 of the shorter side) from the top left to the bottom right."""
    h, w = image.shape[:2]
    out = []
    for i in range(frames):
        t = i / (frames - 1)
        side = int(min(h, w) * (0.8 - 0.2 * t))
        x0, y0 = int((w - side) * t), int((h - side) * (0.3 + 0.4 * t))
        out.append(cv2.resize(image[y0:y0 + side, x0:x0 + side], (SIZE, SIZE), interpolation=cv2.INTER_AREA))
    return out


def _reference():
    """imagecorruptions under numpy 2 and today's scikit-image (it was written for numpy 1 and multichannel=)."""
    np.float_ = np.float64
    import imagecorruptions.corruptions as reference
    from skimage.filters import gaussian

    def gaussian_multichannel(x, sigma=1, multichannel=None, **kw):
        if multichannel is not None:
            kw.setdefault("channel_axis", -1 if multichannel else None)
        return gaussian(x, sigma=sigma, **kw)

    reference.gaussian = gaussian_multichannel
    from skimage import util

    unseeded = getattr(util.random_noise, "unseeded", util.random_noise)

    def random_noise(image, rng=None, **kw):
        # impulse noise draws from a fresh unseeded generator: seeded from numpy's global one, a run repeats
        return unseeded(image, rng=np.random.randint(2 ** 31) if rng is None else rng, **kw)

    random_noise.unseeded = unseeded
    util.random_noise = random_noise
    from imagecorruptions import corrupt

    return corrupt


def apply(frame_bgr: np.ndarray, condition: str, severity: int, seed: int) -> np.ndarray:
    """One camera frame under a condition: the reference ImageNet-C corruption, or night."""
    if condition == "clean":
        return frame_bgr
    np.random.seed(seed)  # imagecorruptions draws from numpy's global generator
    if condition == "night":
        light, noise = NIGHT[severity]
        x = frame_bgr.astype(np.float32) * light + np.random.normal(0, noise, frame_bgr.shape)
        return np.clip(x, 0, 255).astype(np.uint8)
    rgb = np.ascontiguousarray(frame_bgr[:, :, ::-1])
    out = _reference()(rgb, corruption_name=condition, severity=severity)
    return np.ascontiguousarray(np.asarray(out, np.uint8)[:, :, ::-1])


def clean_scenes(seed: int = 0) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    photos = {name: load_photo(name) for name in {v[0] for v in VIEWS} | set(PANS)}
    fixed = [f for (name, zoom, fx, fy) in VIEWS for f in view_frames(photos[name], zoom, fx, fy, rng)]
    pans = [f for name in PANS for f in pan_frames(photos[name])]
    return {"fixed": fixed, "pan": pans}


def view_stream(view: int, condition: str, severity: int, frames: int, scenes: dict, seed: int
                ) -> list[tuple[np.ndarray, int]]:
    """(frame, index of its clean frame in scenes["fixed"]) of a camera watching one view: its VARIANTS
    shaken frames in turn, each corrupted once (glass blur takes half a second a frame)."""
    indices = [view * VARIANTS + k for k in range(VARIANTS)]
    corrupted = [apply(scenes["fixed"][j], condition, severity, seed + k) for k, j in enumerate(indices)]
    return [(corrupted[i % VARIANTS], indices[i % VARIANTS]) for i in range(frames)]


def pan_stream(condition: str, severity: int, scenes: dict) -> list[tuple[np.ndarray, int]]:
    return [(apply(f, condition, severity, 1000 * severity + i), i) for i, f in enumerate(scenes["pan"])]


def continual(view: int, scenes: dict) -> list[tuple[np.ndarray, int]]:
    """CONTINUAL's segments in turn on one view, SEGMENT frames each."""
    frames = []
    for s, (condition, severity) in enumerate(CONTINUAL):
        frames += view_stream(view, condition, severity or 1, SEGMENT, scenes, 7919 * (s + 1))
    return frames


def labels_fp32(fp32: Path, scenes: dict) -> dict[str, np.ndarray]:
    """The FP32 model's top-1 on every clean frame (the graph at strength 0: the source statistics)."""
    config = _config(fp32, adaptation={"mode": "off"}, lame={"mode": "off"},
                     advanced={"adaptation": {"gate": {"enabled": False}}})
    pipeline = build_pipeline(config)
    return {kind: np.array([int(np.argmax(pipeline.process(Frame(i, f, 0.0)).probs)) for i, f in enumerate(frames)])
            for kind, frames in scenes.items()}


def _config(model: Path, advanced: dict | None = None, overrides: dict | None = None, **sections):
    return parse_config(apply_overrides(
        {"model": {"path": str(model), "device": "cpu"}, "cameras": [{"name": "bench", "source": "0"}],
         "advanced": {"model": {"backend": "onnxruntime", "threads": 1}, **(advanced or {})}, **sections},
        overrides or {}))


def history(task) -> tuple[str, str]:
    """A camera's clean history through the default agent, checkpointed: (components file, drift state)."""
    model, camera, folder = task
    scenes = clean_scenes()
    frames = pan_stream("clean", 0, scenes) if camera == "pan" else \
        view_stream(int(camera), "clean", 0, LEAD_IN, scenes, 0)
    agent = build_pipeline(_config(model, overrides=OVERRIDES))
    for i, (image, _) in enumerate(frames):
        agent.process(Frame(i, image, 0.0))
    path = Path(folder) / f"{model.stem}.{camera}.npz"
    agent.session.save(path)
    return str(path), json.dumps(agent.drift.state())


def _resumed(model: Path, checkpoint: tuple[str, str]):
    agent = build_pipeline(_config(model, overrides=OVERRIDES))
    agent.session.load(checkpoint[0])
    agent.drift.restore(json.loads(checkpoint[1]))
    return agent


def run_task(task) -> dict:
    """One condition on every camera, each resumed from its clean history; per-frame correctness."""
    model, kind, condition, severity, labels, checkpoints = task
    scenes = clean_scenes()
    if kind == "continual":
        cameras = [(str(v), continual(v, scenes)) for v in CONTINUAL_CAMERAS]
    elif kind == "pan":
        cameras = [("pan", pan_stream(condition, severity, scenes))]
    else:
        back = RETURN_FRAMES if condition != "clean" else 0
        cameras = [(str(v), view_stream(v, condition, severity, CONDITION_FRAMES, scenes, 1000 * severity)
                    + view_stream(v, "clean", 0, back, scenes, 0)) for v in FIXED_VIEWS]
    truth = labels["pan" if kind == "pan" else "fixed"]
    correct = {"unadapted": [], "adapted": [], "answer": []}
    phase = []  # "during" the condition, "return" (its first AFTER_RETURN clean frames after), "after"
    strength = []
    fired = 0
    for camera, frames in cameras:
        unadapted = build_pipeline(_config(model, adaptation={"mode": "off"}, lame={"mode": "off"}))
        agent = _resumed(model, checkpoints[camera])
        start = LEAD_IN if camera != "pan" else len(scenes["pan"])
        for i, (image, clean) in enumerate(frames):
            frame = Frame(start + i, image, 0.0)
            raw, result = unadapted.process(frame), agent.process(frame)
            y = truth[clean]
            correct["unadapted"].append(bool(np.argmax(raw.probs) == y))
            correct["adapted"].append(bool(np.argmax(result.adapted) == y))
            correct["answer"].append(bool(np.argmax(result.probs) == y))
            strength.append(result.strength)
            after = i - CONDITION_FRAMES if kind == "fixed" else -1
            phase.append("during" if after < 0 else "return" if after < AFTER_RETURN else "after")
        fired += agent.guard.fired if agent.guard else 0
    return {"model": model.name, "kind": kind, "condition": condition, "severity": severity, "correct": correct,
            "strength": strength, "phase": phase, "guard_fired": fired}


def _mean(values) -> float:
    return 100 * float(np.mean(values)) if len(values) else float("nan")


def _row(runs: list[dict], condition: str, severity: int, phase: str = "during") -> tuple[dict, float]:
    """Accuracy of each answer and mean strength over the fixed and pan streams of one condition, on the frames
    of one phase (pans are all "during")."""
    rs = [r for r in runs if r["condition"] == condition and r["severity"] == severity and r["kind"] != "continual"]

    def picked(r, values):
        phases = r.get("phase") or ["during"] * len(values)
        return [v for v, p in zip(values, phases) if p == phase or (r["kind"] == "pan" and phase == "during")]

    acc = {m: _mean(sum((picked(r, r["correct"][m]) for r in rs), [])) for m in ("unadapted", "adapted", "answer")}
    strengths = sum((picked(r, r["strength"]) for r in rs), [])
    return acc, float(np.mean(strengths)) if strengths else float("nan")


def _fired(runs: list[dict], condition: str, severity: int) -> int:
    return sum(r.get("guard_fired", 0) for r in runs if r["condition"] == condition and r["severity"] == severity)


def markdown(runs: list[dict], layouts: dict[str, Path], severities: list[int], minutes: float) -> str:
    lines = ["# Camera benchmark: EfficientNet-Lite0 INT8, real photos, ImageNet-C", "",
             f"{measured('bench.camera', minutes)} Default agent config (`advanced.adaptation.method: auto`, "
             f"`lame: auto`, guard on). Every camera first ran {LEAD_IN} clean frames (a pan: one clean pass), "
             "checkpointed; each "
             "condition resumes from that. Labels: the FP32 model's top-1 on the clean frame. Accuracy in %, over the "
             f"{len(FIXED_VIEWS)} fixed cameras ({CONDITION_FRAMES} frames each) and the panning one "
             f"({len(PANS) * FRAMES_PER_VIEW} frames) in each condition; strength: the mean adaptation strength "
             "(0: the unadapted model; the panning camera's is 0 throughout).", ""]
    for layout in layouts:
        mine = [r for r in runs if r["layout"] == layout]
        lines += [f"## {layout} layout", "",
                  "| condition | severity | unadapted | adapted | answer | answer - unadapted | strength | guard "
                  "fired |", "|---|---|---|---|---|---|---|---|"]

        acc, strength = _row(mine, "clean", 0)
        lines.append(f"| clean | - | {acc['unadapted']:.1f} | {acc['adapted']:.1f} | {acc['answer']:.1f} | "
                     f"{acc['answer'] - acc['unadapted']:+.1f} | {strength:.2f} | {_fired(mine, 'clean', 0)} |")
        for severity in severities:
            means = []
            for condition in [c for c in CONDITIONS if any(r["condition"] == c for r in mine)]:
                acc, strength = _row(mine, condition, severity)
                if condition in CORRUPTIONS:
                    means.append(acc)
                lines.append(f"| {condition} | {severity} | {acc['unadapted']:.1f} | {acc['adapted']:.1f} | "
                             f"{acc['answer']:.1f} | {acc['answer'] - acc['unadapted']:+.1f} | {strength:.2f} | "
                             f"{_fired(mine, condition, severity)} |")
            m = {k: float(np.mean([a[k] for a in means])) for k in means[0]}
            gain = m["answer"] - m["unadapted"]
            lines.append(f"| **mean of {len(means)}** | {severity} | **{m['unadapted']:.1f}** | "
                         f"**{m['adapted']:.1f}** | **{m['answer']:.1f}** | **{gain:+.1f}** | | |")
        if CONDITION_FRAMES >= LONG:
            lines += _over_time(mine)
        if RETURN_FRAMES:
            lines += _return_table(mine, severities)
        cont = next((r for r in mine if r["kind"] == "continual"), None)
        if cont:
            lines += ["", f"Continual streams ({CONTINUAL_VIEWS} cameras, each resumed from its clean history; "
                      f"{SEGMENT} frames a segment, each scored after its first 100 frames):", "",
                      "| segment | unadapted | adapted | answer | strength |", "|---|---|---|---|---|"]
            per_camera = len(CONTINUAL) * SEGMENT
            for s, (condition, severity) in enumerate(CONTINUAL):
                idx = np.concatenate([np.arange(c * per_camera + s * SEGMENT + 100, c * per_camera + (s + 1) * SEGMENT)
                                      for c in range(len(cont["strength"]) // per_camera)])
                acc = {m: _mean(np.asarray(cont["correct"][m])[idx]) for m in ("unadapted", "adapted", "answer")}
                name = condition + (f" s{severity}" if severity else "")
                lines.append(f"| {s + 1}. {name} | {acc['unadapted']:.1f} | {acc['adapted']:.1f} | "
                             f"{acc['answer']:.1f} | {np.mean(np.asarray(cont['strength'])[idx]):.2f} |")
        lines.append("")
    lines += ["## Views", "", "| photo | crop (zoom, x, y) | clean FP32 top-1 |", "|---|---|---|"]
    lines += [f"| {name} | {zoom}, {fx}, {fy} | {label} |" for (name, zoom, fx, fy), label in VIEWS.items()]
    lines += ["", f"Pans: {', '.join(PANS)}.", ""]
    return "\n".join(lines)


def _over_time(runs: list[dict]) -> list[str]:
    """A long condition in sixths, per fixed camera: does the gain last to its last frame?"""
    lines = ["", f"Over each condition ({CONDITION_FRAMES} frames, in sixths), per fixed camera: unadapted / answer "
             "accuracy and mean strength.", "",
             "| condition | severity | camera | " + " | ".join(f"sixth {k + 1}" for k in range(6)) + " |",
             "|---|---|---|" + "---|" * 6]
    for r in runs:
        if r["kind"] != "fixed" or r["condition"] == "clean":
            continue
        per = len(r["strength"]) // len(FIXED_VIEWS)
        for c, view in enumerate(FIXED_VIEWS):
            cells = []
            for part in np.array_split(np.arange(c * per, c * per + CONDITION_FRAMES), 6):
                u, a = (100 * np.mean(np.asarray(r["correct"][m])[part]) for m in ("unadapted", "answer"))
                cells.append(f"{u:.0f} / {a:.0f} ({np.mean(np.asarray(r['strength'])[part]):.2f})")
            lines.append(f"| {r['condition']} | {r['severity']} | {view} | " + " | ".join(cells) + " |")
    return lines


def _return_table(runs: list[dict], severities: list[int]) -> list[str]:
    """The fixed cameras once each condition has cleared: its first AFTER_RETURN clean frames, then the rest."""
    lines = ["", f"After the condition clears (fixed cameras, {RETURN_FRAMES} clean frames each; the first "
             f"{AFTER_RETURN} are the return, the rest clean after it): accuracy of the answer and of the unadapted "
             "model, and the answer's mean strength.", "",
             "| condition | severity | return: unadapted | return: answer | difference | strength | after: unadapted "
             "| after: answer | difference |", "|---|---|---|---|---|---|---|---|---|"]
    fixed = [r for r in runs if r["kind"] == "fixed"]
    for severity in severities:
        diffs = []
        for condition in [c for c in CONDITIONS if any(r["condition"] == c for r in fixed)]:
            back, strength = _row(fixed, condition, severity, "return")
            after, _ = _row(fixed, condition, severity, "after")
            diffs.append((back["answer"] - back["unadapted"], after["answer"] - after["unadapted"]))
            lines.append(f"| {condition} | {severity} | {back['unadapted']:.1f} | {back['answer']:.1f} | "
                         f"{diffs[-1][0]:+.1f} | {strength:.2f} | {after['unadapted']:.1f} | {after['answer']:.1f} | "
                         f"{diffs[-1][1]:+.1f} |")
        worst = (min(d[0] for d in diffs), min(d[1] for d in diffs))
        lines.append(f"| **mean of {len(diffs)}** (worst) | {severity} | | | **{np.mean([d[0] for d in diffs]):+.1f}** "
                     f"({worst[0]:+.1f}) | | | | **{np.mean([d[1] for d in diffs]):+.1f}** ({worst[1]:+.1f}) |")
    return lines


def main() -> None:
    global CONDITION_FRAMES, FIXED_VIEWS, OVERRIDES, RETURN_FRAMES
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("models"),
                        help="folder with efficientnet_lite0.onnx, efficientnet_lite0.fp32.onnx and "
                             "efficientnet_lite0_folded.onnx (tta-export efficientnet-lite0 [--layout folded])")
    parser.add_argument("--layouts", nargs="+", choices=("folded", "graph"), default=["folded", "graph"])
    parser.add_argument("--severities", type=int, nargs="+", default=[3, 5], choices=range(1, 6))
    parser.add_argument("--conditions", nargs="+", choices=CONDITIONS, default=list(CONDITIONS))
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--views", type=int, nargs="+", choices=range(len(VIEWS)), default=FIXED_VIEWS,
                        help="the fixed cameras (indices into VIEWS)")
    parser.add_argument("--condition-frames", type=int, default=CONDITION_FRAMES, help="frames per fixed camera")
    parser.add_argument("--return-frames", type=int, default=0,
                        help="clean frames after each fixed camera's condition, scored apart")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the adapting agent's config")
    parser.add_argument("--name", default="camera", help="results file stem")
    args = parser.parse_args()
    CONDITION_FRAMES, FIXED_VIEWS, OVERRIDES = args.condition_frames, args.views, parse_overrides(args.set)
    RETURN_FRAMES = args.return_frames
    files = {"graph": args.models / "efficientnet_lite0.onnx", "folded": args.models / "efficientnet_lite0_folded.onnx"}
    layouts = {k: files[k] for k in args.layouts}
    for path in [*layouts.values(), args.models / "efficientnet_lite0.fp32.onnx"]:
        read_model_info(path)  # a clear error before minutes of work
    started = time.time()
    labels = labels_fp32(args.models / "efficientnet_lite0.fp32.onnx", clean_scenes())
    folder = tempfile.mkdtemp(prefix="bench-camera-")
    cameras = [str(v) for v in sorted(set(FIXED_VIEWS) | set(CONTINUAL_CAMERAS))] + ["pan"]
    with ProcessPoolExecutor(args.workers) as pool:
        jobs = [(model, camera, folder) for model in layouts.values() for camera in cameras]
        done = list(pool.map(history, jobs))
    checkpoints = {layout: {camera: done[i * len(cameras) + j] for j, camera in enumerate(cameras)}
                   for i, layout in enumerate(layouts)}
    print(f"clean histories of {len(cameras)} cameras checkpointed ({time.time() - started:.0f} s)", flush=True)
    tasks, keys = [], []
    for layout, model in layouts.items():
        for kind in ("fixed", "pan"):
            tasks.append((model, kind, "clean", 0, labels, checkpoints[layout]))
            keys.append(layout)
            for severity in args.severities:
                for condition in args.conditions:
                    tasks.append((model, kind, condition, severity, labels, checkpoints[layout]))
                    keys.append(layout)
        tasks.append((model, "continual", "continual", 0, labels, checkpoints[layout]))
        keys.append(layout)
    runs = []
    RESULTS.mkdir(exist_ok=True)
    with ProcessPoolExecutor(args.workers) as pool:
        for i, (layout, result) in enumerate(zip(keys, pool.map(run_task, tasks))):
            runs.append({"layout": layout, **result})
            (RESULTS / f"{args.name}.json").write_text(json.dumps(runs))  # a run cut short keeps what it measured
            print(f"{i + 1}/{len(tasks)} {layout} {result['kind']} {result['condition']} s{result['severity']}: "
                  f"unadapted {_mean(result['correct']['unadapted']):.1f} "
                  f"answer {_mean(result['correct']['answer']):.1f} strength {np.mean(result['strength']):.2f} "
                  f"({time.time() - started:.0f} s)", flush=True)
    table = markdown(runs, layouts, args.severities, (time.time() - started) / 60)
    (RESULTS / f"{args.name}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
