"""Tiny TorchScript models and repository helpers shared by the model service tests."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch
from torch import nn

from demo.train import FEATURE_NAMES, FraudNet, fraud_config, save_torchscript
from demo.train import write_config as write_model_config
from infermesh.model_config import MODEL_FILE

WIDTH = len(FEATURE_NAMES)


class PairModel(nn.Module):
    """Two inputs, two outputs: `total` = a.sum(1) + b as [N, 1] (declared [-1]) and `doubled` = 2a."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (a.sum(dim=1) + b).unsqueeze(1), a * 2


def pair_config(name: str = "pair", max_batch_size: int = 8) -> dict[str, object]:
    return {
        "name": name,
        "max_batch_size": max_batch_size,
        "dynamic_batching": {"max_queue_delay_us": 500, "max_queue_size": 16},
        "inputs": [
            {"name": "a", "datatype": "FP32", "shape": [-1, 3]},
            {"name": "b", "datatype": "FP32", "shape": [-1]},
        ],
        "outputs": [
            {"name": "total", "datatype": "FP32", "shape": [-1]},
            {"name": "doubled", "datatype": "FP32", "shape": [-1, 3]},
        ],
    }


def tiny_fraud_config(name: str = "tiny_fraud", max_batch_size: int = 4) -> dict[str, object]:
    """The demo fraud signature (feature_spec → `features` [-1, 13]) with a small max_batch_size."""
    config = copy.deepcopy(fraud_config())
    config["name"] = name
    config["max_batch_size"] = max_batch_size
    return config


def tiny_fraud_module(seed: int = 0) -> FraudNet:
    torch.manual_seed(seed)
    return FraudNet(torch.zeros(WIDTH, dtype=torch.bool), torch.zeros(WIDTH), torch.ones(WIDTH))


def write_model(repo: Path, config: dict[str, object], module: nn.Module, version: str = "1") -> Path:
    """Script + save + checksum `module` as `<repo>/<name>/<version>/model.pt`, and write the config."""
    write_model_config(repo, config)
    return save_torchscript(module, repo / str(config["name"]) / version / MODEL_FILE)


def copy_model(source_repo: Path, name: str, target_repo: Path, config: dict[str, object]) -> None:
    """Copy a model's versions (weights + checksums) under a new config."""
    for version_dir in (source_repo / name).iterdir():
        if version_dir.is_dir():
            shutil.copytree(version_dir, target_repo / str(config["name"]) / version_dir.name)
    write_model_config(target_repo, config)
