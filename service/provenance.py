"""What a released image can say about how it was made: the filter that passed it and
the request it belongs to. Written into its content credentials (service.credentials);
never a score, a distance or an identity."""

from __future__ import annotations

from dataclasses import dataclass

from filter.runtime import Thresholds


@dataclass(frozen=True)
class FilterInForce:
    """The index and thresholds that one batch was checked against. The index can be
    reloaded between batches, so this travels with the batch's outcomes rather than being
    read from the server's state when the image is released."""

    index_fingerprint: str
    thresholds: Thresholds


@dataclass(frozen=True)
class ReleaseFacts:
    """The per-image facts a content signer writes (the generator is the signer's own)."""

    request_id: str
    filtered_by: FilterInForce
