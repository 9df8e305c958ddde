"""Image generators behind one interface.

Contract for every generator: `generate` takes a float32 latent batch of shape
(N, latent_dim), drawn from a standard normal, and returns (N, H, W, 3) uint8 RGB.
Models produce NCHW float images in [-1, 1] (tanh output); the conversion to uint8
lives here, once.

- `dcgan-digiface` (embedded default): the PyTorch DCGAN tutorial generator
  (nz=100, ngf=64, 64x64 RGB, tanh) trained on DigiFace-1M synthetic faces.
- `torchscript`: any operator model saved with `torch.jit.save` (or `torch.export`
  as a .pt2 file) that maps (N, latent_dim) float32 to (N, 3, H, W) in [-1, 1].
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from filter.embedders import resolve_device
from filter.errors import ModelError
from filter.models import DCGAN_DIGIFACE, sha256_file, verified_model_path


class GeneratorError(Exception):
    """A generator produced output that breaks the contract, or failed to run."""


class Generator(Protocol):
    name: str
    latent_dim: int
    model_sha256: str

    def generate(self, latents: np.ndarray) -> np.ndarray:
        """(N, latent_dim) float32 -> (N, H, W, 3) uint8 RGB."""
        ...


MIN_SEED_KEY_BYTES = 32
_LATENT_DOMAIN = b"facegate/latent/v1"
# Salted derivation (issue 20): the index's salt joins the message, so that an edit of the
# index's membership maps every seed to new candidates.
_SALTED_LATENT_DOMAIN = b"facegate/latent/v2"
_UNKEYED_SALTED_DOMAIN = b"facegate/latent/v2/unkeyed"
# A lossy delivery draws its own candidates: a JPEG candidate held back for its decoded
# view must not be the PNG candidate of the same (seed, slot, attempt), or a caller who
# got that PNG would encode the held-back JPEG himself (and learn from each quality he
# asks for whether it passes). Lossless deliveries keep the v1/v2 derivations.
_DELIVERY_LATENT_DOMAIN = b"facegate/latent/v3"
_UNKEYED_DELIVERY_DOMAIN = b"facegate/latent/v3/unkeyed"

# A candidate to draw: one row (seed, slot, attempt, delivery) of an unsigned 64-bit
# array. The batcher carries these rows, not latents: the engine turns them into latents
# under the salt of the very filter that checks them (see `latents_for_draws`), and into
# the pixels the caller will decode (delivery: 0 lossless, else the JPEG quality; see
# service.encoding.deliver), which are the pixels the filter checks.
DRAW_COLUMNS = 4
LOSSLESS = 0


def draw_rows(
    seed: int, slot_attempts: Sequence[tuple[int, int]], jpeg_quality: int = LOSSLESS
) -> np.ndarray:
    """(N, 4) uint64 rows (seed, slot, attempt, delivery) for the candidates of one request
    (`jpeg_quality` 1..100 for a JPEG request, LOSSLESS otherwise)."""
    rows = np.empty((len(slot_attempts), DRAW_COLUMNS), dtype=np.uint64)
    for row, (slot, attempt) in enumerate(slot_attempts):
        rows[row] = (seed, slot, attempt, jpeg_quality)
    return rows


def latents_for(
    seed: int,
    slot: int,
    attempt: int,
    dim: int,
    key: bytes | None = None,
    salt: bytes = b"",
    delivery: int = LOSSLESS,
) -> np.ndarray:
    """The latent of one candidate, a pure function of (key, salt, seed, slot, attempt,
    delivery).

    Each candidate has its own stream, so a slot's sequence does not depend on how
    many other slots a request has, which of them were rejected, or how candidates
    were batched with other requests.

    With a key (FACEGATE_SEED_KEY_FILE), the stream is seeded by
    HMAC-SHA256(key, domain || salt || seed || slot || attempt): a caller who knows the seed
    and the public generator weights still cannot regenerate a held-back candidate offline.
    The salt is the index's (a random value in its manifest, rolled by every edit of its
    membership): replaying a seed after an `index add` or `remove` meets all new candidates,
    so comparing before and after says nothing about who was added or removed.
    Without a salt (an index made before salts existed) the derivation is the earlier one,
    so such an index keeps its seeds; without a key the latent is a function of the seed
    and the salt alone (FACEGATE_ALLOW_UNKEYED_SEEDS, demos only).
    A lossy delivery (a JPEG quality) enters the message under its own domain: each
    quality draws other candidates than PNG and than every other quality.
    """
    position = struct.pack(">QQQ", seed, slot, attempt)
    if key is not None and len(key) < MIN_SEED_KEY_BYTES:
        raise ValueError(f"seed key must be at least {MIN_SEED_KEY_BYTES} bytes")
    if delivery != LOSSLESS:
        message = struct.pack(">H", len(salt)) + salt + position + struct.pack(">Q", delivery)
        if key is None:
            digest = hashlib.sha256(_UNKEYED_DELIVERY_DOMAIN + message).digest()
        else:
            digest = hmac.new(key, _DELIVERY_LATENT_DOMAIN + message, hashlib.sha256).digest()
        sequence = np.random.SeedSequence(entropy=int.from_bytes(digest, "big"))
    elif not salt:
        if key is None:
            sequence = np.random.SeedSequence(entropy=seed, spawn_key=(slot, attempt))
        else:
            digest = hmac.new(key, _LATENT_DOMAIN + position, hashlib.sha256).digest()
            sequence = np.random.SeedSequence(entropy=int.from_bytes(digest, "big"))
    else:
        salted = struct.pack(">H", len(salt)) + salt + position
        if key is None:
            digest = hashlib.sha256(_UNKEYED_SALTED_DOMAIN + salted).digest()
        else:
            digest = hmac.new(key, _SALTED_LATENT_DOMAIN + salted, hashlib.sha256).digest()
        sequence = np.random.SeedSequence(entropy=int.from_bytes(digest, "big"))
    return np.random.default_rng(sequence).standard_normal(dim, dtype=np.float32)


def latents_for_draws(
    draws: np.ndarray, dim: int, key: bytes | None = None, salt: bytes = b""
) -> np.ndarray:
    """(N, 4) draw rows -> (N, dim) float32 latents (see `latents_for`); a lossy delivery
    draws other candidates than PNG: a seed gives other faces in PNG and in each JPEG
    quality."""
    rows = np.asarray(draws)
    if rows.ndim != 2 or rows.shape[1] != DRAW_COLUMNS:
        raise ValueError(f"draws must be (N, {DRAW_COLUMNS}) rows; got {rows.shape}")
    if len(rows) == 0:
        return np.zeros((0, dim), dtype=np.float32)
    return np.stack(
        [
            latents_for(int(s), int(slot), int(a), dim, key, salt, int(d))
            for s, slot, a, d in rows.tolist()
        ]
    )


def load_seed_key(path: Path | None) -> bytes | None:
    """The raw bytes of FACEGATE_SEED_KEY_FILE (None when unset); ValueError if unusable."""
    if path is None:
        return None
    try:
        key = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(
            f"FACEGATE_SEED_KEY_FILE: cannot read the seed key: {exc.strerror}"
        ) from None
    if len(key) < MIN_SEED_KEY_BYTES:
        raise ValueError(
            f"FACEGATE_SEED_KEY_FILE: the seed key has {len(key)} bytes; at least "
            f"{MIN_SEED_KEY_BYTES} are needed (e.g. `head -c 32 /dev/urandom > seed.key`)"
        )
    return key


def to_uint8_images(batch: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8, validating the contract."""
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise GeneratorError(f"generator must return (N, 3, H, W); got {tuple(batch.shape)}")
    if not torch.isfinite(batch).all():
        raise GeneratorError("generator returned non-finite values")
    scaled = ((batch.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return np.ascontiguousarray(scaled.permute(0, 2, 3, 1).cpu().numpy())


class DcganGenerator(nn.Module):
    """The DCGAN tutorial generator; layer indices match the published checkpoint."""

    def __init__(self, nz: int = 100, ngf: int = 64, nc: int = 3) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False),
            nn.BatchNorm2d(ngf * 8),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf * 4),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf * 2),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False),
            nn.Tanh(),
        )

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.main(latents.reshape(latents.shape[0], -1, 1, 1))


