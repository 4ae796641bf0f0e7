"""The adaptive model, one part a file: `sessions.open_session` opens a model file as the session its layout
asks for (`graph_session`, `folded_session`), each an `adaptive.AdaptiveModel`; `providers` chooses the
accelerator and falls back to the CPU; the folded layout's learners (`anchor`, `mixture`), its `cadence` and
its `bakes`. Nothing is imported here, so `agent.model.cadence` loads no inference engine."""
