"""Day and night: fixed cameras through several compressed days, dusk, an infrared night and dawn each time.

    python -m bench.daynight [--models models] [--days 3] [--workers 2]

Cameras: the real footage of bench.footage (OpenCV's vtest.avi, a fixed indoor camera with people walking,
looped) and fixed views of real photos from bench.camera (VIEWS). Each camera lives DAYS compressed days of
PHASES (frames each): day, a reference ImageNet-C corruption at severity 3 (PyPI imagecorruptions; fog, snow,
shot noise by turns), day again, dusk (the light falls and sensor noise rises, frame by frame, to bench.camera's
night at severity 3), infrared night (the IR-cut filter lifts and the illuminator lights the scene: grey, flat
and grainy), dawn (colour again at night's light, rising to day's). Two births: a camera installed by day, and
one installed at night (it starts at the infrared night, then dawn, then DAYS days), so that its first frames,
the ones it learns as usual, are night's. Every frame goes through the agent's pipeline as the daemon builds it
from the default config (agent.pipeline.build_pipeline) and through the unadapted model. Labels: the FP32
model's top-1 on the clean frame. Reported: per phase and day, answer against unadapted; clean day accuracy on
the last day against the first; the camera anchor's reference over time, as its mean per-layer KL divergence
from the camera's day statistics (the unadapted model's statistics measured on that camera's clean day frames);
the drift episodes and the collapse guard's firings. Writes bench/results/daynight.md and daynight.json.
"""
from __future__ import annotations

import argparse
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from agent.pipeline import build_pipeline
from agent.sources import Frame

from .camera import NIGHT, VARIANTS, _config, apply, clean_scenes
from .footage import read_footage
from .provenance import camera_arguments, camera_models, gather, measured

RESULTS = Path(__file__).resolve().parent / "results"
PHASES = (("day", 150), ("corruption", 100), ("day after", 150), ("dusk", 100), ("infrared", 200), ("dawn", 100))
CORRUPTIONS = ("fog", "snow", "shot_noise")  # one a day, by turns
SEVERITY = 3
PHOTO_VIEWS = (0, 6, 12, 18)  # bench.camera's VIEWS
FOOTAGE_FRAMES = 795
DAY_STATISTICS_EVERY = 10  # clean day frames sampled for a camera's day statistics
LIGHT, NOISE = NIGHT[SEVERITY]


def lit(frame: np.ndarray, light: float, noise: float, rng: np.random.Generator) -> np.ndarray:
    x = frame.astype(np.float32) * light + rng.normal(0, noise, frame.shape)
    return np.clip(x, 0, 255).astype(np.uint8)


