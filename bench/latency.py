"""Latency and throughput ratios, measured in one interleaved run (EfficientNet-Lite0, batch 1).

    python -m bench.latency [--rounds 7] [--frames 20] [--threads 1]

Per frame, median over rounds of wall-clock and CPU time (all of the process's threads), every variant
timed in each round in turn, and plain INT8 again just before each: ratios to plain INT8 are medians of
those pairs' ratios.
    plain FP32 / plain INT8       the model with BatchNorm folded into the convolutions (the limit)
    adapted FP32 / INT8 robust    the agent's exported model, components fed back every frame
    adapted INT8 faithful         the published algorithm in the same graph layout
    INT8 folded, camera anchor    the default (folded layout, adaptation.method auto) on a fixed camera
                                  (bench.camera's first view): unadapted on its clean frames, as a
                                  camera runs outside drift episodes (the source bake, the graph
                                  every 11th frame); adapted in fog (severity 3) after it learned its
                                  reference on the clean frames, during the first SETTLE_MEASUREMENTS
                                  frames of a drift episode (every frame through the graph with its
                                  statistics branch) and once the episode has settled (a bake, the
                                  graph every 11th frame)
    adapted FP32 / INT8 folded,   the folded layout with UnMix-TNS in numpy (agent/model/mixture.py): statistics
      UnMix-TNS                   measured every 11th frame, the frames between on a baked session
                                  (agent/model/folded_session.py); also at every frame and every 16th,
                                  and with the gate's shadow pass (unadapted, measuring) every 4th
                                  frame, as a gated camera runs while it adapts; the default and gated
                                  rows also once settled: after SETTLE_FRAMES frames of the same
                                  stream, when the components have stopped moving the bake.
                                  The folded rows run FOLDED_FRAMES frames a round.
    INT8 folded graph pass,       what a measured frame costs, without the learner: the folded file's
      bake pass, bake build       graph at the source statistics, the same without its statistics branch
                                  (what normalisation fed in per frame costs onnxruntime's INT8
                                  kernels), a bake (the same normalisation as constants), and
                                  building a bake
    torch eager faithful          exporters/unmix.py's UnMix-TNS reference in torch, eager
    sliding window W=16 / 64      the TTA-benchmark practice: W buffered frames through the network
                                  (BatchNorm on the window's statistics) for every new frame
Plus, for both layouts, end-to-end replay (`tta-agent replay`'s loop: decode on a read-ahead thread,
preprocessing a frame ahead and LAME a frame behind on a worker thread, inference and drift on the
main one) against inference alone and the daemon's peak RSS with whether torch was loaded, and the
thread scaling (1 .. physical cores). Writes bench/results/latency.json/.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import yaml

from agent.config import GateConfig
from agent.model.cadence import SETTLE_MEASUREMENTS
from agent.model.sessions import open_session
from agent.preprocess import Preprocessor
from agent.samples import photo_stream, render_sample_video

from .provenance import commit, machine

RESULTS = Path(__file__).with_name("results")
MODELS = RESULTS / "models"


def plain_models(frames: list[np.ndarray], preprocess: Preprocessor) -> tuple[Path, Path]:
    """EfficientNet-Lite0 with BatchNorm folded (onnxscript's optimizer), FP32 and INT8 QDQ."""
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from exporters.models import efficientnet_lite as eff

    fp32, int8 = MODELS / "plain.fp32.onnx", MODELS / "plain.int8.onnx"
    if not fp32.exists():
        program = torch.onnx.export(eff.pretrained(), (torch.zeros(1, 3, 224, 224),), dynamo=True,
                                    input_names=["image"], output_names=["logits"])
        program.save(str(fp32))
    if not int8.exists():
        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter([{"image": preprocess(f)} for f in frames])

            def get_next(self):
                return next(self.it, None)

        quantize_static(str(fp32), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return fp32, int8


def adapted_models() -> dict[str, Path]:
    from exporters.cli import main as export

    paths = {}
    for mode, layout in (("robust", "graph"), ("faithful", "graph"), ("robust", "folded")):
        name = mode if layout == "graph" else f"{mode}.{layout}"
        out = MODELS / f"efficientnet_lite0.{name}.onnx"
        if not out.exists():
            assert export(["efficientnet-lite0", "--mode", mode, "--layout", layout, "--out", str(out)]) == 0
        paths[f"{name}/int8"], paths[f"{name}/fp32"] = out, out.with_name(out.stem + ".fp32.onnx")
    return paths


SHADOW_EVERY = GateConfig.model_fields["shadow_every"].default
FOLDED_FRAMES = 64  # per round for the folded layout: several measured frames of the default cadence
SETTLE_FRAMES = 2560  # the default cadence stops rebuilding on the bench's stream within about 1300 frames


def timer_plain(path: Path, threads: int, images):
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run() -> int:
        for x in images:
            session.run(None, {"image": x})
        return len(images)
    return run


def timer_adapted(path: Path, threads: int, images, shadow_every: int = 0, settle: int = 0, strength: float = 1.0,
                  method: str = "unmix", learn: tuple = (), onset: bool = False, **cadence):
    """`shadow_every`: also the adaptation gate's unadapted measuring pass every N frames, as the
    pipeline runs it while a gated camera adapts; `settle`: frames run before timing; `learn`: frames
    run unadapted first (the camera anchor's reference); `onset`: each run is the start of a drift episode."""
    session = open_session(path, "cpu", "onnxruntime", threads=threads, method=method, **cadence)
    for x in learn:
        session.step(x, strength=0.0)

    def run() -> int:
        if onset:
            session.cadence.restart()
        for i, x in enumerate(images):
            session.step(x, strength=strength)
            if shadow_every and i % shadow_every == 0:
                session.step(x, strength=0.0, measure=True)
        return len(images)
    for _ in range(settle // len(images)):
        run()
    run.session, run.untimed_bakes = session, getattr(session, "bakes", 0)
    return run


def timer_folded_pass(path: Path, threads: int, images, part: str):
    """One pass of the folded file through onnxruntime at the source statistics, as the agent opens it:
    `graph` (a measured frame), `graph without statistics` (the statistics branch pruned) or `bake`;
    or `bake build`: a bake built anew for every frame, which is what a rebuild costs."""
    import onnx

    from agent import contract

    session = open_session(path, "cpu", "onnxruntime", threads=threads, method="anchor")
    mean, var = session.normalisation
    if part == "bake build":
        def build() -> int:
            for _ in images:
                session.baker.session(mean, var)
            return len(images)
        return build
    feeds = {contract.NORM_MEAN: mean, contract.NORM_VAR: var}
    if part == "bake":
        runner, feeds = session.baker.session(mean, var), {}
    elif part == "graph":
        runner = session.session
    else:
        model = onnx.load(str(path))
        del model.graph.output[[o.name for o in model.graph.output].index(contract.STATS)]
        pruned = onnx.utils.Extractor(model).extract_model([i.name for i in model.graph.input],
                                                           [o.name for o in model.graph.output])
        runner = ort.InferenceSession(pruned.SerializeToString(), session.session.get_session_options(),
                                      providers=["CPUExecutionProvider"])

    def run() -> int:
        for x in images:
            runner.run([contract.LOGITS], {contract.IMAGE: x, **feeds})
        return len(images)
    return run


def timer_torch_faithful(threads: int, images):
    import torch

    from agent.contract import read_model_info
    from agent.state import initial_state
    from exporters.models import efficientnet_lite as eff
    from exporters.unmix import replace_batchnorm

    torch.set_num_threads(threads)
    info = read_model_info(MODELS / "efficientnet_lite0.faithful.fp32.onnx")
    model = eff.pretrained()
    replace_batchnorm(model, initial_state(info.adaptation, info.source_stats, 0), mode="faithful")
    tensors = [torch.from_numpy(x) for x in images]

    def run() -> int:
        with torch.no_grad():
            for x in tensors:
                model(x)
        return len(tensors)
    return run


def timer_sliding_window(window: int, threads: int, images):
    """For every new frame, the last `window` frames through the network in train-mode BatchNorm."""
    import torch

    from exporters.models import efficientnet_lite as eff

    torch.set_num_threads(threads)
    model = eff.pretrained().train()  # BatchNorm normalises with the window's statistics
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.track_running_stats = False
            m.running_mean = m.running_var = None
    batch = torch.from_numpy(np.concatenate([images[i % len(images)] for i in range(window)]))

    def run() -> int:
        with torch.no_grad():
            for _ in images:
                model(batch)
        return len(images)
    return run


def interleaved(timers: dict, rounds: int, reference: str | None = None) -> tuple[dict, dict, dict]:
    """Median wall-clock and CPU (all of the process's threads) ms per frame over rounds; each round
    runs every variant once, in turn. With `reference`, that variant also runs right before each
    other one, and the third result is, per variant, the median over rounds of its (wall, CPU) ratio
    to the reference run just before it: where the machine's speed drifts (here a plain frame took
    9-15 ms from one round to the next), a pair still runs under the same conditions."""
    wall: dict[str, list[float]] = {name: [] for name in timers}
    cpu: dict[str, list[float]] = {name: [] for name in timers}
    paired: dict[str, list[tuple[float, float]]] = {name: [] for name in timers if reference and name != reference}

    def timed(run) -> tuple[float, float]:
        start, start_cpu = time.perf_counter(), time.process_time()
        frames = run()
        return (time.perf_counter() - start) * 1000 / frames, (time.process_time() - start_cpu) * 1000 / frames
    for run in timers.values():
        run()  # warm-up
    for r in range(rounds):
        for name, run in timers.items():
            before = timed(timers[reference]) if name in paired else None
            ms, cpu_ms = timed(run)
            wall[name].append(ms)
            cpu[name].append(cpu_ms)
            if before:
                paired[name].append((ms / before[0], cpu_ms / before[1]))
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in wall.items()), flush=True)
    return ({name: float(np.median(v)) for name, v in wall.items()},
            {name: float(np.median(v)) for name, v in cpu.items()},
            {name: tuple(float(x) for x in np.median(v, axis=0)) for name, v in paired.items() if v})


def replay_throughput(model: Path, video: Path, threads: int, rounds: int) -> tuple[float, float, float]:
    """Frames/s of the replay loop under the default config (no labels: the unadapted pass every 30th
    frame) and of the model alone on the same frames, unadapted as the default runs the sample video
    (a panning camera: the anchor leaves it alone, the gate stays shut), each round one of each with
    fresh sessions; returns the medians and the median of the rounds' ratios."""
    import cv2

    from agent.config import parse_config
    from agent.pipeline import build_pipeline
    from agent.replay import replay
    from agent.sources import FileSource

    config = parse_config({"model": {"path": str(model), "device": "cpu"},
                           "cameras": [{"name": "bench", "source": str(video)}],
                           "advanced": {"model": {"backend": "onnxruntime", "threads": threads}}})
    capture = cv2.VideoCapture(str(video))
    preprocess = Preprocessor(open_session(model, "cpu", "onnxruntime").info.preprocess)
    images = []
    while (frame := capture.read())[0]:
        images.append(preprocess(frame[1]))
    replayed, alone = [], []
    for _ in range(rounds):
        pipeline = build_pipeline(config)
        start = time.perf_counter()
        summary, _ = replay(pipeline, FileSource(video), None, progress=False)
        replayed.append(summary["frames_processed"] / (time.perf_counter() - start))
        session = build_pipeline(config).session
        start = time.perf_counter()
        for x in images:
            session.step(x, strength=0.0)
        alone.append(len(images) / (time.perf_counter() - start))
    ratios = np.asarray(replayed) / np.asarray(alone)
    return float(np.median(replayed)), float(np.median(alone)), float(np.median(ratios))


def daemon_footprint(model: Path, video: Path, threads: int) -> dict:
    """Run the daemon over the video against an embedded-free config (no broker: it keeps retrying),
    sample its peak RSS from /proc and whether libtorch was mapped."""
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "agent.yaml"
        config.write_text(yaml.safe_dump({
            "device_id": "bench", "log_level": "warning",
            "model": {"path": str(model), "device": "cpu"}, "advanced": {"model": {"threads": threads}},
            "cameras": [{"name": "cam", "source": str(video), "replay": {"paced": False}}],
            "mqtt": {"host": "127.0.0.1", "port": 1}, "state": {"dir": tmp}, "exit_when_done": True}))
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        peak, torch_loaded = 0, False
        while proc.poll() is None:
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
                peak = max(peak, int(next(line.split()[1] for line in status.splitlines()
                                          if line.startswith("VmHWM"))))
                torch_loaded |= "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text()
            except (OSError, StopIteration):
                pass
            time.sleep(0.2)
    return {"peak_rss_mb": round(peak / 1024, 1), "torch_loaded": torch_loaded, "exit_code": proc.returncode}


def fixed_camera(frames: int, preprocess: Preprocessor) -> tuple[list, list]:
    """bench.camera's first view: its clean frames, and the same in fog at severity 3 (the reference corruption)."""
    from .camera import clean_scenes, view_stream

    scenes = clean_scenes()
    return ([preprocess(f) for f, _ in view_stream(0, "clean", 0, frames, scenes, 0)],
            [preprocess(f) for f, _ in view_stream(0, "fog", 3, frames, scenes, 3000)])


def _cycle(images: list, n: int) -> list:
    return [images[i % len(images)] for i in range(n)]


def thread_scaling(plain_int8: Path, paths: dict, images, rounds: int) -> dict[int, dict[str, float]]:
    """ms per frame at 1 .. physical-core threads (the agent's default is the physical core count)."""
    from agent.model.providers import physical_cores

    table = {}
    for threads in sorted({1, 2, physical_cores()}):
        if threads > physical_cores():
            continue
        table[threads] = interleaved({
            "plain INT8": timer_plain(plain_int8, threads, images),
            "adapted INT8 graph": timer_adapted(paths["robust/int8"], threads, images),
            "adapted INT8 folded": timer_adapted(paths["robust.folded/int8"], threads, _cycle(images, FOLDED_FRAMES))},
            rounds)[0]
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    started, revision = time.time(), commit()
    MODELS.mkdir(parents=True, exist_ok=True)
    paths = adapted_models()
    preprocess = Preprocessor(open_session(paths["robust/int8"], "cpu", "onnxruntime").info.preprocess)
    photos = [frame for _, frame in photo_stream(8)]
    plain_fp32, plain_int8 = plain_models(photos[::2], preprocess)
    images = [preprocess(f) for f in photos[1::4][: args.frames]]
    folded_images = _cycle(images, FOLDED_FRAMES)
    clean, foggy = fixed_camera(FOLDED_FRAMES, preprocess)
    t = args.threads
    timers = {
        "plain FP32": timer_plain(plain_fp32, t, images),
        "plain INT8": timer_plain(plain_int8, t, images),
        "adapted FP32 robust": timer_adapted(paths["robust/fp32"], t, images),
        "adapted INT8 robust": timer_adapted(paths["robust/int8"], t, images),
        "adapted INT8 faithful": timer_adapted(paths["faithful/int8"], t, images),
        "unadapted INT8 folded, camera anchor (outside drift episodes)": timer_adapted(
            paths["robust.folded/int8"], t, clean, strength=0.0, method="anchor"),
        "adapted INT8 folded, camera anchor (a drift episode's first frames)": timer_adapted(
            paths["robust.folded/int8"], t, foggy[:SETTLE_MEASUREMENTS], method="anchor", learn=clean, onset=True),
        "adapted INT8 folded, camera anchor (a drift episode, settled)": timer_adapted(
            paths["robust.folded/int8"], t, foggy, method="anchor", learn=clean, settle=len(foggy)),
        "adapted FP32 folded": timer_adapted(paths["robust.folded/fp32"], t, folded_images),
        "adapted INT8 folded": timer_adapted(paths["robust.folded/int8"], t, folded_images),
        "adapted INT8 folded, statistics every frame": timer_adapted(paths["robust.folded/int8"], t, folded_images,
                                                                     statistics_every=1),
        "adapted INT8 folded, statistics every 16th": timer_adapted(paths["robust.folded/int8"], t, folded_images,
                                                                    statistics_every=16),
        "adapted INT8 folded, gated while adapting": timer_adapted(paths["robust.folded/int8"], t, folded_images,
                                                                   shadow_every=SHADOW_EVERY),
        "adapted INT8 folded, settled": timer_adapted(paths["robust.folded/int8"], t, folded_images,
                                                      settle=SETTLE_FRAMES),
        "adapted INT8 folded, gated while adapting, settled": timer_adapted(
            paths["robust.folded/int8"], t, folded_images, shadow_every=SHADOW_EVERY, settle=SETTLE_FRAMES),
        "INT8 folded graph pass (a measured frame)": timer_folded_pass(paths["robust.folded/int8"], t, images, "graph"),
        "INT8 folded graph pass without the statistics branch": timer_folded_pass(
            paths["robust.folded/int8"], t, images, "graph without statistics"),
        "INT8 folded bake pass": timer_folded_pass(paths["robust.folded/int8"], t, images, "bake"),
        "INT8 folded bake build": timer_folded_pass(paths["robust.folded/int8"], t, images, "bake build"),
        "torch eager faithful": timer_torch_faithful(t, images),
        "sliding window W=16": timer_sliding_window(16, t, images),
        "sliding window W=64": timer_sliding_window(64, t, images[: max(2, args.frames // 8)]),
    }
    ms, cpu_ms, to_plain = interleaved(timers, args.rounds, reference="plain INT8")
    bakes = {name: run.session.bakes - run.untimed_bakes for name, run in timers.items()
             if hasattr(getattr(run, "session", None), "bakes")}
    folded_frames = (args.rounds + 1) * FOLDED_FRAMES
    video = RESULTS / "sample.mp4"
    if not video.exists():
        render_sample_video(video)
    replays, footprints = {}, {}
    for layout, key in (("graph", "robust/int8"), ("folded", "robust.folded/int8")):
        replays[layout] = replay_throughput(paths[key], video, t, args.rounds)
        footprints[layout] = daemon_footprint(paths[key], video, t)
    scaling = thread_scaling(plain_int8, paths, images, args.rounds)
    a = ms["adapted INT8 robust"]
    folded = [name for name in ms if "INT8 folded" in name]
    ratios = {
        "adapted INT8 / plain INT8": to_plain["adapted INT8 robust"][0],
        "adapted INT8 faithful / plain INT8": to_plain["adapted INT8 faithful"][0],
        **{f"{name} / plain INT8": to_plain[name][0] for name in folded},
        **{f"{name} / plain INT8, CPU time": to_plain[name][1] for name in folded},
        "torch eager faithful / adapted INT8 folded": ms["torch eager faithful"] / ms["adapted INT8 folded"],
        "sliding window W=16 / adapted INT8 folded": ms["sliding window W=16"] / ms["adapted INT8 folded"],
        "sliding window W=64 / adapted INT8 folded": ms["sliding window W=64"] / ms["adapted INT8 folded"],
        "torch eager faithful / adapted INT8": ms["torch eager faithful"] / a,
        "sliding window W=16 / adapted INT8": ms["sliding window W=16"] / a,
        "sliding window W=64 / adapted INT8": ms["sliding window W=64"] / a,
        "plain INT8 / plain FP32": 1 / to_plain["plain FP32"][0],
        "adapted INT8 / adapted FP32": a / ms["adapted FP32 robust"],
        **{f"end-to-end replay / inference-only throughput, {layout}": ratio
           for layout, (_, _, ratio) in replays.items()},
    }
    report = {"threads": t, "frames": len(images), "folded_frames": FOLDED_FRAMES, "rounds": args.rounds,
              "ms_per_frame": ms, "cpu_ms_per_frame": cpu_ms, "ratios": ratios,
              "folded_bakes": {k: (v, folded_frames) for k, v in bakes.items()},
              "replay_fps": {k: v[0] for k, v in replays.items()},
              "inference_fps": {k: v[1] for k, v in replays.items()}, "daemon": footprints, "threads_scaling": scaling}
    (RESULTS / "latency.json").write_text(json.dumps(report, indent=1))
    command = "python -m bench.latency " + " ".join(sys.argv[1:])
    lines = ["# Latency: EfficientNet-Lite0, batch 1", "",
             f"`{command.strip()}` on {machine()}, commit {revision}, {time.strftime('%Y-%m-%d')}, "
             f"{(time.time() - started) / 60:.0f} min. {t} thread(s), median of {args.rounds} interleaved rounds "
             f"of {len(images)} frames ({FOLDED_FRAMES} for the folded layout).", "",
             "| variant | ms / frame | CPU ms / frame |", "|---|---|---|"]
    lines += [f"| {k} | {v:.1f} | {cpu_ms[k]:.1f} |" for k, v in ms.items()]
    lines += ["", "| ratio | value |", "|---|---|"] + [f"| {k} | {v:.2f} |" for k, v in ratios.items()]
    lines += ["", "baked-session rebuilds in the warm-up and timed rounds (folded; the settled rows after "
              f"{SETTLE_FRAMES} untimed frames): " + ", ".join(
        f"{k}: {v} in {folded_frames} frames" for k, v in bakes.items())]
    lines += [""] + [f"daemon over the sample video, {layout} layout: peak RSS {f['peak_rss_mb']} MB, torch loaded: "
                     f"{f['torch_loaded']}" for layout, f in footprints.items()]
    lines += ["", "| threads | " + " | ".join(next(iter(scaling.values()))) + " |",
              "|---|" + "---|" * len(next(iter(scaling.values())))]
    lines += [f"| {n} | " + " | ".join(f"{v:.1f}" for v in row.values()) + " |" for n, row in scaling.items()]
    (RESULTS / "latency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
