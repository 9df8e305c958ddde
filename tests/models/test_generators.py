from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from filter.errors import ModelError
from service.generators import latents_for, load_dcgan_digiface, load_torchscript


class TinyGenerator(nn.Module):
    """A latent (N, 8) -> (N, 3, 16, 16) image in [-1, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3 * 16 * 16)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(z)).reshape(-1, 3, 16, 16)


class WrongChannels(nn.Module):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.zeros(z.shape[0], 1, 16, 16)


def test_torchscript_generator_follows_the_contract(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.script(TinyGenerator()), str(path))
    generator = load_torchscript(path, latent_dim=8)
    latents = np.stack([latents_for(1, s, 0, 8) for s in range(5)])
    images = generator.generate(latents)
    assert images.shape == (5, 16, 16, 3) and images.dtype == np.uint8
    assert images.min() < 64 and images.max() > 192  # the full [-1, 1] range is used
    assert np.array_equal(images, generator.generate(latents))
    assert len(generator.model_sha256) == 64


def test_torch_export_generator_loads(tmp_path: Path) -> None:
    path = tmp_path / "tiny.pt2"
    exported = torch.export.export(
        TinyGenerator(),
        (torch.zeros(2, 8),),
        dynamic_shapes={"z": {0: torch.export.Dim("batch", min=1, max=1024)}},
    )
    torch.export.save(exported, str(path))
    generator = load_torchscript(path, latent_dim=8)
    assert generator.generate(np.zeros((3, 8), np.float32)).shape == (3, 16, 16, 3)


def test_generator_breaking_the_contract_is_refused_at_load(tmp_path: Path) -> None:
    path = tmp_path / "wrong.pt"
    torch.jit.save(torch.jit.script(WrongChannels()), str(path))
    with pytest.raises(ModelError, match="breaks the contract"):
        load_torchscript(path, latent_dim=8)
    with pytest.raises(ModelError, match="does not exist"):
        load_torchscript(tmp_path / "missing.pt", latent_dim=8)


def test_dcgan_output_does_not_depend_on_batch_composition(models_dir: Path) -> None:
    generator = load_dcgan_digiface(models_dir)
    latents = np.stack([latents_for(3, s, 0, 100) for s in range(6)])
    together = generator.generate(latents)
    apart = np.concatenate([generator.generate(latents[i : i + 1]) for i in range(6)])
    assert together.shape == (6, 64, 64, 3)
    assert np.array_equal(together, apart)


def test_latents_are_a_pure_function_of_seed_slot_attempt() -> None:
    a = latents_for(7, 2, 1, 100)
    assert np.array_equal(a, latents_for(7, 2, 1, 100))
    assert not np.array_equal(a, latents_for(7, 2, 2, 100))
    assert not np.array_equal(a, latents_for(7, 3, 1, 100))
    assert not np.array_equal(a, latents_for(8, 2, 1, 100))
    assert a.dtype == np.float32 and abs(float(a.mean())) < 0.5
