"""Adaptation on real footage: a fixed indoor camera with people walking through it, conditions coming on and clearing.

    python -m bench.footage [--models models] [--severities 3 5] [--conditions ...] [--workers 2]

Footage: OpenCV's vtest.avi (Debian `opencv-doc`, examples data folder; 795 frames at 10 frames/s), at
320x240. Each stream is frames 0 to 599 in order, people walking throughout: LEAD clean frames (the camera's
history; the drift warm-up is 100), CONDITION frames under a condition (the 14 ImageNet-C corruptions of the
reference implementation, PyPI imagecorruptions, and night: darker and sensor noise; glass blur only when named,
it takes over a second a frame to make), then TAIL clean frames. Every frame goes through the agent's pipeline
as the daemon builds it from the default config (agent.pipeline.build_pipeline) and through the unadapted model
(adaptation off, LAME off). Labels: the FP32 model's top-1 on the clean frame, so 100% means the answer the
camera would give in clean conditions. Reported per condition and severity, answer against unadapted: the
condition's frames, the first AFTER_RETURN clean frames after it, the clean frames after those; the mean
strength, the frames from the condition's start to the drift episode's, and the collapse guard's firings.
Writes bench/results/footage.md and footage.json.
"""
from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from agent.pipeline import build_pipeline
from agent.sources import Frame

from .camera import AFTER_RETURN, CORRUPTIONS, _config, apply
from .provenance import camera_arguments, camera_models, gather, measured

RESULTS = Path(__file__).resolve().parent / "results"
VIDEO = Path("/usr/share/doc/opencv-doc/examples/data/vtest.avi")
SIZE = (320, 240)
LEAD, CONDITION, TAIL = 150, 300, 150
CONDITIONS = tuple(c for c in CORRUPTIONS if c != "glass_blur") + ("night",)


def read_footage(path: Path = VIDEO, frames: int = LEAD + CONDITION + TAIL) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    out = []
    while len(out) < frames:
        ok, frame = capture.read()
        if not ok:
            break
        out.append(cv2.resize(frame, SIZE, interpolation=cv2.INTER_AREA))
    if len(out) < frames:
        raise SystemExit(f"bench.footage: error: {path} gave {len(out)} frames, {frames} needed "
                         "(apt-get install opencv-doc)")
    return out


def labels_fp32(fp32: Path, footage: list[np.ndarray]) -> list[int]:
    pipeline = build_pipeline(_config(fp32, adaptation={"mode": "off"}, lame={"mode": "off"},
                                      advanced={"adaptation": {"gate": {"enabled": False}}}))
    return [int(np.argmax(pipeline.process(Frame(i, f, 0.0)).probs)) for i, f in enumerate(footage)]


def run_task(task) -> dict:
    model, condition, severity, labels = task
    footage = read_footage()
    frames = [apply(f, condition, severity, 7919 * severity + i) if LEAD <= i < LEAD + CONDITION else f
              for i, f in enumerate(footage)]
    agent = build_pipeline(_config(model))
    unadapted = build_pipeline(_config(model, adaptation={"mode": "off"}, lame={"mode": "off"}))
    correct = {"unadapted": [], "answer": []}
    strength, starts = [], []
    for i, image in enumerate(frames):
        frame = Frame(i, image, 0.0)
        raw, result = unadapted.process(frame), agent.process(frame)
        correct["unadapted"].append(bool(np.argmax(raw.probs) == labels[i]))
        correct["answer"].append(bool(np.argmax(result.probs) == labels[i]))
        strength.append(result.strength)
        if result.drift is not None and result.drift.type == "start":
            starts.append(i)
    delay = next((i - LEAD for i in starts if i >= LEAD), None)
    return {"condition": condition, "severity": severity, "correct": correct, "strength": strength, "starts": starts,
            "start_delay": None if condition == "clean" else delay,
            "guard_fired": agent.guard.fired if agent.guard else 0}


PHASES = {"during": (LEAD, LEAD + CONDITION), "return": (LEAD + CONDITION, LEAD + CONDITION + AFTER_RETURN),
          "after": (LEAD + CONDITION + AFTER_RETURN, LEAD + CONDITION + TAIL)}


def _phase(run: dict, name: str) -> tuple[float, float, float]:
    a, b = PHASES[name]
    u, x = (100 * float(np.mean(run["correct"][m][a:b])) for m in ("unadapted", "answer"))
    return u, x, float(np.mean(run["strength"][a:b]))


