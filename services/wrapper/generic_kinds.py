"""Card-driven processing of Sentinel-2 inputs for models the Wrapper has no code for (card ``task: generic``).

Plain functions, no I/O besides the ``infer`` callable the caller passes in, so the service shell stays thin
and tests call them directly:

1. ``working_stack``: bands at their native resolutions -> float32 [C, H, W] on the working grid of the card
   (``working_resolution_m`` with ``resampling``; the 10 m grid and ``resampling_20m`` otherwise), the
   georeferencing of that grid, and the mask of pixels without data (every band equal to ``nodata_value``,
   or NaN);
2. ``model_input``: reflectance scaling ``(DN + offset) * reflectance_scale`` (offset: the product's
   ``BOA_ADD_OFFSET`` when the card says ``reflectance_offset: product``) and the card's normalisation;
3. ``run_tiles``: tiles with overlap and padding (``services.core.tiling``), a batched ``infer`` call;
4. per output kind: ``pixel_classes`` (class raster + colour table, class fractions), ``pixel_values``
   (value raster, NaN where no data), ``tile_vectors`` / ``tile_class_probabilities`` (one record per tile).

``process_scene`` runs 1-4 for a per-pixel card, ``process_tiles`` for a per-tile card (full, non-overlapping
tiles with data). ``class_share`` gives e.g. the cloud cover (cloud + shadow) of a class result,
``manifest_entry`` what a manifest records, ``product_boa_add_offset`` the offset from ``MTD_MSIL2A.xml``,
``triton_infer`` / ``served_card`` the served model as an ``infer`` callable and its checked card. The reference
for the cloud-mask card is ``ukis_csmask.CSmask``: same tiling, softmax, Tukey blending and argmax
(``tests/generic_kinds``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from affine import Affine

from services.core import sentinel2, tiling
from services.core.model_card import (
    CLASS_NODATA_CODE,
    PIXEL_OUTPUT_KINDS,
    SENTINEL2_INPUT_KINDS,
    ModelCard,
    class_colour_table,
)

# A batch of model inputs [N, C, T, T] -> the model's output for them [N, ...].
InferFn = Callable[[np.ndarray], np.ndarray]

NATIVE_GRID_M = 10.0  # the grid ``SceneBands.transform`` describes (Sentinel-2's finest bands)
# Stand-in CRS for resampling an input without georeferencing (source and target share it: no reprojection).
_LOCAL_CRS = "EPSG:32631"


class InputRejected(ValueError):
    """The input cannot be processed as the card says (missing band, bad shape, nodata under 'reject')."""


@dataclass(frozen=True, slots=True)
class SceneBands:
    """What an input layer read: band name -> 2-D array at the band's native resolution, all over one footprint.

    ``transform``/``crs`` describe the 10 m grid of the footprint (``None`` without georeferencing);
    ``boa_add_offset`` is the product's ``BOA_ADD_OFFSET`` in DN (L2A processing baseline >= 04.00: -1000;
    older products and BigEarthNet: 0).
    """

    bands: Mapping[str, np.ndarray]
    transform: Affine | None = None
    crs: str | None = None
    boa_add_offset: float = 0.0

    def grid_shape(self) -> tuple[int, int]:
        """(rows, cols) of the 10 m grid: the largest band (a 10 m band when there is one)."""
        shapes = [np.shape(array) for array in self.bands.values()]
        if not shapes:
            raise InputRejected("the input has no bands")
        return max(shape[0] for shape in shapes), max(shape[1] for shape in shapes)


@dataclass(frozen=True, slots=True)
class WorkingStack:
    """Bands on the working grid: ``values`` float32 [C, H, W] in input units (DN), ``nodata`` bool [H, W]."""

    values: np.ndarray
    nodata: np.ndarray
    transform: Affine | None
    crs: str | None
    resolution_m: float


def product_boa_add_offset(metadata_xml: bytes) -> float:
    """``BOA_ADD_OFFSET`` of an L2A product from its ``MTD_MSIL2A.xml`` (0 before processing baseline 04.00,
    which has no such element). The offset is one value for every band in the products ESA publishes; a
    product whose bands differ is refused rather than half-corrected."""
    import xml.etree.ElementTree as ElementTree

    try:
        root = ElementTree.fromstring(metadata_xml)
    except ElementTree.ParseError as error:
        raise InputRejected(f"product metadata is not readable XML ({error})") from None
    values = {element.text.strip() for element in root.iter() if element.tag.rsplit("}", 1)[-1] == "BOA_ADD_OFFSET"
              and element.text and element.text.strip()}
    if not values:
        return 0.0
    try:
        offsets = {float(value) for value in values}
    except ValueError:
        raise InputRejected(f"BOA_ADD_OFFSET values {sorted(values)} are not numbers") from None
    if len(offsets) != 1:
        raise InputRejected(f"BOA_ADD_OFFSET differs between bands ({sorted(offsets)}); one offset per product expected")
    return offsets.pop()


def _check_bands(scene: SceneBands, card: ModelCard) -> None:
    if card.input_kind not in SENTINEL2_INPUT_KINDS:
        raise ValueError(f"model card input_kind is {card.input_kind!r}; the generic kinds read Sentinel-2")
    missing = [band for band in card.bands if band not in scene.bands]
    if missing:
        raise InputRejected(f"missing band {', '.join(missing)} (have {', '.join(sorted(scene.bands))})")
    for band in card.bands:
        array = np.asarray(scene.bands[band])
        if array.ndim != 2 or 0 in array.shape:
            raise InputRejected(f"band {band} has shape {array.shape}; expected a 2-D raster")
        if array.dtype.kind not in "uif":
            raise InputRejected(f"band {band} has dtype {array.dtype}; expected an integer or float raster")


def _nodata_mask(values: np.ndarray, card: ModelCard) -> np.ndarray:
    nodata = np.isnan(values).any(axis=0)
    if card.nodata_value is not None:
        nodata |= np.all(values == np.float32(card.nodata_value), axis=0)
    return nodata


def working_grid(scene: SceneBands, resolution_m: float) -> tuple[int, int, Affine]:
    """(rows, cols, transform) of the working grid over the scene's footprint (partial edge pixels kept)."""
    rows, cols = scene.grid_shape()
    factor = resolution_m / NATIVE_GRID_M
    base = scene.transform if scene.transform is not None else Affine(NATIVE_GRID_M, 0, 0, 0, -NATIVE_GRID_M, 0)
    return math.ceil(rows / factor - 1e-9), math.ceil(cols / factor - 1e-9), base @ Affine.scale(factor)


