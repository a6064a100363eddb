"""Unit tests of ModelServiceCore: served signature, validation messages, inference, shutdown. No network."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import torch

from infermesh.dataplane import Call, InferRequest, InferResponse
from infermesh.deadline import Deadline
from infermesh.errors import InvalidInput, NotFound, Unavailable
from infermesh.tensors import DecodedInputs, Tensor
from model_service.core import SERVER_NAME, ModelServiceCore
from model_service.settings import ModelServiceSettings
from tests.model_service.models import pair_config, tiny_fraud_module, write_model_config


@pytest.fixture
async def core(small_repo: Path) -> AsyncIterator[ModelServiceCore]:
    settings = ModelServiceSettings(model_repository=small_repo, device="cpu", replica_id="replica-7")
    core = ModelServiceCore(settings)
    assert not await core.server_ready(call())
    await core.load()
    yield core
    await core.close()


def call() -> Call:
    return Call(Deadline.after(30))


async def infer(
    core: ModelServiceCore, model: str, version: str, tensors: dict[str, Tensor], outputs: list[str] | None = None
) -> tuple[str, dict[str, np.ndarray]]:
    request = InferRequest(model, version, DecodedInputs(tensors), outputs=outputs or [])
    response = await core.infer(call(), request)
    assert isinstance(response, InferResponse)
    return response.version, {t.name: t.data for t in response.outputs}


def tensor(name: str, array: np.ndarray, datatype: str = "FP32") -> Tensor:
    return Tensor(name, datatype, tuple(array.shape), array)


def features(rows: int, width: int = 13) -> dict[str, Tensor]:
    return {"features": tensor("features", np.random.default_rng(rows).random((rows, width), dtype=np.float32))}


def pair(rows_a: int = 2, rows_b: int = 2) -> dict[str, Tensor]:
    return {
        "a": tensor("a", np.ones((rows_a, 3), dtype=np.float32)),
        "b": tensor("b", np.arange(rows_b, dtype=np.float32)),
    }


async def test_health_and_metadata_report_the_served_signature(core: ModelServiceCore) -> None:
    assert await core.server_live(call()) and await core.server_ready(call())
    assert await core.model_ready(call(), "tiny_fraud", "") and await core.model_ready(call(), "tiny_fraud", "1")
    assert not await core.model_ready(call(), "tiny_fraud", "2") and not await core.model_ready(call(), "nope", "")
    server = await core.server_metadata(call())
    assert server.name == SERVER_NAME and server.replica_id == "replica-7"

    fraud = await core.model_metadata(call(), "tiny_fraud", "")
    # The public inputs are user_id/merchant_id/amount; this hop serves the joined feature tensor.
    assert [(s.name, s.datatype, s.shape) for s in fraud.inputs] == [("features", "FP32", [-1, 13])]
    assert [(s.name, s.datatype, s.shape) for s in fraud.outputs] == [("fraud_probability", "FP32", [-1])]
    assert fraud.versions == ["1"] and fraud.platform == "pytorch_torchscript"
    assert [s.name for s in (await core.model_metadata(call(), "pair", "")).inputs] == ["a", "b"]
    with pytest.raises(NotFound):
        await core.model_metadata(call(), "nope", "")
    with pytest.raises(NotFound):
        await core.model_metadata(call(), "pair", "9")


async def test_infer_returns_the_models_outputs(core: ModelServiceCore) -> None:
    inputs = features(3)
    version, outputs = await infer(core, "tiny_fraud", "", inputs)
    assert version == "1"
    expected = tiny_fraud_module()(torch.from_numpy(inputs["features"].data)).detach().numpy().reshape(3)
    np.testing.assert_allclose(outputs["fraud_probability"], expected, rtol=1e-6)

    _, both = await infer(core, "pair", "1", pair())
    assert list(both) == ["total", "doubled"]
    np.testing.assert_array_equal(both["total"], [3.0, 4.0])
    _, only = await infer(core, "pair", "1", pair(), outputs=["doubled"])
    assert list(only) == ["doubled"]


@pytest.mark.parametrize(
    ("model", "inputs", "message"),
    [
        pytest.param(
            "tiny_fraud",
            {"features": tensor("features", np.zeros((2, 13), dtype=np.float64), "FP64")},
            "input 'features': datatype FP64 does not match FP32",
            id="wrong-datatype",
        ),
        pytest.param(
            "tiny_fraud", features(2, width=12), "input 'features': shape [2, 12] does not match [-1, 13]", id="width"
        ),
        pytest.param(
            "tiny_fraud",
            {"features": tensor("features", np.zeros(13, dtype=np.float32))},
            "input 'features': shape [13] does not match [-1, 13]",
            id="rank",
        ),
        pytest.param(
            "tiny_fraud",
            features(65),
            "input 'features': batch size 65 exceeds the max_batch_size 4 of model 'tiny_fraud'",
            id="oversized",
        ),
        pytest.param("tiny_fraud", features(0), "model 'tiny_fraud': request has an empty batch", id="empty"),
        pytest.param("pair", {"a": pair()["a"]}, "input 'b' is missing (model 'pair' needs it)", id="missing"),
        pytest.param(
            "tiny_fraud",
            {**features(2), "extra": tensor("extra", np.zeros(2, dtype=np.float32))},
            "input 'extra' is not an input of model 'tiny_fraud'",
            id="unknown-input",
        ),
        pytest.param(
            "pair", pair(2, 3), "input 'b': batch size 3 differs from input 'a' batch size 2", id="batch-mismatch"
        ),
    ],
)
async def test_invalid_inputs_name_the_tensor_and_the_problem(
    core: ModelServiceCore, model: str, inputs: dict[str, Tensor], message: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        await infer(core, model, "", inputs)
    assert str(caught.value).startswith(message)


async def test_a_request_over_the_batch_limit_runs_in_passes_within_it(core: ModelServiceCore) -> None:
    """A router's batch built under a larger limit, just before a config change shrank it, is served."""
    ten = features(10)  # tiny_fraud's max_batch_size is 4
    response = await core.infer(Call(Deadline.after(5)), InferRequest("tiny_fraud", "", DecodedInputs(ten)))
    assert isinstance(response, InferResponse)
    (output,) = response.outputs
    assert output.shape[0] == 10
    last = {"features": tensor("features", ten["features"].data[9:])}
    one = await core.infer(Call(Deadline.after(5)), InferRequest("tiny_fraud", "", DecodedInputs(last)))
    assert isinstance(one, InferResponse)
    assert np.allclose(output.data[9], one.outputs[0].data[0])  # the last pass's row, as if sent alone


