"""How fast the 42 sample patches stream out of a tar.gz served by moto: printed, never asserted.

Run: .venv/bin/python -m pytest tests/wrapper/test_input_throughput.py -q -s
"""

from __future__ import annotations

import time

import pytest

from services.wrapper.inputs import InputPatch, S3Access, read_input
from services.wrapper.inputs.s3_listing import S3Client
from wrapper_input_data import sample_patch_names, sample_tar_gz

RUNS = 3


def test_report_tar_gz_read_rate(
    s3_access: S3Access, s3_client: S3Client, capsys: pytest.CaptureFixture[str]
) -> None:
    names = sample_patch_names()
    archive = sample_tar_gz(names, top_dir="bigearthnet/")
    s3_client.put_object(Bucket=s3_access.bucket_name, Key="bench/sample.tar.gz", Body=archive)

    seconds = []
    for _ in range(RUNS):
        started = time.perf_counter()
        patches = sum(isinstance(item, InputPatch) for item in read_input(s3_access, "bench"))
        seconds.append(time.perf_counter() - started)
        assert patches == len(names)

    with capsys.disabled():
        best, worst = min(seconds), max(seconds)
        print(
            f"\n[wrapper input] tar.gz of {len(names)} sample patches ({len(archive) / 1e6:.1f} MB) from moto on "
            f"loopback, list+GET+gunzip+untar+decode, {RUNS} runs: best {len(names) / best:.1f} patches/s "
            f"({best * 1000:.0f} ms), worst {len(names) / worst:.1f} patches/s ({worst * 1000:.0f} ms)"
        )
