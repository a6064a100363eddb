"""`infermesh models publish`: a new version lands in the repository complete (TorchScript file plus the
SHA-256 sidecar) and pinned in the model's config.json, or not at all, and never over an existing one."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pytest
import torch

from tests.cli.runner import run_cli


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """A repository with model `fraud` (its config) and its version 1."""
    root = tmp_path / "model_repository"
    (root / "fraud" / "1").mkdir(parents=True)
    (root / "fraud" / "config.json").write_text(json.dumps({"name": "fraud"}))
    (root / "fraud" / "1" / "model.pt").write_bytes(b"version one")
    return root


@pytest.fixture
def torchscript(tmp_path: Path) -> Path:
    path = tmp_path / "candidate.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is what the model service serves
        torch.jit.save(torch.jit.script(torch.nn.Linear(3, 1)), str(path))
    return path


def leftovers(model_dir: Path) -> list[str]:
    return sorted(p.name for p in model_dir.iterdir() if p.name.startswith("."))


def test_publish_writes_the_file_and_its_checksum(repository: Path, torchscript: Path) -> None:
    result = run_cli("models", "publish", "--repository", repository, "fraud", "2", torchscript)

    assert result.returncode == 0, result.stderr
    version = repository / "fraud" / "2"
    assert sorted(p.name for p in version.iterdir()) == ["model.pt", "model.pt.sha256"]
    written = (version / "model.pt").read_bytes()
    assert written == torchscript.read_bytes()
    digest = hashlib.sha256(written).hexdigest()
    assert (version / "model.pt.sha256").read_text() == f"{digest}  model.pt\n"
    assert leftovers(repository / "fraud") == []
    assert version.stat().st_mode & 0o777 == 0o755
    torch.jit.load(str(version / "model.pt"), map_location="cpu")
    assert str(version / "model.pt") in result.stdout
    assert digest in result.stdout
    assert "infermesh models load fraud" in result.stdout
    assert (repository / "fraud" / "1" / "model.pt").read_bytes() == b"version one"
    # Pinned outside the version folder, the rest of the config kept as it was.
    config = json.loads((repository / "fraud" / "config.json").read_text())
    assert config == {"name": "fraud", "version_digests": {"2": f"sha256:{digest}"}}


def test_publish_json_and_the_repository_from_the_environment(repository: Path, torchscript: Path) -> None:
    result = run_cli(
        "models", "publish", "--json", "fraud", "10", torchscript, INFERMESH_MODEL_REPOSITORY=str(repository)
    )

    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    weights = repository / "fraud" / "10" / "model.pt"
    assert document == {
        "model": "fraud",
        "version": "10",
        "path": str(weights),
        "bytes": weights.stat().st_size,
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
    }


def test_an_existing_version_is_refused_and_left_alone(repository: Path, torchscript: Path) -> None:
    result = run_cli("models", "publish", "--repository", repository, "fraud", "1", torchscript)

    assert result.returncode == 1
    assert "version 1 of fraud exists" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in (repository / "fraud" / "1").iterdir()) == ["model.pt"]
    assert (repository / "fraud" / "1" / "model.pt").read_bytes() == b"version one"
    assert leftovers(repository / "fraud") == []


@pytest.mark.parametrize("version", ["v2", "0", "-3", "2.0", "02", ""])
def test_a_version_that_is_not_a_positive_integer_is_a_usage_error(
    repository: Path, torchscript: Path, version: str
) -> None:
    result = run_cli("models", "publish", "--repository", repository, "fraud", version, torchscript)

    assert result.returncode == 2
    assert "positive integer" in result.stderr
    assert sorted(p.name for p in (repository / "fraud").iterdir()) == ["1", "config.json"]


def test_a_file_that_is_not_torchscript_is_refused(repository: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"certainly not a zip archive")
    eager = tmp_path / "state_dict.pt"
    torch.save(torch.nn.Linear(3, 1).state_dict(), eager)  # a zip archive, but pickled weights, not TorchScript

    for candidate in (junk, eager):
        result = run_cli("models", "publish", "--repository", repository, "fraud", "2", candidate)

        assert result.returncode == 1, result.stdout
        assert f"{candidate} is not a loadable TorchScript archive" in result.stderr
        assert "Traceback" not in result.stderr
        assert sorted(p.name for p in (repository / "fraud").iterdir()) == ["1", "config.json"]


def test_an_unknown_model_is_refused(repository: Path, torchscript: Path) -> None:
    result = run_cli("models", "publish", "--repository", repository, "fruad", "1", torchscript)

    assert result.returncode == 1
    assert "no model 'fruad'" in result.stderr
    assert str(repository / "fruad" / "config.json") in result.stderr
    assert not (repository / "fruad").exists()


def test_a_missing_file_or_a_path_as_model_name_is_refused(repository: Path, tmp_path: Path) -> None:
    missing = run_cli("models", "publish", "--repository", repository, "fraud", "2", tmp_path / "nope.pt")
    assert missing.returncode == 1
    assert "nope.pt is not a file" in missing.stderr
    assert leftovers(repository / "fraud") == []

    escaping = run_cli("models", "publish", "--repository", repository, "../fraud", "2", tmp_path / "nope.pt")
    assert escaping.returncode == 2
    assert "not a model name" in escaping.stderr
