"""The words a user types, one vocabulary each: shared by the config schema, the pipeline, MQTT commands and
the command line, and importable without the schema (a leaf module)."""

ADAPTATION_MODES = ("on", "frozen", "off")
LAME_MODES = ("auto", "on", "off")
METHODS = ("auto", "anchor", "unmix")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "onnxruntime", "torch")