def _summary(gains: np.ndarray, k: int) -> str:
    """Mean (worst) of column k, and [mean (worst)] of its comparison with the clean run when there is one."""
    text = f"**{gains[:, k].mean():+.1f}** ({gains[:, k].min():+.1f})"
    if gains.shape[1] > 3:
        text += f" [{gains[:, k + 2].mean():+.1f} ({gains[:, k + 2].min():+.1f})]"
    return text


def markdown(runs: list[dict], severities: list[int], minutes: float) -> str:
    lines = ["# Real footage: EfficientNet-Lite0 INT8 on a fixed indoor camera (vtest.avi), conditions on and off", "",
             f"{measured('bench.footage', minutes)} Default "
             f"agent config (folded layout, camera anchor, LAME auto, guard on). Frames 0-{LEAD - 1} clean, "
             f"{LEAD}-{LEAD + CONDITION - 1} under the condition, then {TAIL} clean; people walk through the hall "
             "throughout. Labels: the FP32 model's top-1 on the clean frame. Accuracy in %, unadapted / answer; "
             f"return: the first {AFTER_RETURN} clean frames after the condition, after: the clean frames after "
             "those; start: frames from the condition's first frame to the drift episode's start (- none; for the "
             "clean stream, the drift starts it raised: false starts). After a condition the answer is compared with "
             "the unadapted model and, in brackets, with the agent's own answer on the same frames of the clean "
             "stream (LAME changes a few clean answers whatever came before); the mean rows give [mean (worst)] of "
             "that comparison.", "",
             "| condition | severity | during | gain | strength | start | return | gain (vs clean run) | after | "
             "gain (vs clean run) | guard |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    clean = next((r for r in runs if r["condition"] == "clean"), None)
    if clean:
        u, x, s = _phase(clean, "during")
        lines.append(f"| clean | - | {u:.1f} / {x:.1f} | {x - u:+.1f} | {s:.2f} | {len(clean['starts'])} | | | | | "
                     f"{clean['guard_fired']} |")
    for severity in severities:
        gains = []
        for run in [r for r in runs if r["severity"] == severity and r["condition"] != "clean"]:
            cells, diffs = [], []
            for name in PHASES:
                u, x, s = _phase(run, name)
                diffs.append(x - u)
                cells.append((u, x, s))
            if clean:
                diffs += [cells[k][1] - _phase(clean, name)[1] for k, name in ((1, "return"), (2, "after"))]
            gains.append(diffs)
            (u0, x0, s0), (u1, x1, _), (u2, x2, _) = cells
            start = "-" if run["start_delay"] is None else run["start_delay"]
            versus = [f" ({d:+.1f})" for d in diffs[3:]] or ["", ""]
            lines.append(f"| {run['condition']} | {severity} | {u0:.1f} / {x0:.1f} | {diffs[0]:+.1f} | {s0:.2f} | "
                         f"{start} | {u1:.1f} / {x1:.1f} | {diffs[1]:+.1f}{versus[0]} | {u2:.1f} / {x2:.1f} | "
                         f"{diffs[2]:+.1f}{versus[1]} | {run['guard_fired']} |")
        g = np.asarray(gains)
        lines.append(f"| **mean (worst)** | {severity} | | **{g[:, 0].mean():+.1f}** ({g[:, 0].min():+.1f}) | | | | "
                     f"{_summary(g, 1)} | | {_summary(g, 2)} | |")
    return "\n".join(lines + [""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--severities", type=int, nargs="+", default=[3, 5], choices=range(1, 6))
    parser.add_argument("--conditions", nargs="+", choices=CORRUPTIONS + ("night",), default=list(CONDITIONS))
    camera_arguments(parser, "footage")
    args = parser.parse_args()
    model, fp32 = camera_models(args)
    started = time.time()
    labels = labels_fp32(fp32, read_footage())
    tasks = [(model, "clean", 0, labels)] + [(model, c, s, labels) for s in args.severities for c in args.conditions]

    def describe(run: dict) -> str:
        u, x, s = _phase(run, "during")
        return f"{run['condition']} s{run['severity']}: unadapted {u:.1f} answer {x:.1f} strength {s:.2f}"

    with ProcessPoolExecutor(args.workers) as pool:
        runs = gather(pool.map(run_task, tasks), RESULTS / f"{args.name}.json", describe)
    table = markdown(runs, args.severities, (time.time() - started) / 60)
    (RESULTS / f"{args.name}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
