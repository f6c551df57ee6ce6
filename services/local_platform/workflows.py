"""The sample workflows and their inputs, built as the DSL and the data provider would build them.

- Input data for Sentinel-2 steps: real BigEarthNet patches from ``data/bigearthnet-sample``, packed as one tar.gz
  per component (D3.4 3.2.2), members ``<patch>/<patch>_<BAND>.tif``.
- UC6 input: no ERA5 sample ships with the project, so the demo generates a seeded, SYNTHETIC 4-day
  precipitation/temperature stack (8-band float32 GeoTIFF, EPSG:4326) with plausible Sahel values and a sea strip
  (NaN) in one corner; it exercises the pipeline, it is not a forecast.
- Workflow messages: contracts section 1, one per ML step, published to ``system.ML``; step messages: section 3.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

SAMPLE_ROOT = Path(__file__).resolve().parents[2] / "data" / "bigearthnet-sample"
UC6_DAYS = 4
UC6_SIZE = 48  # cells per side: 4 x 4 windows of 12 x 12


@dataclass(frozen=True)
class StepPlan:
    service: str  # ML.ServiceName = the Wrapper (task) that runs the step
    component_name: str
    topic_in: str
    topic_out: str


@dataclass
class WorkflowPlan:
    """One workflow: its steps in order, its bucket and where its input lies."""

    name: str
    title: str
    kind: str  # one of WORKFLOW_KINDS
    steps: list[StepPlan]
    bucket: str
    input_folder: str
    patches: list[str] = field(default_factory=list)

    @property
    def first_topic(self) -> str:
        return self.steps[0].topic_in

    @property
    def final_topic(self) -> str:
        return self.steps[-1].topic_out

    @property
    def topics(self) -> list[str]:
        names = [s.topic_in for s in self.steps] + [self.final_topic]
        return names + [f"{s.topic_in}.dlq" for s in self.steps]


def sample_patch_names(root: Path = SAMPLE_ROOT) -> list[str]:
    index = json.loads((root / "index.json").read_text())
    return sorted(entry["patch"] for entry in index)


def sample_labels(root: Path = SAMPLE_ROOT) -> dict[str, list[str]]:
    return {entry["patch"]: entry["labels"] for entry in json.loads((root / "index.json").read_text())}


def pack_patches(names: Sequence[str], root: Path = SAMPLE_ROOT) -> bytes:
    """A tar.gz of BigEarthNet patch folders (band TIFFs only), deterministic bytes for the same patches."""
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as compressed:
        with tarfile.open(fileobj=compressed, mode="w") as archive:
            for name in names:
                folder = root / "patches" / name
                band_files = sorted(folder.glob(f"{name}_B*.tif"))
                if not band_files:
                    raise FileNotFoundError(f"no band files for patch {name} under {folder}")
                for path in band_files:
                    data = path.read_bytes()
                    info = tarfile.TarInfo(f"{name}/{path.name}")
                    info.size, info.mode, info.mtime = len(data), 0o644, 0
                    archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def synthetic_uc6_stack(seed: int = 6, size: int = UC6_SIZE) -> np.ndarray:
    """float32 [4, 2, size, size]: daily precipitation (mm/day) and 2 m temperature (K), oldest day first.

    Mostly dry warm days with a rain cell moving across the area (what makes breeding conditions differ between
    windows), a north-south temperature gradient, and NaN over a sea strip in the last window row (sea cells are
    nodata in ERA5-Land)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    stack = np.empty((UC6_DAYS, 2, size, size), dtype=np.float32)
    for day in range(UC6_DAYS):
        centre_r, centre_c = size * 0.3 + day * size * 0.1, size * 0.2 + day * size * 0.15
        rain = 25.0 * np.exp(-(((rows - centre_r) ** 2 + (cols - centre_c) ** 2) / (2 * (size * 0.15) ** 2)))
        stack[day, 0] = np.maximum(rain + rng.gamma(0.3, 0.5, (size, size)) - 0.2, 0.0)
        stack[day, 1] = 301.0 - rows * 0.12 + rng.normal(0.0, 0.6, (size, size)) + day * 0.3
    stack[:, :, size - 12:, size - 8:] = np.nan
    return stack


def uc6_geotiff(stack: np.ndarray, west: float = 14.0, north: float = 17.0, cell_deg: float = 0.1) -> bytes:
    """The stack as the 8-band float32 GeoTIFF the UC6 Wrapper reads (band k = day k // 2, variable k % 2)."""
    import rasterio
    from affine import Affine
    from rasterio.io import MemoryFile

    days, variables, height, width = stack.shape
    with MemoryFile() as memory:
        with memory.open(driver="GTiff", width=width, height=height, count=days * variables, dtype="float32",
                         crs=rasterio.crs.CRS.from_epsg(4326),
                         transform=Affine(cell_deg, 0.0, west, 0.0, -cell_deg, north),
                         nodata=float("nan")) as dataset:
            dataset.write(stack.reshape(days * variables, height, width))
            for band in range(days * variables):
                variable = ("precipitation_mm_per_day", "temperature_2m_K")[band % 2]
                dataset.set_band_description(band + 1, f"day{band // 2}_{variable}")
        return memory.read()


