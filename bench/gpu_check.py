"""GPU check for a machine with an NVIDIA GPU: one short run, no network, no paho-mqtt needed.

    python -m bench.gpu_check                      # Fashion-MNIST model (exported here if missing)
    python -m bench.gpu_check --model m.onnx       # any adaptive model with a tta.source
    python -m bench.gpu_check --device cpu --backend torch   # a dry run of the same steps on the CPU

1. Device selection: what onnxruntime offers, whether torch sees CUDA, which backend and
   provider the agent's open_session picks for device=cuda.
2. Agreement: a stream (clean, then contrast loss, then sensor noise) through the GPU session
   and a CPU session of the same backend side by side: top-1 agreement and the components'
   relative drift at the end.
3. Speed: adapted frames/s on the GPU and on the CPU (same backend), and the agent's default
   CPU path (onnxruntime INT8 or the given file), measured in the same run.
4. Fallback: the GPU session's forward is made to raise a CUDA error mid-stream; the session
   must carry on on the CPU with the components of the last good frame and match the CPU twin.
Writes bench/results/gpu_check.json; exits 1 if agreement < 99% or the fallback misbehaves.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).with_name("results")


def _stream(frames: int) -> np.ndarray:
    from bench.corruptions import corrupt
    from exporters.models.fashion_mnist import load_split

    images, _ = load_split("t10k")
    third = frames // 3
    return np.concatenate([images[:third], corrupt(images[third:2 * third], "contrast", 5, 0),
                           corrupt(images[2 * third:frames], "gaussian_noise", 5, 0)])


def _fps(session, images, preprocess, repeats: int = 1) -> float:
    xs = [preprocess(x) for x in images]
    for x in xs[:20]:
        session.step(x)  # warm-up (kernels, allocator)
    start = time.perf_counter()
    for _ in range(repeats):
        for x in xs:
            session.step(x)
    return len(xs) * repeats / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="adaptive .onnx (default: bench/results/models/fashion_mnist...)")
    parser.add_argument("--frames", type=int, default=600)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--backend", choices=("auto", "onnxruntime", "torch"), default="auto",
                        help="auto: what the agent picks for the device")
    args = parser.parse_args()

    import onnxruntime as ort
    import torch

    from agent.model.sessions import open_session
    from agent.preprocess import Preprocessor
    from exporters.torch_session import TorchSession

    report: dict = {"onnxruntime": ort.__version__, "onnxruntime_providers": ort.get_available_providers(),
                    "torch": torch.__version__, "torch_cuda": torch.cuda.is_available(),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    if args.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps(report, indent=1))
        print("gpu_check: no CUDA device visible to torch; nothing to check (--device cpu for a dry run)")
        return 2
    model = args.model
    if model is None:
        model = RESULTS / "models" / "fashion_mnist.robust.onnx"
        if not model.exists():
            from exporters.cli import main as export

            model.parent.mkdir(parents=True, exist_ok=True)
            assert export(["fashion-mnist", "--layout", "graph", "--out", str(model), "--calib-frames", "200"]) == 0
    gpu = open_session(model, device=args.device, backend=args.backend)
    backend = "torch" if isinstance(gpu, TorchSession) else "onnxruntime"
    cpu = open_session(model, device="cpu", backend=backend)
    report.update({"model": str(model), "backend_for_cuda": backend, "gpu_provider": gpu.provider,
                   "gpu_provider_reason": gpu.provider_reason})
    print(f"device selection: backend {backend}, provider {gpu.provider} ({gpu.provider_reason})", flush=True)

    preprocess = Preprocessor(gpu.info.preprocess)
    images = _stream(args.frames)
    same = []
    for image in images:
        x = preprocess(image)
        same.append(int(np.argmax(gpu.step(x).logits) == np.argmax(cpu.step(x).logits)))
    drift = max(float(np.linalg.norm(gpu.state[layer][t] - v) / max(np.linalg.norm(v), 1e-12))
                for layer, tensors in cpu.state.items() for t, v in tensors.items())
    report.update({"frames": len(images), "top1_agreement": float(np.mean(same)), "state_relative_drift": drift})
    print(f"agreement GPU vs CPU: top-1 {100 * np.mean(same):.2f}% of {len(images)} frames, "
          f"components' relative drift {drift:.2e}", flush=True)

    for session in (gpu, cpu):
        session.reset()
    default_cpu = open_session(model, device="cpu")
    fps = {"gpu": _fps(gpu, images[:300], preprocess), "cpu_same_backend": _fps(cpu, images[:300], preprocess),
           "cpu_agent_default": _fps(default_cpu, images[:300], preprocess)}
    report["adapted_fps"] = {k: round(v, 1) for k, v in fps.items()}
    report["gpu_over_cpu"] = round(fps["gpu"] / fps["cpu_same_backend"], 2)
    print(f"adapted frames/s: GPU {fps['gpu']:.1f}, CPU same backend {fps['cpu_same_backend']:.1f} "
          f"(x{report['gpu_over_cpu']}), CPU agent default {fps['cpu_agent_default']:.1f}", flush=True)

    fallback_ok = _forced_failure(gpu, cpu, images, preprocess, report)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    ok = report["top1_agreement"] >= 0.99 and fallback_ok
    print("gpu_check:", "PASS" if ok else "FAIL", f"-> {RESULTS / 'gpu_check.json'}")
    return 0 if ok else 1


def _forced_failure(gpu, cpu, images, preprocess, report: dict) -> bool:
    """Kill the GPU session's forward mid-stream; it must carry on on the CPU like its twin."""
    for session in (gpu, cpu):
        session.reset()
    half = len(images) // 2
    for image in images[:half]:
        x = preprocess(image)
        gpu.step(x)
        cpu.step(x)
    if not hasattr(gpu, "model"):  # onnxruntime CUDA provider: its own fallback path, tested on CI
        report["fallback"] = "not forced: onnxruntime session"
        return True
    real = gpu.model.forward

    def dying(*args, **kwargs):
        real(*args, **kwargs)
        raise RuntimeError("CUDA error: injected by bench.gpu_check")

    gpu.model.forward = dying
    gpu.on_gpu = True
    same = [int(np.argmax(gpu.step(preprocess(x)).logits) == np.argmax(cpu.step(preprocess(x)).logits))
            for x in images[half:]]
    report["fallback"] = {"fallbacks": gpu.fallbacks, "reason": gpu.fallback_reason, "provider_after": gpu.provider,
                          "top1_agreement_after": float(np.mean(same))}
    print(f"forced GPU failure: {gpu.fallbacks} fallback, now {gpu.provider}; top-1 vs CPU twin after it "
          f"{100 * np.mean(same):.1f}%", flush=True)
    return gpu.fallbacks == 1 and gpu.provider.startswith("torch/cpu") and np.mean(same) >= 0.99


if __name__ == "__main__":
    sys.exit(main())