class TorchGenerator:
    """Runs a torch module under the generator contract, one batch at a time."""

    def __init__(
        self,
        name: str,
        module: nn.Module | torch.jit.ScriptModule,
        latent_dim: int,
        model_sha256: str,
        device: torch.device,
    ) -> None:
        self.name = name
        self.latent_dim = latent_dim
        self.model_sha256 = model_sha256
        self.device = device
        self._module = module
        self._lock = threading.Lock()

    def generate(self, latents: np.ndarray) -> np.ndarray:
        latents = np.asarray(latents, dtype=np.float32)
        if latents.ndim != 2 or latents.shape[1] != self.latent_dim:
            raise GeneratorError(f"latents must be (N, {self.latent_dim}); got {latents.shape}")
        if len(latents) == 0:
            return np.zeros((0, 0, 0, 3), dtype=np.uint8)
        with self._lock, torch.inference_mode():
            # One sample per call keeps each image independent of what it was batched
            # with; a batched conv may pick another kernel and change the last bits,
            # which would break byte-identical seeded output.
            outputs = [self._module(torch.from_numpy(row[None]).to(self.device)) for row in latents]
            batch = torch.cat(outputs)
        return to_uint8_images(batch)


def load_dcgan_digiface(models_dir: Path, device: str = "cpu") -> TorchGenerator:
    path = verified_model_path(models_dir, DCGAN_DIGIFACE)
    torch_device = resolve_device(device)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        module = DcganGenerator()
        module.load_state_dict(checkpoint["netG_state_dict"])
    except Exception as exc:
        raise ModelError(f"cannot load DCGAN weights {path}: {exc}") from exc
    return TorchGenerator(
        "dcgan-digiface", module.to(torch_device).eval(), 100, DCGAN_DIGIFACE.sha256, torch_device
    )


