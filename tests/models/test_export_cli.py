"""The export command: config rendering, checkpoints, failures (small models only, into temp repositories)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models import export, repository
from models.specs import ALL_SPECS, get_spec
from services.core.model_card import ModelCard

LOCUST = "uc6-locust"


def test_write_configs_renders_every_model_and_is_idempotent(tmp_path: Path, capsys) -> None:
    assert export.main(["--repository", str(tmp_path), "--write-configs"]) == 0
    spec = get_spec("Bigearth-net-linear-label")
    weights, _ = export.resolve_weights(spec, None)  # the bundled trained probe (make train-probe) when it ships
    for relative, text in repository.model_files(spec, weights).items():
        assert (tmp_path / relative).read_text() == text
    capsys.readouterr()
    assert export.main(["--repository", str(tmp_path), "--write-configs"]) == 0
    assert f"0 file(s) changed for {len(ALL_SPECS)} model(s)" in capsys.readouterr().out


def test_unknown_model_name_is_a_usage_error(tmp_path: Path, capsys) -> None:
    assert export.main(["--repository", str(tmp_path), "--only", "no-such-model"]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    assert export.main(["--repository", str(tmp_path), "--checkpoint-dir", str(tmp_path / "missing")]) == 2


def run_export(tmp_path: Path, checkpoints: Path | None) -> tuple[int, dict]:
    argv = ["--repository", str(tmp_path / "repo"), "--only", LOCUST, "--report", str(tmp_path / "report.json")]
    if checkpoints is not None:
        argv += ["--checkpoint-dir", str(checkpoints)]
    code = export.main(argv)
    return code, json.loads((tmp_path / "report.json").read_text())


def test_export_installs_model_config_and_report(tmp_path: Path) -> None:
    code, report = run_export(tmp_path, None)
    assert code == 0
    (entry,) = report["models"]
    assert entry["passed"] and entry["weights"] == "seeded-init:seed=6"
    assert [check["batch"] for check in entry["parity"]] == [1, 4]
    assert entry["parity"][0]["outputs"]["probability"]["max_abs_error"] <= 1e-3
    onnx_file = tmp_path / "repo" / LOCUST / "1" / "model.onnx"
    assert onnx_file.is_file() and entry["onnx_sha256"] == export.file_sha256(onnx_file)
    assert export.onnx_metadata(onnx_file)[export.METADATA_WEIGHTS] == "seeded-init:seed=6"
    assert not list(onnx_file.parent.glob("*.staging"))


def test_export_uses_a_checkpoint_and_says_so_in_the_card(tmp_path: Path) -> None:
    spec = get_spec(LOCUST)
    trained = spec.family.create_seeded(1234)  # stands in for trained weights: differs from seed 6
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    torch.save(trained.state_dict(), checkpoints / f"{LOCUST}.pt")
    code, report = run_export(tmp_path, checkpoints)
    assert code == 0
    sha = export.file_sha256(checkpoints / f"{LOCUST}.pt")
    weights = f"checkpoint:{LOCUST}.pt:sha256={sha}"
    assert report["models"][0]["weights"] == weights
    config = repository.parse_config((tmp_path / "repo" / LOCUST / "config.pbtxt").read_text())
    assert ModelCard.from_parameters(config.parameters).weights == weights
    assert weights in (tmp_path / "repo" / LOCUST / "README.md").read_text()
    # The served model computes with the checkpoint's weights, not the seeded ones.
    x = np.random.default_rng(0).standard_normal((3, 4, 2, 12, 12), dtype=np.float32)
    onnx_out = export.ort_session(tmp_path / "repo" / LOCUST / "1" / "model.onnx").run(None, {"input": x})[0]
    with torch.no_grad():
        np.testing.assert_allclose(onnx_out, trained(torch.from_numpy(x)).numpy(), atol=1e-6)
        assert not np.allclose(onnx_out, spec.family.create_seeded(spec.seed)(torch.from_numpy(x)).numpy(), atol=1e-4)


def test_a_checkpoint_that_does_not_fit_fails_without_installing(tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    torch.save({"cell.input_gates.weight": torch.zeros(3)}, checkpoints / f"{LOCUST}.pt")
    code, report = run_export(tmp_path, checkpoints)
    assert code == 1
    (entry,) = report["models"]
    assert not entry["passed"] and "does not fit" in entry["error"]
    assert not (tmp_path / "repo" / LOCUST / "1" / "model.onnx").exists()


@pytest.mark.parametrize("name", ["Bigearth-net-ssl-label", "Bigearth-net-compression-decompress-pytorch"])
def test_checkpoint_weights_string_names_file_and_hash(tmp_path: Path, name: str) -> None:
    (tmp_path / f"{name}.pt").write_bytes(b"not really a checkpoint")
    weights, path = export.resolve_weights(get_spec(name), tmp_path)
    assert path == tmp_path / f"{name}.pt"
    assert weights == f"checkpoint:{name}.pt:sha256={export.file_sha256(path)}"
    # Without a checkpoint of its own: the family's bundled trained checkpoint when it ships one, else seeded.
    spec = get_spec(name)
    bundled = spec.family.bundled_checkpoint
    expected = ((f"checkpoint:{bundled.name}:sha256={export.file_sha256(bundled)}", bundled) if bundled is not None
                else (spec.seeded_weights, None))
    assert export.resolve_weights(spec, tmp_path / "elsewhere") == expected