def working_stack(scene: SceneBands, card: ModelCard) -> WorkingStack:
    """The card's bands, in the card's order, on the card's working grid (see the module docstring)."""
    _check_bands(scene, card)
    if card.working_resolution_m > 0:
        return _resampled_stack(scene, card)
    rows, cols = scene.grid_shape()
    if rows != cols:
        raise InputRejected(f"the 10 m grid {rows} x {cols} is not square; a card without working_resolution_m needs square patches")
    try:
        values = sentinel2.stack_bands({b: scene.bands[b] for b in card.bands}, card.bands,
                                       card.resampling_20m or "bilinear", size=rows)
    except ValueError as error:
        raise InputRejected(str(error)) from None
    nodata = _nodata_mask(values, card)
    values[np.isnan(values)] = 0.0
    return WorkingStack(values, nodata, scene.transform, scene.crs, NATIVE_GRID_M)


def _resampled_stack(scene: SceneBands, card: ModelCard) -> WorkingStack:
    from services.wrapper.gdal_policy import parse_crs
    from rasterio.enums import Resampling
    from rasterio.errors import NotGeoreferencedWarning
    from rasterio.warp import reproject

    rows10, cols10 = scene.grid_shape()
    rows, cols, transform = working_grid(scene, card.working_resolution_m)
    base = scene.transform if scene.transform is not None else Affine(NATIVE_GRID_M, 0, 0, 0, -NATIVE_GRID_M, 0)
    crs = parse_crs(scene.crs or _LOCAL_CRS)
    # Nodata pixels must not leak into the average of their neighbours: they are the source's nodata, and
    # a working pixel with no valid source pixel stays nodata (NaN).
    src_nodata = float(card.nodata_value) if card.nodata_value is not None else None
    values = np.full((len(card.bands), rows, cols), np.nan, dtype=np.float32)
    for channel, band in enumerate(card.bands):
        source = np.asarray(scene.bands[band], dtype=np.float32)
        band_rows, band_cols = source.shape
        if (rows10 * band_cols) != (cols10 * band_rows):
            raise InputRejected(f"band {band} of {source.shape} does not cover the footprint of the {rows10} x {cols10} 10 m grid")
        source_transform = base @ Affine.scale(cols10 / band_cols, rows10 / band_rows)
        source = np.where(np.isnan(source), np.float32(src_nodata if src_nodata is not None else np.nan), source)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            reproject(
                source=source, destination=values[channel],
                src_transform=source_transform, src_crs=crs, src_nodata=src_nodata,
                dst_transform=transform, dst_crs=crs, dst_nodata=np.nan,
                resampling=getattr(Resampling, card.resampling),
            )
    nodata = np.isnan(values).any(axis=0)
    if card.nodata_value is not None:
        # A pixel without data reads as the nodata value downstream, as in the input (and in the reference).
        values[:, nodata] = np.float32(card.nodata_value)
        nodata |= np.all(values == np.float32(card.nodata_value), axis=0)
    else:
        values[np.isnan(values)] = 0.0
    return WorkingStack(values, nodata, transform if scene.transform is not None else None, scene.crs,
                        float(card.working_resolution_m))


