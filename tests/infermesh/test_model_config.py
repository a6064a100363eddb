"""Model configs: Triton's version policies, and configs given in Triton's own form (as tritonclient's
get_model_config returns them) for a load."""

from __future__ import annotations

import json

import pytest

from infermesh.errors import InvalidInput, NotFound, Unavailable
from infermesh.model_config import ModelConfig, ModelEntry, VersionPolicy, VersionStatus, parse_checked, parse_config


def test_version_policies_select_as_triton_does() -> None:
    available = ["1", "10", "2", "3"]
    assert VersionPolicy().select(available) == ["10"]  # the default: the newest one
    assert VersionPolicy.model_validate({"latest": {"num_versions": 2}}).select(available) == ["3", "10"]
    assert VersionPolicy.model_validate({"all": {}}).select(available) == ["1", "2", "3", "10"]
    assert VersionPolicy.model_validate({"specific": {"versions": [2, 7]}}).select(available) == ["2"]
    with pytest.raises(ValueError, match="one of latest, all, specific"):
        VersionPolicy.model_validate({"all": {}, "latest": {"num_versions": 1}})


def test_a_request_resolves_to_a_ready_version_or_says_why_not() -> None:
    config = ModelConfig.model_validate(
        {"name": "m", "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1]}], "outputs": []}
    )
    entry = ModelEntry(
        config, ["1", "2"], (VersionStatus("1", "READY"), VersionStatus("2", "READY"), VersionStatus("3", "UNLOADING"))
    )
    assert entry.resolve_version("") == "2" and entry.resolve_version("1") == "1"
    with pytest.raises(Unavailable, match="version '3' is not ready \\(UNLOADING\\)"):
        entry.resolve_version("3")
    with pytest.raises(NotFound, match="has no version '4'"):
        entry.resolve_version("4")
    with pytest.raises(Unavailable, match="no ready version"):
        ModelEntry(config, [], ()).resolve_version("")


def test_a_config_in_triton_s_form_is_taken_as_the_repository_s() -> None:
    triton = {  # as get_model_config(as_json=True)["config"] gives it: 64-bit numbers as strings
        "name": "bench_mlp",
        "platform": "pytorch_torchscript",
        "backend": "pytorch",
        "version_policy": {"specific": {"versions": ["1", "3"]}},
        "max_batch_size": 64,
        "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": ["256"]}],
        "output": [
            {"name": "y", "data_type": "TYPE_FP32", "dims": ["256"], "label_filename": "classes.txt"},
            {"name": "t", "data_type": "TYPE_STRING"},
        ],
        "dynamic_batching": {"max_queue_delay_microseconds": "2000"},
        "instance_group": [{"kind": "KIND_CPU", "count": 1}],  # Triton's own: ignored
    }
    config = parse_config(json.dumps(triton))
    assert config.max_batch_size == 64
    assert [(s.name, s.datatype, s.shape) for s in config.inputs] == [("x", "FP32", [-1, 256])]
    assert [(s.name, s.datatype, s.shape) for s in config.outputs] == [("y", "FP32", [-1, 256]), ("t", "BYTES", [-1])]
    assert [s.label_filename for s in config.outputs] == ["classes.txt", None]
    assert config.dynamic_batching.enabled and config.dynamic_batching.max_queue_delay_us == 2000
    assert config.version_policy.select(["1", "2", "3"]) == ["1", "3"]
    latest = parse_config(json.dumps({**triton, "version_policy": {"latest": {"num_versions": 2}}}))
    assert latest.version_policy.select(["1", "2", "3"]) == ["2", "3"]
    unbatched = parse_config(json.dumps({k: v for k, v in triton.items() if k != "dynamic_batching"}))
    assert not unbatched.dynamic_batching.enabled


def test_an_invalid_override_names_what_is_wrong() -> None:
    with pytest.raises(InvalidInput, match="invalid config"):
        parse_checked("m", "{not json")
    with pytest.raises(InvalidInput, match="input 'x': data_type TYPE_COMPLEX is not supported"):
        parse_checked("m", json.dumps({"name": "m", "input": [{"name": "x", "data_type": "TYPE_COMPLEX"}]}))
    with pytest.raises(InvalidInput, match="inputs"):
        parse_checked("m", json.dumps({"name": "m", "inputs": 3, "outputs": []}))
    with pytest.raises(InvalidInput, match="names model 'other'"):
        parse_checked("m", json.dumps({"name": "other", "inputs": [], "outputs": []}))


def test_monitoring_names_the_score_output_and_threshold_labels_are_judged_at() -> None:
    base = {
        "name": "m",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1]}],
        "outputs": [{"name": "a", "datatype": "FP32", "shape": [-1]}, {"name": "b", "datatype": "FP32", "shape": [-1]}],
    }
    plain = ModelConfig.model_validate(base)
    assert (plain.score_output, plain.threshold) == ("a", 0.5)  # the first output, at 0.5
    chosen = ModelConfig.model_validate({**base, "monitoring": {"score_output": "b", "threshold": 0.8}})
    assert (chosen.score_output, chosen.threshold) == ("b", 0.8)
    with pytest.raises(ValueError, match=r"monitoring\.score_output 'c' is not an output"):
        ModelConfig.model_validate({**base, "monitoring": {"score_output": "c"}})
    with pytest.raises(ValueError, match="threshold"):
        ModelConfig.model_validate({**base, "monitoring": {"threshold": 1.5}})
