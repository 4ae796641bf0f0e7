"""Drift alerts on real footage: false starts on an unchanged camera, detection and end delays of
injected condition changes, and scene switches of panning cameras.

    python -m bench.drift [--video PATH] [--out bench/results/drift.md]

Footage: OpenCV's vtest.avi (Debian `opencv-doc`, examples data folder: a fixed indoor camera,
people walking through a hall, 795 frames at 10 frames/s), at half resolution (384x288). The
clean run loops it to 10,335 frames. Each change stream starts at a different point of the loop:
300 clean frames, 300 changed frames, 300 clean again; the change is night (darkening + sensor
noise) or fog, contrast, defocus blur, gaussian noise or snow from the reference ImageNet-C
implementation (`imagecorruptions`), abrupt at severities 2-5 or faded in over 50 or 300 frames
(a crossfade from the clean frame to the corrupted one). The pan streams are agent.samples'
camera panning over scikit-image's photos, 20 to 150 frames a scene, with no change.

The detector reads the camera frame, not the model's output (agent/drift.py), so both layouts
raise the same alerts; frames go through agent.imaging.observe exactly as CameraPipeline does, with
the config's defaults (agent.config.DriftConfig).
"""
from __future__ import annotations

import argparse
import time
import warnings
from datetime import date
from pathlib import Path

import cv2
import numpy as np

from agent.config import DriftConfig
from agent.drift import DriftDetector
from agent.imaging import observe
from agent.samples import PHOTOS, photo_stream

from .provenance import commit, machine

VIDEO = Path("/usr/share/doc/opencv-doc/examples/data/vtest.avi")
FPS = 10.0
SIZE = (384, 288)
CONDITIONS = ("night", "fog", "contrast", "defocus_blur", "gaussian_noise", "snow")
LEAD, CHANGED, TAIL = 300, 300, 300


