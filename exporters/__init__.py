"""tta-export: adaptive ONNX models from torch classifiers."""
import agent.onnxruntime_quiet  # noqa: F401  (before onnxruntime.quantization: no import-time telemetry warning)
