"""The identity filter's timed stages. Their names are the `stage` label of
`facegate_filter_seconds`; kept apart from filter.identity_filter (torch) so that
service.metrics, a leaf, can read them."""

from __future__ import annotations

STAGES = ("detect", "embed", "search")
