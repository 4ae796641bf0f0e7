"""What a results file names: the machine (CPU model and the flags that change INT8 speed) and the commit."""
from __future__ import annotations

import platform
import subprocess
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
