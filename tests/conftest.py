"""Shared fixtures: one small seeded state dict built in code, as a dict and saved as a .pt file.

The other layouts wcond reads (safetensors, shards, Lightning, shrunk files) are built by the
test modules that need them, from this state dict or their own.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def small_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny CNN + MLP state dict with one planted anti-parallel filter pair (conv2 rows 1 and 4)."""
    g = torch.Generator().manual_seed(seed)
    sd = {
        "conv1.weight": torch.randn(8, 3, 3, 3, generator=g),
        "conv1.bias": torch.randn(8, generator=g),
        "bn1.weight": torch.ones(8),
        "bn1.running_mean": torch.zeros(8),
        "bn1.num_batches_tracked": torch.tensor(7),
        "conv2.weight": torch.randn(16, 8, 3, 3, generator=g),
        "fc.weight": torch.randn(10, 64, generator=g),
        "fc.bias": torch.randn(10, generator=g),
    }
    sd["conv2.weight"][4] = -0.5 * sd["conv2.weight"][1]
    return sd


@pytest.fixture
def state_dict() -> dict[str, torch.Tensor]:
    return small_state_dict()


@pytest.fixture
def pt_file(tmp_path: Path, state_dict: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "model.pt"
    torch.save(state_dict, path)
    return path


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        help="Rewrite tests/golden/* from the current output.",
    )


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-golden"))
