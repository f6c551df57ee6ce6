"""What the input layer yields: one small typed object per patch or tile, or a rejection with its reason."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Union

import numpy as np
from affine import Affine

# Native ground resolution of every Sentinel-2 L2A band, in metres (L2A has no B10).
BAND_RESOLUTION_M: Mapping[str, int] = {
    "B01": 60, "B02": 10, "B03": 10, "B04": 10, "B05": 20, "B06": 20, "B07": 20,
    "B08": 10, "B8A": 20, "B09": 60, "B11": 20, "B12": 20,
}
# A BigEarthNet patch covers 120 x 120 pixels at 10 m; coarser bands cover the same footprint with fewer pixels.
PATCH_SIZE_10M = 120
BIGEARTHNET_BANDS: frozenset[str] = frozenset(BAND_RESOLUTION_M)


def patch_band_shape(band: str, patch_size_10m: int = PATCH_SIZE_10M) -> tuple[int, int]:
    """Pixel shape of ``band`` over the footprint of a ``patch_size_10m`` x ``patch_size_10m`` tile at 10 m."""
    side = patch_size_10m * 10 // BAND_RESOLUTION_M[band]
    return (side, side)


@dataclass(frozen=True, slots=True)
class InputPatch:
    """One patch (BigEarthNet folder) or tile (cut from a SAFE product), bands as read.

    ``bands`` maps a band name to a uint16 array at the band's native resolution (120x120 at 10 m, 60x60 at 20 m,
    20x20 at 60 m). A patch may lack bands; the stacking step decides whether what it has is enough.
    ``crs``/``transform`` describe the 10 m grid of the patch when the source carries georeferencing.
    ``i``/``j`` are the tile's row/column in its product (SAFE tiles only), as production's feature JSON uses them.
    ``source`` is where it came from: the archive's key, the patch folder's prefix, or the SAFE product's folder.
    """

    patch_id: str
    source: str
    bands: Mapping[str, np.ndarray]
    crs: str | None = None
    transform: Affine | None = None
    i: int | None = None
    j: int | None = None
    # The product's BOA_ADD_OFFSET in DN (L2A processing baseline >= 04.00: -1000; BigEarthNet and older: 0), for
    # cards with ``reflectance_offset: product``.
    boa_add_offset: float = 0.0

    def __repr__(self) -> str:
        # Arrays would flood logs and test output; names and shapes say what matters.
        shapes = {name: tuple(array.shape) for name, array in sorted(self.bands.items())}
        return (
            f"InputPatch(patch_id={self.patch_id!r}, source={self.source!r}, bands={shapes}, crs={self.crs!r}, "
            f"i={self.i}, j={self.j})"
        )


@dataclass(frozen=True, slots=True)
class PatchRejection:
    """A patch (or a lone archive member, or a whole SAFE product) that was refused; the rest of the input goes on.

    ``patch_id`` is the patch's id where the refused thing belongs to a patch, else the member name or product id.
    """

    patch_id: str
    source: str
    reason: str


InputItem = Union[InputPatch, PatchRejection]


class InputError(Exception):
    """The input as a whole cannot be read: nothing found, S3 unreachable, a corrupt archive, a limit exceeded.

    Patches yielded before the error stay valid; the step as a whole has failed. ``reason`` is meant for people
    (it goes into the CRITICAL notification) and never contains credentials.
    """

    def __init__(self, reason: str, source: str = "", transient: bool = False) -> None:
        super().__init__(reason, source)
        self.reason = reason
        self.source = source
        # True when retrying later may succeed (S3 unreachable, S3 answered 5xx): the delivery is then answered
        # 5xx and Kafka redelivers it, instead of the step being failed for good.
        self.transient = transient

    def __str__(self) -> str:
        return f"{self.reason} (source: {self.source})" if self.source else self.reason