def reflectance(values: np.ndarray, card: ModelCard, boa_add_offset: float = 0.0) -> np.ndarray:
    """float32 reflectance ``(DN + offset) * reflectance_scale`` (the values unchanged when the scale is 0)."""
    if card.reflectance_scale == 0:
        return np.asarray(values, dtype=np.float32)
    offset = boa_add_offset if card.reflectance_offset == "product" else 0.0
    return ((np.asarray(values, dtype=np.float64) + offset) * card.reflectance_scale).astype(np.float32)


def normalise(stack: np.ndarray, card: ModelCard) -> np.ndarray:
    """The card's per-band standardisation of [C, H, W], computed in float64 and stored as float32
    (what numpy does for the reference's in-place ``img -= mean; img /= std`` on a float32 image)."""
    out = np.asarray(stack, dtype=np.float32)
    if card.normalisation == "none":
        return out.copy()
    mean = np.asarray(card.band_mean, dtype=np.float64).reshape(-1, 1, 1)
    std = np.asarray(card.band_std, dtype=np.float64).reshape(-1, 1, 1)
    out = (out.astype(np.float64) - mean).astype(np.float32)
    return (out.astype(np.float64) / std).astype(np.float32)


def model_input(stack: WorkingStack, card: ModelCard, boa_add_offset: float = 0.0) -> np.ndarray:
    """Scaled and normalised float32 [C, H, W]; raises ``InputRejected`` for nodata under ``nodata_policy: reject``."""
    if card.nodata_policy == "reject" and stack.nodata.any():
        raise InputRejected(f"{int(stack.nodata.sum())} pixel(s) without data and the card's nodata_policy is 'reject'")
    normalised = normalise(reflectance(stack.values, card, boa_add_offset), card)
    if not np.isfinite(normalised).all():
        raise InputRejected("normalised input has non-finite values")
    return normalised


def infer_in_batches(tiles: np.ndarray, infer: InferFn, batch_size: int) -> np.ndarray:
    """``infer`` over [N, ...] in batches of at most ``batch_size``; outputs concatenated in tile order."""
    if batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    outputs = []
    for start in range(0, len(tiles), batch_size):
        batch = np.ascontiguousarray(tiles[start:start + batch_size])
        result = np.asarray(infer(batch))
        if result.shape[0] != batch.shape[0]:
            raise ValueError(f"inference returned {result.shape[0]} outputs for {batch.shape[0]} inputs")
        outputs.append(result)
    return np.concatenate(outputs)


def activate(outputs: np.ndarray, card: ModelCard, axis: int = 1) -> np.ndarray:
    """The card's ``output_activation`` on raw model outputs (softmax over the class axis)."""
    if card.output_activation == "softmax":
        return tiling.softmax(outputs, axis=axis)
    if card.output_activation == "sigmoid":
        return tiling.sigmoid(outputs)
    return outputs


def run_tiles(image: np.ndarray, card: ModelCard, infer: InferFn, batch_size: int) -> tiling.Blended:
    """Tile a normalised [C, H, W] image, infer, activate and blend per-pixel outputs back to [K, H, W]."""
    size = card.effective_tile_size
    grid = tiling.tile_grid(image.shape[1], image.shape[2], size, card.tile_overlap)
    tiles = tiling.cut_tiles(image, grid, card.tile_padding)
    outputs = infer_in_batches(tiles, infer, batch_size)
    if outputs.ndim == 3:  # one value per pixel: [N, T, T]
        outputs = outputs[:, None]
    return tiling.blend_tiles(activate(outputs, card), grid, card.tile_overlap, card.blending)