def load_torchscript(path: Path, latent_dim: int, device: str = "cpu") -> TorchGenerator:
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"generator model {path} does not exist (FACEGATE_GENERATOR_PATH)")
    torch_device = resolve_device(device)
    module: nn.Module | torch.jit.ScriptModule
    try:
        if path.suffix == ".pt2":
            module = torch.export.load(str(path)).module()
        else:
            module = torch.jit.load(str(path), map_location=torch_device)
            module.eval()
    except Exception as exc:
        raise ModelError(f"cannot load generator model {path}: {exc}") from exc
    generator = TorchGenerator(
        f"torchscript:{path.name}", module, latent_dim, sha256_file(path), torch_device
    )
    try:
        probe = generator.generate(np.zeros((1, latent_dim), dtype=np.float32))
    except Exception as exc:
        raise ModelError(f"generator model {path} breaks the contract: {exc}") from exc
    if probe.shape[0] != 1:
        raise ModelError(f"generator model {path} returned {probe.shape[0]} images for 1 latent")
    return generator


def load_generator(
    name: str,
    models_dir: Path,
    device: str = "cpu",
    path: Path | None = None,
    latent_dim: int = 100,
) -> TorchGenerator:
    if name == "dcgan-digiface":
        return load_dcgan_digiface(models_dir, device)
    if name == "torchscript":
        if path is None:
            raise ModelError("FACEGATE_GENERATOR_PATH is required for the torchscript generator")
        return load_torchscript(path, latent_dim, device)
    raise ModelError(f"unknown generator {name!r}")
