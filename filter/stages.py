"""The timed stages of a batch: the identity filter's (the `stage` label of
`facegate_filter_seconds`) and the generator call before them (service.engine, in
`facegate_generate_seconds`), reported to the same `observe_stage`. Apart from
filter.identity_filter (torch) so that service.metrics, a leaf, can read them."""

from __future__ import annotations

STAGES = ("detect", "embed", "search")
GENERATE = "generate"
