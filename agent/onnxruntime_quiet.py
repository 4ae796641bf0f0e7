"""onnxruntime, imported without the warning its telemetry prints at import.

Where the user's cache folder is not writable (a service user, DynamicUser=), onnxruntime
writes "Failed to persist telemetry device ID" to stderr on import, in colour, on every
command. Only that import runs with stderr closed; later onnxruntime messages go through
its logger at error level. Import onnxruntime from here, before anything else does.
"""
from __future__ import annotations

import os


def _import_quietly():
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import onnxruntime
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    onnxruntime.set_default_logger_severity(3)
    return onnxruntime


ort = _import_quietly()