async def test_unknown_output_is_invalid(core: ModelServiceCore) -> None:
    with pytest.raises(InvalidInput, match="requested output 'nope' is not an output of model 'pair'"):
        await infer(core, "pair", "", pair(), outputs=["total", "nope"])


async def test_unknown_model_or_version_is_not_found(core: ModelServiceCore) -> None:
    with pytest.raises(NotFound, match="model 'nope' not found"):
        await infer(core, "nope", "", features(1))
    with pytest.raises(NotFound, match="model 'tiny_fraud' has no version '2'"):
        await infer(core, "tiny_fraud", "2", features(1))


async def test_repository_index_lists_refused_versions_with_the_reason(small_repo: Path) -> None:
    write_model_config(small_repo, {**pair_config(), "version_digests": {"1": "sha256:" + "0" * 64}})
    core = ModelServiceCore(ModelServiceSettings(model_repository=small_repo, device="cpu"))
    await core.load()
    index = {(e.name, e.version): e for e in await core.repository_index(call(), False)}
    assert index[("tiny_fraud", "1")].state == "READY"
    assert index[("pair", "1")].state == "UNAVAILABLE"
    assert "SHA-256 mismatch" in index[("pair", "1")].reason
    assert [e.name for e in await core.repository_index(call(), True)] == ["tiny_fraud"]
    assert await core.server_ready(call()) and not await core.model_ready(call(), "pair", "")
    await core.close()


async def test_closed_core_is_not_ready_and_refuses(core: ModelServiceCore) -> None:
    await core.close()
    assert not await core.server_ready(call()) and not await core.model_ready(call(), "tiny_fraud", "")
    with pytest.raises(Unavailable):
        await infer(core, "tiny_fraud", "", features(1))