def infrared(frame: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What an IR camera at night gives: one channel, the near scene lit flat, a grainy sensor."""
    grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY).astype(np.float32)
    x = 0.6 * grey + 40 + rng.normal(0, 6, grey.shape)
    return cv2.cvtColor(np.clip(x, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)


def schedule(days: int, born: str) -> list[tuple[int, str, float]]:
    """(day, phase, progress 0-1 through the phase) per frame; born at night: the first day's infrared and dawn
    come first."""
    frames = []
    if born == "night":
        for name, n in PHASES[-2:]:
            frames += [(0, name, i / max(n - 1, 1)) for i in range(n)]
    for day in range(1, days + 1):
        for name, n in PHASES:
            frames += [(day, name, i / max(n - 1, 1)) for i in range(n)]
    return frames


def condition(frame: np.ndarray, day: int, phase: str, t: float, seed: int, rng: np.random.Generator) -> np.ndarray:
    if phase.startswith("day"):
        return frame
    if phase == "corruption":
        return apply(frame, CORRUPTIONS[(day - 1) % len(CORRUPTIONS)], SEVERITY, seed)
    if phase == "infrared":
        return infrared(frame, rng)
    if phase == "dusk":
        return lit(frame, 1 - t * (1 - LIGHT), t * NOISE, rng)
    return lit(frame, LIGHT + t * (1 - LIGHT), (1 - t) * NOISE, rng)  # dawn


def clean_frames(camera: str) -> list[np.ndarray]:
    if camera == "footage":
        return read_footage(frames=FOOTAGE_FRAMES)
    view = int(camera)
    return clean_scenes()["fixed"][view * VARIANTS:(view + 1) * VARIANTS]


def labels_fp32(task) -> list[int]:
    fp32, camera = task
    pipeline = build_pipeline(_config(fp32, adaptation={"mode": "off"}, lame={"mode": "off"},
                                      advanced={"adaptation": {"gate": {"enabled": False}}}))
    return [int(np.argmax(pipeline.process(Frame(i, f, 0.0)).probs)) for i, f in enumerate(clean_frames(camera))]


def day_statistics(session, clean: list[np.ndarray], preprocess) -> tuple[np.ndarray, np.ndarray]:
    """The unadapted model's layer statistics on a camera's clean frames (every DAY_STATISTICS_EVERY-th)."""
    means, variances = [], []
    for image in clean[::DAY_STATISTICS_EVERY] if len(clean) > VARIANTS else clean:
        session.step(preprocess(image), strength=0.0, measure=True, update=False)
        mu, var = session.last_statistics
        means.append(mu)
        variances.append(var)
    return np.mean(means, 0), np.mean(variances, 0)


def run_task(task) -> dict:
    model, camera, born, days, labels = task
    clean = clean_frames(camera)
    agent = build_pipeline(_config(model))
    unadapted = build_pipeline(_config(model, adaptation={"mode": "off"}, lame={"mode": "off"}))
    learner = agent.session.learner
    day = day_statistics(unadapted.session, clean, unadapted.preprocess)
    rng = np.random.default_rng(zlib.crc32(f"{camera}:{born}".encode()))
    rows, starts = [], 0
    previous = None
    for i, (d, phase, t) in enumerate(schedule(days, born)):
        k = i % len(clean)
        image = condition(clean[k], d, phase, t, 7919 * d + k, rng)
        frame = Frame(i, image, 0.0)
        raw, result = unadapted.process(frame), agent.process(frame)
        starts += bool(result.drift is not None and result.drift.type == "start")
        row = {"day": d, "phase": phase, "unadapted": bool(np.argmax(raw.probs) == labels[k]),
               "answer": bool(np.argmax(result.probs) == labels[k]), "strength": result.strength}
        if (d, phase) != previous:
            row["reference"] = float(learner.divergence(*learner.reference, *day).mean()) \
                if learner.learned else None
        previous = (d, phase)
        rows.append(row)
    return {"camera": camera, "born": born, "rows": rows, "drift_starts": starts,
            "guard_fired": agent.guard.fired if agent.guard else 0,
            "reference_end": float(learner.divergence(*learner.reference, *day).mean()) if learner.learned else None}


def _acc(rows: list[dict], key: str) -> float:
    return 100 * float(np.mean([r[key] for r in rows])) if rows else float("nan")


def markdown(runs: list[dict], days: int, minutes: float) -> str:
    cameras = sorted({r["camera"] for r in runs}, key=lambda c: (c != "footage", c))
    lines = ["# Day and night: EfficientNet-Lite0 INT8, fixed cameras through compressed days", "",
             f"{measured('bench.daynight', minutes)} "
             f"Default agent config (folded layout, camera anchor, LAME auto, guard on). Cameras: {', '.join(cameras)} "
             "(footage: vtest.avi looped; numbers: bench.camera's fixed photo views). A day: "
             + ", ".join(f"{n} {k}" for n, k in PHASES) + f" frames; the corruption is {', '.join(CORRUPTIONS)} at "
             f"severity {SEVERITY} on days 1, 2, 3. Labels: the FP32 model's top-1 on the clean frame. Accuracy in %, "
             "unadapted / answer (gain), over every camera.", ""]
    for born in ("day", "night"):
        mine = [r for r in runs if r["born"] == born]
        if not mine:
            continue
        lines += [f"## Installed by {born}", "",
                  "| day | " + " | ".join(name for name, _ in PHASES) + " |",
                  "|---|" + "---|" * len(PHASES)]
        for d in range(0 if born == "night" else 1, days + 1):
            cells = []
            for name, _ in PHASES:
                rows = [x for r in mine for x in r["rows"] if x["day"] == d and x["phase"] == name]
                if not rows:
                    cells.append("")
                    continue
                u, a = _acc(rows, "unadapted"), _acc(rows, "answer")
                cells.append(f"{u:.1f} / {a:.1f} ({a - u:+.1f})")
            lines.append(f"| {d} | " + " | ".join(cells) + " |")
        clean = {d: [x for r in mine for x in r["rows"] if x["day"] == d and x["phase"].startswith("day")]
                 for d in (1, days)}
        first, last = ((_acc(clean[d], "unadapted"), _acc(clean[d], "answer")) for d in (1, days))
        lines += ["", f"Clean day frames, day 1: {first[0]:.1f} / {first[1]:.1f} ({first[1] - first[0]:+.1f}); "
                  f"day {days}: {last[0]:.1f} / {last[1]:.1f} ({last[1] - last[0]:+.1f}). Drift episodes started: "
                  f"{sum(r['drift_starts'] for r in mine)} over {len(mine)} cameras; guard fired: "
                  f"{sum(r['guard_fired'] for r in mine)}.", "",
                  "The anchor's reference, mean per-layer KL from the camera's day statistics, at the start of "
                  "each phase (mean over cameras; - : no reference yet):", "",
                  "| day | " + " | ".join(name for name, _ in PHASES) + " | end |",
                  "|---|" + "---|" * (len(PHASES) + 1)]
        for d in range(0 if born == "night" else 1, days + 1):
            cells = []
            for name, _ in PHASES:
                values = [x.get("reference") for r in mine for x in r["rows"]
                          if x["day"] == d and x["phase"] == name and "reference" in x]
                known = [v for v in values if v is not None]
                cells.append(f"{np.mean(known):.3f}" if known else ("-" if values else ""))
            end = [r["reference_end"] for r in mine if r["reference_end"] is not None]
            cells.append(f"{np.mean(end):.3f}" if d == days and end else "")
            lines.append(f"| {d} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--days", type=int, default=3)
    parser.add_argument("--cameras", nargs="+", default=["footage", *map(str, PHOTO_VIEWS)])
    parser.add_argument("--born", nargs="+", choices=("day", "night"), default=["day", "night"])
    camera_arguments(parser, "daynight")
    args = parser.parse_args()
    model, fp32 = camera_models(args)
    started = time.time()
    with ProcessPoolExecutor(args.workers) as pool:
        labels = dict(zip(args.cameras, pool.map(labels_fp32, [(fp32, c) for c in args.cameras])))
        tasks = [(model, c, b, args.days, labels[c]) for b in args.born for c in args.cameras]
        runs = gather(pool.map(run_task, tasks), RESULTS / f"{args.name}.json", lambda run: (
            f"{run['camera']} born by {run['born']}: unadapted {_acc(run['rows'], 'unadapted'):.1f} answer "
            f"{_acc(run['rows'], 'answer'):.1f}, reference at the end {run['reference_end']}"))
    table = markdown(runs, args.days, (time.time() - started) / 60)
    (RESULTS / f"{args.name}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
