"""The tasks a Wrapper deployment can run: which model each uses, where its results go, what it reads.

The served model's card (``card.task``) must name the same family; ``classify`` and ``classify-19`` are the same
card task on two models (43 and 19 labels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping

from services.wrapper.outputs.keys import PRODUCTION_RESULT_PREFIXES
from services.wrapper.settings import TaskName

InputKind = Literal["sentinel2", "features", "codes", "era5-stack"]
GENERIC_TASK = "generic"
GENERIC_RESULT_PREFIX = "result-"  # + the model's name: result-s2-cloud-mask


@dataclass(frozen=True, slots=True)
class TaskSpec:
    name: TaskName
    card_task: str  # what the model card's ``task`` must say
    default_model: str
    result_prefix: str  # bucket-root prefix of the results (production's, where production has one)
    input_kind: InputKind
    description: str


TASKS: Mapping[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            "ssl-features", "ssl-features", "Bigearth-net-ssl-label", PRODUCTION_RESULT_PREFIXES["ssl-features"],
            "sentinel2", "Sentinel-2 patches -> 2048-d SimCLR representations",
        ),
        TaskSpec(
            "classify", "classify", "Bigearth-net-linear-label", PRODUCTION_RESULT_PREFIXES["classify"],
            "features", "representations -> probabilities of the 43 BigEarthNet labels",
        ),
        TaskSpec(
            # Production has one classifier; the 19-label one gets its own prefix so both can classify one folder.
            "classify-19", "classify", "Bigearth-net-linear-label-19", PRODUCTION_RESULT_PREFIXES["classify"] + "-19",
            "features", "representations -> probabilities of the 19 BigEarthNet-19 labels",
        ),
        TaskSpec(
            "compress", "compress", "Bigearth-net-compression-compress-pytorch", PRODUCTION_RESULT_PREFIXES["compress"],
            "sentinel2", "Sentinel-2 patches -> entropy-coded residual-VQ codes",
        ),
        TaskSpec(
            "decompress", "decompress", "Bigearth-net-compression-decompress-pytorch",
            PRODUCTION_RESULT_PREFIXES["decompress"], "codes", "codes files -> uint16 GeoTIFF patches (tar.gz)",
        ),
        TaskSpec(
            "uc5-cfactor", "uc5-cfactor", "uc5-cfactor", PRODUCTION_RESULT_PREFIXES["uc5-cfactor"],
            "sentinel2", "Sentinel-2 patches -> C-factor raster (24 x 24 pixel cells)",
        ),
        TaskSpec(
            # Any model whose card says ``task: generic``: the card drives input, tiling and output kind.
            GENERIC_TASK, GENERIC_TASK, "s2-cloud-mask", GENERIC_RESULT_PREFIX, "sentinel2",
            "Sentinel-2 inputs -> what the model card's output_kind says (class/value GeoTIFFs per patch)",
        ),
        TaskSpec(
            "uc6-locust", "uc6-locust", "uc6-locust", PRODUCTION_RESULT_PREFIXES["uc6-locust"],
            "era5-stack", "precipitation/temperature stacks -> locust suitability raster (12 x 12 cell windows)",
        ),
    )
}


def task_spec(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}") from None
