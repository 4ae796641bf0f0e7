"""What a results file names: the machine (CPU model and the flags that change INT8 speed) and the commit; and
the runs a benchmark gathers, kept as they come so that a run cut short keeps what it measured."""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from datetime import date
from pathlib import Path


def machine() -> str:
    model, flags = "unknown CPU", ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name") and model == "unknown CPU":
            model = line.split(":", 1)[1].strip()
        if line.startswith("flags") and not flags:
            wanted = ("avx512f", "avx2", "avx512_vnni")
            flags = " ".join(f for f in line.split(":", 1)[1].split() if f.startswith(wanted))
    return f"{model} ({flags or 'no AVX2'}), {platform.machine()}"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def gather(runs: Iterable[dict], json_path: Path, describe: Callable[[dict], str]) -> list[dict]:
    """Each run as it comes: appended to `json_path` (rewritten whole) and told on a line with the time so far."""
    started, kept = time.time(), []
    json_path.parent.mkdir(exist_ok=True)
    for run in runs:
        kept.append(run)
        json_path.write_text(json.dumps(kept))
        print(f"{len(kept)}: {describe(run)} ({time.time() - started:.0f} s)", flush=True)
    return kept


def camera_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """The options every camera benchmark takes: where the exported models are, the workers, the results stem."""
    parser.add_argument("--models", type=Path, default=Path("models"),
                        help="folder with efficientnet_lite0_folded.onnx and efficientnet_lite0.fp32.onnx")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--name", default=name, help="results file stem")


def camera_models(args: argparse.Namespace) -> tuple[Path, Path]:
    """The default (folded INT8) model and its FP32 twin (the labels), each checked before minutes of work."""
    from agent.contract import read_model_info

    model, fp32 = args.models / "efficientnet_lite0_folded.onnx", args.models / "efficientnet_lite0.fp32.onnx"
    for path in (model, fp32):
        read_model_info(path)
    return model, fp32


def measured(module: str, minutes: float) -> str:
    """A results file's first words: the command as it was run, the machine, the commit, the date, how long."""
    command = " ".join([f"python -m {module}", *sys.argv[1:]])
    return f"`{command}` on {machine()}, commit {commit()}, {date.today().isoformat()}, {minutes:.0f} min."
