"""Batch mode: filter generated datasets at scale on Ray Data (`facegate batch`,
`facegate index build --ray`).

The per-batch logic (inputs, decoding, checking, the manifest, the copies) is in plain
classes and functions that run without Ray; `engine.py` is the thin Ray Data layer that
runs them as CPU tasks and model actors. No gRPC: this package uses `filter/` only.
"""