def workflow_message(plan: WorkflowPlan, step: StepPlan, status: str, namespace: str, s3_endpoint: str,
                     access_key_id: str, secret_access_key: str, region: str = "us-east-1") -> dict[str, Any]:
    """The DSL's message for one ML step (contracts section 1)."""
    message: dict[str, Any] = {
        "workflow_name": plan.name,
        "workflow_status": status,
        "Topics": {"in": step.topic_in, "out": step.topic_out},
        "ML": {"ServiceName": step.service, "Namespace": namespace, "component_name": step.component_name},
    }
    if status == "published":
        message["S3_bucket"] = {"aws_access_key_id": access_key_id, "aws_secret_access_key": secret_access_key,
                                "s3-bucket-name": plan.bucket, "region_name": region, "endpoint_url": s3_endpoint}
    return message


# Every sample workflow; ``make demo`` runs DEMO_WORKFLOWS (the residual-VQ chain on request: --workflows).
WORKFLOW_KINDS = ("ssl-classify", "compress-decompress", "compress-decompress-rvq", "uc5", "uc6", "cloud-mask")
DEMO_WORKFLOWS = ("ssl-classify", "compress-decompress", "uc5", "uc6", "cloud-mask")
COMPRESSION_KINDS = ("compress-decompress", "compress-decompress-rvq")


def step_message(folder: str, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the previous component announces (contracts section 3)."""
    return {"previous_component_end": "True", "S3_bucket_desc": {"folder": folder, "filename": ""},
            "meta_information": meta or {}}


def demo_workflows(run_id: str, bucket: str, patches: Sequence[str], kinds: Sequence[str] | None = None
                   ) -> list[WorkflowPlan]:
    """The integration workflows of D3.4 3.2.3 (SSL -> classifier, compression -> decompression with the transform
    coder or the residual-VQ codec) plus UC5, UC6 and the cloud mask, with topic names unique to this run;
    ``kinds`` None: DEMO_WORKFLOWS."""
    def topic(*parts: str) -> str:
        return ".".join(("eoml", "demo", run_id, *parts))

    chosen = list(patches)
    plans = {
        "ssl-classify": WorkflowPlan(
            f"demo-{run_id}-ssl-classify", "SSL features -> BigEarthNet classifier", "ssl-classify",
            [StepPlan("ssl-features", "SSL feature extractor", topic("ssl", "in"), topic("classify", "in")),
             StepPlan("classify", "BigEarthNet classifier", topic("classify", "in"), topic("classify", "out"))],
            bucket, f"inputs/{run_id}/ssl-classify", chosen),
        "compress-decompress": WorkflowPlan(
            f"demo-{run_id}-compression", "Learned compression -> decompression", "compress-decompress",
            [StepPlan("compress", "Compression", topic("compress", "in"), topic("decompress", "in")),
             StepPlan("decompress", "Decompression", topic("decompress", "in"), topic("decompress", "out"))],
            bucket, f"inputs/{run_id}/compression", chosen),
        # The same two tasks on the residual-VQ models: the Wrappers compress-rvq/decompress-rvq (chart wrappers.tasks).
        "compress-decompress-rvq": WorkflowPlan(
            f"demo-{run_id}-compression-rvq", "Residual-VQ compression -> decompression", "compress-decompress-rvq",
            [StepPlan("compress-rvq", "Compression (residual VQ)", topic("compress-rvq", "in"),
                      topic("decompress-rvq", "in")),
             StepPlan("decompress-rvq", "Decompression (residual VQ)", topic("decompress-rvq", "in"),
                      topic("decompress-rvq", "out"))],
            bucket, f"inputs/{run_id}/compression-rvq", chosen),
        "uc5": WorkflowPlan(
            f"demo-{run_id}-uc5", "UC5 soil erosion: C-factor", "uc5",
            [StepPlan("uc5-cfactor", "C-factor regressor", topic("uc5", "in"), topic("uc5", "out"))],
            bucket, f"inputs/{run_id}/uc5", chosen),
        "cloud-mask": WorkflowPlan(
            f"demo-{run_id}-cloud-mask", "Cloud / shadow mask (ukis-csmask, trained) with quicklooks", "cloud-mask",
            [StepPlan("cloud-mask", "Cloud mask", topic("cloud-mask", "in"), topic("cloud-mask", "out"))],
            bucket, f"inputs/{run_id}/cloud-mask", chosen),
        "uc6": WorkflowPlan(
            f"demo-{run_id}-uc6", "UC6 locust breeding suitability (synthetic ERA5-like input)", "uc6",
            [StepPlan("uc6-locust", "Locust classifier", topic("uc6", "in"), topic("uc6", "out"))],
            bucket, f"inputs/{run_id}/uc6", []),
    }
    return [plans[k] for k in (kinds or DEMO_WORKFLOWS)]


def input_objects(plan: WorkflowPlan) -> dict[str, bytes]:
    """The objects to upload under ``plan.input_folder`` (key -> bytes)."""
    if plan.kind == "uc6":
        return {f"{plan.input_folder}/era5-sahel-synthetic.tif": uc6_geotiff(synthetic_uc6_stack())}
    return {f"{plan.input_folder}/bigearthnet-{len(plan.patches)}-patches.tar.gz": pack_patches(plan.patches)}