# ---------------------------------------------------------------------------------------------
# Output kinds


@dataclass(frozen=True, slots=True)
class PixelClassResult:
    """A class raster on the working grid: ``codes`` uint8 [H, W] (``CLASS_NODATA_CODE`` = no data)."""

    codes: np.ndarray
    class_names: tuple[str, ...]
    class_codes: tuple[int, ...]
    colour_table: dict[int, tuple[int, int, int, int]]
    fractions: dict[str, float]  # class name -> fraction of the pixels with data
    nodata_fraction: float
    transform: Affine | None
    crs: str | None
    resolution_m: float


@dataclass(frozen=True, slots=True)
class PixelValueResult:
    """A value raster on the working grid: ``values`` float32 [V, H, W], NaN where no data."""

    values: np.ndarray
    nodata_fraction: float
    transform: Affine | None
    crs: str | None
    resolution_m: float


def class_fractions(codes: np.ndarray, card: ModelCard) -> tuple[dict[str, float], float]:
    """({class name: fraction of the pixels with data}, fraction of pixels without data)."""
    total = codes.size
    valid = codes != CLASS_NODATA_CODE
    count = int(valid.sum())
    fractions = {
        name: (float(np.count_nonzero(codes == code)) / count if count else 0.0)
        for name, code in zip(card.class_names, card.codes)
    }
    return fractions, (1.0 - count / total) if total else 0.0


def class_share(result: PixelClassResult, names: Sequence[str]) -> float:
    """Share of the pixels with data in any of the classes ``names`` (e.g. cloud cover = cloud + shadow)."""
    unknown = [name for name in names if name not in result.fractions]
    if unknown:
        raise ValueError(f"classes {unknown} are not among {list(result.class_names)}")
    return float(sum(result.fractions[name] for name in names))


def pixel_classes(blended: tiling.Blended, nodata: np.ndarray, card: ModelCard, stack: WorkingStack) -> PixelClassResult:
    """Argmax over the blended class scores -> the card's class codes; no-data pixels get ``CLASS_NODATA_CODE``."""
    if blended.sums.shape[0] != len(card.class_names):
        raise ValueError(f"model returned {blended.sums.shape[0]} class channels; the card names {len(card.class_names)}")
    index = np.argmax(blended.sums, axis=0)
    codes = np.asarray(card.codes, dtype=np.uint8)[index]
    codes[nodata] = CLASS_NODATA_CODE
    fractions, nodata_fraction = class_fractions(codes, card)
    return PixelClassResult(
        codes=codes, class_names=tuple(card.class_names), class_codes=tuple(card.codes),
        colour_table=class_colour_table(card), fractions=fractions, nodata_fraction=nodata_fraction,
        transform=stack.transform, crs=stack.crs, resolution_m=stack.resolution_m,
    )


def pixel_values(blended: tiling.Blended, nodata: np.ndarray, stack: WorkingStack) -> PixelValueResult:
    """Weighted mean of the blended outputs; NaN where no data (or no tile weighs the pixel)."""
    values = blended.mean()
    values[:, nodata] = np.nan
    return PixelValueResult(
        values=values, nodata_fraction=float(nodata.mean()) if nodata.size else 0.0,
        transform=stack.transform, crs=stack.crs, resolution_m=stack.resolution_m,
    )


def process_scene(
    scene: SceneBands, card: ModelCard, infer: InferFn, batch_size: int = 4
) -> PixelClassResult | PixelValueResult:
    """Steps 1-4 of the module docstring for a per-pixel card."""
    if card.output_kind not in PIXEL_OUTPUT_KINDS:
        raise ValueError(f"process_scene handles per-pixel output kinds, the card says {card.output_kind!r}")
    stack = working_stack(scene, card)
    blended = run_tiles(model_input(stack, card, scene.boa_add_offset), card, infer, batch_size)
    if card.output_kind == "pixel-classes":
        return pixel_classes(blended, stack.nodata, card, stack)
    return pixel_values(blended, stack.nodata, stack)


@dataclass(frozen=True, slots=True)
class TileRecord:
    """One tile's result of a per-tile output kind; ``row``/``col``: the tile's origin on the working grid."""

    index: int
    values: list[float]
    labels: list[tuple[str, float]] = field(default_factory=list)  # (label, probability), descending
    row: int = 0
    col: int = 0
    transform: Affine | None = None


