"""The exit codes of `tta-agent`, one meaning each (docs/operations.md lists them for operators)."""

EXIT_OK = 0  # stopped on request, or every file source ended
EXIT_CONFIG = 2  # nothing ran: the config, a file it names, the model, a source, or the state folder in use
EXIT_DAMAGED_INPUT = 3  # replay ran to the end of what could be decoded, but the video is cut or corrupt
EXIT_FAILURE = 70  # it was running and failed (a bug or an unexpected runtime failure): the traceback is logged
