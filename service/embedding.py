"""What the settings (and a command's flags over them) choose for the embedding pipeline:
one `filter.assembly.EmbeddingSpec`, built the same way by the server and by every
command, batch's Ray actors included."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from service.config import Settings

if TYPE_CHECKING:
    from filter.assembly import EmbeddingSpec


def embedding_spec(
    settings: Settings,
    *,
    embedder: str | None = None,
    models_dir: str | Path | None = None,
    device: str | None = None,
    detector: str | None = None,
    lanes: int = 1,
) -> EmbeddingSpec:
    """Embedder, models, device and detector: each given one (a flag) wins over its
    setting. Paths are absolute, as Ray workers need not share this working folder.
    `lanes`: batches the caller checks side by side on the CPU (the server's in flight)."""
    from filter.assembly import EmbeddingSpec

    weights = settings.facenet_weights
    return EmbeddingSpec(
        embedder=embedder or settings.embedder,
        models_dir=Path(models_dir or settings.models_dir).absolute(),
        device=device or settings.device,
        facenet_weights=None if weights is None else Path(weights).absolute(),
        detector=detector or settings.detector,
        torch_threads=settings.torch_threads or None,
        lanes=lanes,
    )