def tile_vectors(outputs: np.ndarray, card: ModelCard) -> list[TileRecord]:
    """[N, D] per-tile outputs (after the card's activation) as records."""
    if outputs.ndim != 2:
        raise ValueError(f"per-tile outputs must be [N, D], got {outputs.shape}")
    activated = activate(outputs, card, axis=1)
    return [TileRecord(index=i, values=[float(v) for v in row]) for i, row in enumerate(activated)]


def tile_class_probabilities(
    outputs: np.ndarray, card: ModelCard, labels: Sequence[str] = (), top: int | None = None
) -> list[TileRecord]:
    """[N, C] per-tile class scores -> probabilities with labels (card ``class_names``, else ``labels``)."""
    names = list(card.class_names) or list(labels)
    if outputs.ndim != 2 or outputs.shape[1] != len(names):
        raise ValueError(f"per-tile class outputs {outputs.shape} do not fit {len(names)} labels")
    probabilities = activate(outputs, card, axis=1)
    records = []
    for i, row in enumerate(probabilities):
        order = np.argsort(-row, kind="stable")[: top or len(names)]
        records.append(TileRecord(index=i, values=[float(v) for v in row],
                                  labels=[(names[j], float(row[j])) for j in order]))
    return records


def process_tiles(
    scene: SceneBands, card: ModelCard, infer: InferFn, batch_size: int = 16, labels: Sequence[str] = ()
) -> list[TileRecord]:
    """A per-tile card over a scene: non-overlapping tiles of ``effective_tile_size`` from the grid's origin
    (a partial tile at the right or bottom edge is left out), tiles with any no-data pixel left out, one record
    per tile with its origin and georeferencing."""
    if card.output_kind not in ("tile-vector", "tile-class-probabilities"):
        raise ValueError(f"process_tiles handles per-tile output kinds, the card says {card.output_kind!r}")
    stack = working_stack(scene, card)
    image = model_input(stack, card, scene.boa_add_offset)
    size = card.effective_tile_size
    origins = [(r, c) for r in range(0, image.shape[1] - size + 1, size) for c in range(0, image.shape[2] - size + 1, size)
               if not stack.nodata[r:r + size, c:c + size].any()]
    if not origins:
        return []
    tiles = np.stack([image[:, r:r + size, c:c + size] for r, c in origins])
    outputs = infer_in_batches(tiles, infer, batch_size)
    outputs = outputs.reshape(len(origins), -1)
    if card.output_kind == "tile-vector":
        records = tile_vectors(outputs, card)
    else:
        records = tile_class_probabilities(outputs, card, labels)
    return [
        TileRecord(index=record.index, values=record.values, labels=record.labels, row=r, col=c,
                   transform=stack.transform @ Affine.translation(c, r) if stack.transform is not None else None)
        for record, (r, c) in zip(records, origins)
    ]


def manifest_entry(result: PixelClassResult | PixelValueResult) -> dict[str, Any]:
    """What a manifest records per input for a per-pixel result (class fractions, shape, grid)."""
    entry: dict[str, Any] = {"resolution_m": result.resolution_m, "nodata_fraction": round(result.nodata_fraction, 6)}
    if isinstance(result, PixelClassResult):
        entry["shape"] = list(result.codes.shape)
        entry["class_fractions"] = {name: round(value, 6) for name, value in result.fractions.items()}
    else:
        entry["shape"] = list(result.values.shape)
    return entry


# ---------------------------------------------------------------------------------------------
# The served model as an ``infer`` callable


def triton_infer(url: str, model_name: str, input_name: str, output_name: str, model_version: str = "") -> InferFn:
    """An ``InferFn`` calling a Triton-compatible server over gRPC (ours or NVIDIA's) with ``tritonclient``."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)

    def infer(batch: np.ndarray) -> np.ndarray:
        tensor = grpcclient.InferInput(input_name, list(batch.shape), "FP32")
        tensor.set_data_from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        result = client.infer(model_name, [tensor], model_version=model_version,
                              outputs=[grpcclient.InferRequestedOutput(output_name)])
        return result.as_numpy(output_name)

    return infer


def served_card(url: str, model_name: str) -> tuple[ModelCard, dict[str, Any]]:
    """The model's card, checked against its tensors, and its config (JSON form) from the server."""
    import tritonclient.grpc as grpcclient

    from services.core.model_card import check_card_against_config

    config = grpcclient.InferenceServerClient(url).get_model_config(model_name, as_json=True)["config"]
    return check_card_against_config(config), config
