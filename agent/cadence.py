"""How often the folded layout measures statistics (agent/runtime.FoldedSession), without onnxruntime:
the config's defaults come from here, so validating a config loads no inference engine."""
from __future__ import annotations

# chosen by bench/latency.py and bench/quality.py
STATISTICS_EVERY, REBAKE_DIVERGENCE = 8, 0.003
