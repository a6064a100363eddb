"""Fixtures of the model service tests: repositories built on the fly.

Nothing here imports infermesh.proto.inference_pb2 (nor model_service.servicer/server): the integration
tests use tritonclient, whose protos clash with ours in protobuf's default descriptor pool.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from demo.train import train_fraud_model, write_bench_model
from tests.model_service.models import PairModel, pair_config, tiny_fraud_config, tiny_fraud_module, write_model


@pytest.fixture
def small_repo(tmp_path: Path) -> Path:
    """`pair` (two inputs, no feature_spec) and `tiny_fraud` (feature_spec signature), untrained."""
    repo = tmp_path / "repo"
    write_model(repo, pair_config(), PairModel())
    write_model(repo, tiny_fraud_config(), tiny_fraud_module())
    return repo


@pytest.fixture(scope="session")
def demo_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real demo repository: trained `fraud` and `bench_mlp`, as `python -m demo.train` writes it."""
    repo = tmp_path_factory.mktemp("demo") / "model_repository"
    train_fraud_model(repo)
    write_bench_model(repo)
    return repo