def read_footage(path: Path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(cv2.resize(frame, SIZE, interpolation=cv2.INTER_AREA))
    if not frames:
        raise SystemExit(f"bench.drift: error: cannot read {path} (apt-get install opencv-doc, or --video PATH)")
    return frames


def night(frame: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    gain, noise = (0.6, 0.45, 0.3, 0.2, 0.12)[severity - 1], (4, 8, 12, 16, 20)[severity - 1]
    x = frame.astype(np.float32) * gain + rng.normal(0, noise, frame.shape).astype(np.float32)
    return np.clip(x, 0, 255).astype(np.uint8)


def corrupt(frame: np.ndarray, condition: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    if condition == "night":
        return night(frame, severity, rng)
    if not hasattr(np, "float_"):
        np.float_ = np.float64  # imagecorruptions predates numpy 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from imagecorruptions import corrupt as reference
    rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    out = np.uint8(np.clip(reference(rgb, corruption_name=condition, severity=severity), 0, 255))
    return cv2.cvtColor(out, cv2.COLOR_RGB2BGR)


def detector() -> DriftDetector:
    return DriftDetector(**DriftConfig().model_dump())


def run(frames, detector: DriftDetector) -> tuple[list, np.ndarray]:
    """Events and, per frame, whether the camera was reported in drift."""
    events, active = [], []
    for i, frame in enumerate(frames):
        event = detector.update(observe(frame), i, now=i / FPS)
        if event is not None:
            events.append(event)
        active.append(detector.active)
    return events, np.asarray(active)


def clean_run(footage: list[np.ndarray], loops: int) -> dict:
    events, active = run((footage[i % len(footage)] for i in range(loops * len(footage))), detector())
    n = loops * len(footage)
    warm = DriftConfig().warmup
    starts = sum(e.type == "start" for e in events)
    return {"frames": n, "starts": starts, "per_10k": 1e4 * starts / (n - warm), "in_drift": active[warm:].mean()}


def change_stream(footage, condition: str, severity: int, onset: int, offset: int, rng) -> dict:
    def frames():
        for t in range(LEAD + CHANGED + TAIL):
            frame = footage[(offset + t) % len(footage)]
            if LEAD <= t < LEAD + CHANGED:
                weight = min(1.0, (t - LEAD + 1) / onset) if onset else 1.0
                changed = corrupt(frame, condition, severity, rng)
                frame = changed if weight >= 1 else np.uint8(np.clip((1 - weight) * frame + weight * changed, 0, 255))
            yield frame
    events, _ = run(frames(), detector())
    starts = [e for e in events if e.type == "start"]
    early = [e for e in starts if e.frame < LEAD]
    during = [e for e in starts if LEAD <= e.frame < LEAD + CHANGED]
    reference = LEAD + max(onset - 1, 0)  # abrupt: the onset; gradual: the onset's last frame
    ends = [e for e in events if e.type == "end" and e.frame >= LEAD + CHANGED]
    return {"condition": condition, "severity": severity, "onset": onset, "false_before": len(early),
            "detected": bool(during), "delay": during[0].frame - reference if during else None,
            "end_delay": ends[0].frame - (LEAD + CHANGED) if ends else None,
            "open_at_end": bool(events) and events[-1].type != "end" and any(e.type == "start" for e in events),
            "condition_words": during[0].condition if during else []}


def pan_run(frames_per_photo: int) -> dict:
    events, active = run((f for _, f in photo_stream(frames_per_photo)), detector())
    starts = [e for e in events if e.type == "start"]
    switches = {frames_per_photo * k for k in range(1, len(PHOTOS))}
    near = [e for e in starts if any(0 <= e.frame - s < frames_per_photo for s in switches)]
    return {"frames_per_scene": frames_per_photo, "frames": frames_per_photo * len(PHOTOS), "starts": len(starts),
            "after_switch": len(near)}


def _fmt(v, digits: int = 0) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def report(clean: dict, changes: list[dict], pans: list[dict], seconds: float) -> str:
    lines = ["# Drift alerts on real footage", "",
             f"`python -m bench.drift` on {machine()}, commit {commit()}, {date.today().isoformat()}, "
             f"{seconds / 60:.1f} min. Default drift config; both layouts alike (the detector reads the frame).", "",
             "## Unchanged camera (vtest.avi looped, people walking through)", "",
             "| frames | false starts | per 10,000 frames | frames reported in drift |", "|---|---|---|---|",
             f"| {clean['frames']} | {clean['starts']} | {clean['per_10k']:.2f} | {100 * clean['in_drift']:.2f}% |", "",
             f"## Injected changes ({LEAD} clean, {CHANGED} changed, {TAIL} clean; {FPS:.0f} frames/s)", "",
             "Delay: frames from the onset (abrupt) or from the onset's last frame (faded in) to the start; "
             "negative when the start came while fading in. End: frames from the return to clean to the end.", "",
             "| condition | severity | onset (frames) | detected | delay (frames) | delay (s) | end after (frames) "
             "| open at end | false starts before | reported as |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in changes:
        detected = "yes" if c["detected"] else "MISSED"
        lines.append(f"| {c['condition']} | {c['severity']} | {c['onset'] or 'abrupt'} | {detected} "
                     f"| {_fmt(c['delay'])} | {_fmt(None if c['delay'] is None else c['delay'] / FPS, 1)} "
                     f"| {_fmt(c['end_delay'])} | {'yes' if c['open_at_end'] else 'no'} | {c['false_before']} "
                     f"| {', '.join(c['condition_words'])} |")
    kinds = (("abrupt", [c for c in changes if not c["onset"]]), ("faded in", [c for c in changes if c["onset"]]))
    for label, rows in kinds:
        delays = [c["delay"] for c in rows if c["delay"] is not None]
        end = [c["end_delay"] for c in rows if c["end_delay"] is not None]
        lines.append("")
        median_delay, worst_delay = (np.median(delays), max(delays)) if delays else (None, None)
        median_end, worst_end = (np.median(end), max(end)) if end else (None, None)
        lines.append(f"- {label}, {len(rows)} changes: missed {sum(not c['detected'] for c in rows)}; delay median "
                     f"{_fmt(median_delay)} / worst {_fmt(worst_delay)} frames; "
                     f"end median {_fmt(median_end)} / worst {_fmt(worst_end)} frames; "
                     f"episodes left open {sum(c['open_at_end'] for c in rows)}")
    lines += ["", "## Panning camera, scene switches without a change (agent.samples over scikit-image photos)", "",
              "| frames per scene | frames | starts | starts within a scene of a switch |", "|---|---|---|---|"]
    lines += [f"| {p['frames_per_scene']} | {p['frames']} | {p['starts']} | {p['after_switch']} |" for p in pans]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.drift", description=__doc__.split("\n\n")[0])
    parser.add_argument("--video", type=Path, default=VIDEO)
    parser.add_argument("--out", type=Path, default=Path("bench/results/drift.md"))
    args = parser.parse_args(argv)
    started = time.monotonic()
    footage = read_footage(args.video)
    clean = clean_run(footage, loops=-(-10_000 // len(footage)) + 1)
    rng = np.random.default_rng(0)
    plan = [(c, s, 0) for c in CONDITIONS for s in (2, 3, 4, 5)] + [(c, 3, 300) for c in CONDITIONS] + \
        [(c, 5, 50) for c in CONDITIONS]
    changes = [change_stream(footage, c, s, onset, int(rng.integers(len(footage))), rng) for c, s, onset in plan]
    pans = [pan_run(n) for n in (20, 30, 60, 150)]
    text = report(clean, changes, pans, time.monotonic() - started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
