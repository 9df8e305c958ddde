"""What a released image can say about how it was made: the filter that passed it
(`filter.thresholds.FilterInForce`) and the request it belongs to. Written into its
content credentials (service.credentials); never a score, a distance or an identity."""

from __future__ import annotations

from dataclasses import dataclass

from filter.thresholds import FilterInForce


@dataclass(frozen=True)
class ReleaseFacts:
    """The per-image facts a content signer writes (the generator is the signer's own)."""

    request_id: str
    filtered_by: FilterInForce
