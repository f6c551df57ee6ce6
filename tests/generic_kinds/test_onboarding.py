"""docs/add-your-model.md, followed literally: its code blocks run in order in a temporary directory.

Only the ports of step 4 and the server address of step 5 are replaced (free loopback ports). The model is
the guide's tiny ONNX water mask (logits +-(green - nir) reflectance), served by our inference server from the
temporary repository and run by the card-driven functions on a real sample patch (sea).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import rasterio

from services.local_platform.infra import free_ports
from services.wrapper.outputs import quicklook

PROJECT_ROOT = Path(__file__).resolve().parents[2]
GUIDE = PROJECT_ROOT / "docs" / "add-your-model.md"
PATCH = PROJECT_ROOT / "data" / "bigearthnet-sample" / "patches" / "S2A_MSIL2A_20170613T101031_39_24"
_BLOCK = re.compile(r"```(?P<language>\w+)\n# step (?P<step>\d)[^\n]*\n(?P<body>.*?)```", re.S)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")]


def guide_steps() -> dict[int, tuple[str, str]]:
    steps = {int(m["step"]): (m["language"], m["body"]) for m in _BLOCK.finditer(GUIDE.read_text())}
    assert sorted(steps) == [1, 2, 3, 4, 5], "the guide's steps changed: update this test"
    return steps


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})


def run_bash(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A directory like the project root: the guide's relative paths (.venv, data/) resolve as they do there."""
    (tmp_path / ".venv").symlink_to(PROJECT_ROOT / ".venv")
    (tmp_path / "data").symlink_to(PROJECT_ROOT / "data")
    return tmp_path


def test_the_add_your_model_guide_onboards_a_model_from_a_temporary_directory(workdir: Path) -> None:
    steps = guide_steps()
    language, code = steps[1]
    assert language == "python"
    done = run_python(code, workdir)
    assert done.returncode == 0, done.stderr
    assert (workdir / "my_repository/s2-water-demo/1/model.onnx").is_file()

    language, text = steps[2]
    (workdir / "my_repository/s2-water-demo/config.pbtxt").write_text(text)

    language, command = steps[3]
    assert language == "bash"
    checked = run_bash(command, workdir)
    assert checked.returncode == 0, checked.stderr
    assert "card schema 2 OK (sentinel2-l2a, 3 bands, pixel-classes)" in checked.stdout

    http_port, grpc_port, metrics_port = free_ports(3)
    language, command = steps[4]
    command = command.replace("8000", str(http_port)).replace("8001", str(grpc_port)).replace("8002", str(metrics_port))
    log_path = workdir / "server.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen(["bash", "-c", command + " --http-address 127.0.0.1 --grpc-address 127.0.0.1"],
                                  cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, log_path.read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/models/s2-water-demo/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)

        language, code = steps[5]
        processed = run_python(code.replace("127.0.0.1:8001", f"127.0.0.1:{grpc_port}"), workdir)
        assert processed.returncode == 0, processed.stderr
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)

    assert "'class_fractions'" in processed.stdout
    with rasterio.open(workdir / "results/water.classes.tif") as dataset:
        codes = dataset.read(1)
        assert dataset.colormap(1)[1][:3] == (0x1F, 0x78, 0xB4) and dataset.nodata == 255
    # Independently of the platform's code: water where the 20 m block mean of green exceeds that of nir.
    def block_mean(band: str) -> np.ndarray:
        with rasterio.open(next(PATCH.glob(f"*_{band}.tif"))) as dataset:
            return dataset.read(1).astype(np.float64).reshape(60, 2, 60, 2).mean(axis=(1, 3))

    expected = (block_mean("B03") > block_mean("B08")).astype(np.uint8)
    assert codes.shape == (60, 60)
    assert np.mean(codes == expected) >= 0.999
    assert codes.mean() > 0.5  # a sea patch: mostly water
    picture = quicklook.decode_png((workdir / "results/water.png").read_bytes())
    assert picture.shape == (60, 60, 3)


def test_the_guides_check_refuses_a_card_that_contradicts_the_tensors(workdir: Path) -> None:
    steps = guide_steps()
    assert run_python(steps[1][1], workdir).returncode == 0
    broken = steps[2][1].replace('"card.tile_size" value: { string_value: "64" }', '"card.tile_size" value: { string_value: "128" }')
    assert broken != steps[2][1]
    (workdir / "my_repository/s2-water-demo/config.pbtxt").write_text(broken)
    checked = run_bash(steps[3][1], workdir)
    assert checked.returncode == 1
    assert "card tile_size 128 does not match the model input dims [3, 64, 64]" in checked.stderr
