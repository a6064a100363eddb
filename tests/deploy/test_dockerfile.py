"""The Dockerfile and .dockerignore: lint-clean, multi-stage, non-root, stubs generated at build time."""

from __future__ import annotations

import fnmatch
import re
import subprocess

from tests.deploy.artifacts import BIN, ROOT, SERVICES

DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes; a pattern matches a path or its parents."""
    verdict = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in dockerignore():
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!")
        regex = fnmatch.translate(pattern.replace("**/", "\x00")).replace("\x00", "(?:.*/)?")
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            verdict = not negate
    return verdict


def test_hadolint_passes() -> None:
    result = subprocess.run(
        [str(BIN / "hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_stages_and_variants() -> None:
    steps = instructions()
    froms = [args for keyword, args in steps if keyword == "FROM"]
    stages = {args.split(" AS ")[-1] for args in froms if " AS " in args}
    assert {"base-cpu", "base-cuda", "base", "builder", "runtime"} <= stages
    assert froms[-1] == "base AS runtime", "the last stage is the runtime image"
    assert "base-${VARIANT} AS base" in froms, "VARIANT selects the base stage"
    global_args = dict(arg.split("=", 1) for keyword, arg in steps[: steps.index(("FROM", froms[0]))] if "=" in arg)
    assert global_args["VARIANT"] == "cpu", "CPU is the default variant"
    assert "nvidia/cuda" in global_args["CUDA_IMAGE"]
    assert global_args["PYTHON_IMAGE"].startswith("python:3.11-slim")
    torch_indexes = [arg for keyword, arg in steps if keyword == "ARG" and arg.startswith("TORCH_INDEX_URL=")]
    assert torch_indexes == [
        "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu",
        "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128",
    ]


def test_runtime_stage_is_slim_and_non_root() -> None:
    steps = instructions()
    runtime = steps[steps.index(("FROM", "base AS runtime")) :]
    copies = [args for keyword, args in runtime if keyword == "COPY"]
    assert copies == [
        "--from=builder /opt/venv /opt/venv",
        "--chmod=0755 deploy/docker/grpc_health_check.py /usr/local/bin/grpc-health-check",
    ], "the runtime image gets the venv and the health check, nothing else (no sources, no demo data)"
    users = [args for keyword, args in runtime if keyword == "USER"]
    assert users == ["10001:10001"]
    assert ("ENTRYPOINT", '["python", "-m"]') in runtime
    command = next(args for keyword, args in runtime if keyword == "CMD")
    assert command.strip('[]"') in SERVICES


def test_protos_are_generated_at_build_time() -> None:
    steps = instructions()
    builder = steps[steps.index(("FROM", "base AS builder")) : steps.index(("FROM", "base AS runtime"))]
    runs = " ".join(args for keyword, args in builder if keyword == "RUN")
    makefile_protoc = re.search(r"-m grpc_tools\.protoc (.*) \$\(PROTOS\)", (ROOT / "Makefile").read_text())
    assert makefile_protoc, "Makefile proto target changed"
    assert f"python -m grpc_tools.protoc {makefile_protoc.group(1)} protos/*.proto" in runs, "same protoc as make proto"
    assert runs.index("grpc_tools.protoc") < runs.index("--no-deps -c constraints.txt ."), "stubs before install"
    for generated in ("infermesh/proto/inference_pb2.py", "infermesh/proto/inference_pb2_grpc.py"):
        assert ignored(generated), f"{generated} must come from protoc in the image, not the checkout"
    assert not ignored("infermesh/proto/__init__.py")


def test_copied_sources_exist_and_are_in_the_context() -> None:
    for keyword, args in instructions():
        if keyword != "COPY" or "--from=" in args:
            continue
        sources = [part for part in args.split() if not part.startswith("--")][:-1]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: missing"
            assert not ignored(source.rstrip("/")), f"COPY {source}: excluded by .dockerignore"


def test_every_package_the_project_installs_is_copied() -> None:
    copied = {args.split()[0].rstrip("/") for keyword, args in instructions() if keyword == "COPY"}
    for package in ("infermesh", "gateway", "router", "feature_service", "model_service", "demo", "examples"):
        assert package in copied, f"{package}/ is not copied into the build stage"


def test_dockerignore_keeps_local_state_out() -> None:
    for path in (".venv/bin/python", ".run/demo/model_repository/fraud/1/model.pt", "bench/results/run.json",
                 ".git/HEAD", ".pytest_cache/v", ".ruff_cache/x", "gateway/__pycache__/core.cpython-311.pyc",
                 "dump.rdb", "tests/conftest.py"):  # fmt: skip
        assert ignored(path), f"{path} would be sent to the Docker daemon"
    for path in ("pyproject.toml", "constraints.txt", "protos/inference.proto", "gateway/core.py"):
        assert not ignored(path), f"{path} is needed by the build"
