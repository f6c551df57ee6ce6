"""The platform's cloud masks agree with ukis-csmask's own ``CSmask`` on real data (>= 99.9 % of pixels).

Same input for both: the working stack the card-driven functions build from the raw bands (30 m, average
resampling). Platform: ``generic_kinds.process_scene`` with inference by our inference server (a real process,
tritonclient gRPC, the committed ``model_repository/s2-cloud-mask``). Reference: ``CSmask`` run directly with its
own ONNX Runtime session. Inputs: the 42 BigEarthNet sample patches and eodal 0.2.1's full L2A scene.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

import cloud_mask_agreement as agreement
from services.wrapper import generic_kinds

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict]]:
    log = tmp_path_factory.mktemp("cloud-mask") / "inference-server.log"
    process, url = agreement.start_inference_server(agreement.REPOSITORY, [agreement.MODEL], log)
    try:
        card, config = generic_kinds.served_card(url, agreement.MODEL)
        yield url, {"card": card, "config": config}
    finally:
        agreement.stop_process(process)


def infer_for(url: str, config: dict) -> generic_kinds.InferFn:
    return generic_kinds.triton_infer(url, agreement.MODEL, config["input"][0]["name"], config["output"][0]["name"])


def test_sample_patches_agree_with_the_reference(served) -> None:
    url, model = served
    card = model["card"]
    items = agreement.sample_patches()
    assert len(items) == 42
    rows = [agreement.compare(item, card, infer_for(url, model["config"]), batch_size=4) for item in items]
    summary = agreement.summarise(rows, card)
    assert summary["agreement"] >= agreement.TARGET_AGREEMENT, agreement.format_table(rows, card)
    for row in rows:
        assert row.shape == [40, 40]  # 120 x 120 at 10 m -> 30 m
        for name in card.class_names:
            assert abs(row.platform_fractions[name] - row.reference_fractions[name]) <= 1e-3


def test_full_eodal_scene_agrees_with_the_reference_and_keeps_its_grid(served) -> None:
    url, model = served
    card = model["card"]
    item = agreement.eodal_scene()
    row = agreement.compare(item, card, infer_for(url, model["config"]), batch_size=4)
    assert row.shape == [367, 368]  # 1100 x 1103 at 10 m -> 30 m, partial edge pixels kept
    assert row.agreement >= agreement.TARGET_AGREEMENT, agreement.format_table([row], card)
    # A real scene with scattered cumulus: all three classes occur, clouds on a good share of it.
    assert row.platform_fractions["cloud"] > 0.05 and row.platform_fractions["shadow"] > 0.01
    for name in card.class_names:
        assert abs(row.platform_fractions[name] - row.reference_fractions[name]) <= 1e-3
    result = generic_kinds.process_scene(item.scene, card, infer_for(url, model["config"]), batch_size=8)
    assert np.array_equal(result.codes, row.codes)  # the batch size the server sees changes nothing
    assert result.transform is not None and result.transform.a == 30.0 and result.transform.e == -30.0
    assert (result.transform.c, result.transform.f) == (item.scene.transform.c, item.scene.transform.f)
    assert "32632" in (result.crs or "") or "UTM zone 32N" in (result.crs or "")
