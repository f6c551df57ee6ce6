"""SAFE tiles carry their product's BOA_ADD_OFFSET (``MTD_MSIL2A.xml``), which cards with
``reflectance_offset: product`` (the cloud mask) add before scaling: moto S3, real JPEG 2000 band files."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.wrapper.inputs import InputPatch, PatchRejection, S3Access, read_input
from services.wrapper.inputs.s3_listing import S3Client
from services.wrapper.inputs.settings import InputLimits
from test_input_safe_products import PRODUCT, _scene, _upload_tree, _write_safe

# The structure of a processing-baseline 04.00+ L2A product's metadata (one offset per band).
BASELINE_04_METADATA = """<?xml version="1.0" encoding="UTF-8"?>
<n1:Level-2A_User_Product xmlns:n1="https://psd-14.sentinel2.eo.esa.int/PSD/User_Product_Level-2A.xsd">
 <n1:General_Info><Product_Image_Characteristics><BOA_ADD_OFFSET_VALUES_LIST>
 {offsets}
 </BOA_ADD_OFFSET_VALUES_LIST></Product_Image_Characteristics></n1:General_Info>
</n1:Level-2A_User_Product>"""


def _metadata(values: list[str]) -> str:
    return BASELINE_04_METADATA.format(offsets="\n ".join(
        f'<BOA_ADD_OFFSET band_id="{band}">{value}</BOA_ADD_OFFSET>' for band, value in enumerate(values)))


@pytest.mark.parametrize(("metadata", "expected"), [
    (_metadata(["-1000"] * 13), -1000.0),
    ("<metadata/>", 0.0),  # before baseline 04.00: no offset
    (None, 0.0),  # no metadata file at all
])
def test_safe_tiles_carry_the_products_boa_add_offset(
    s3_access: S3Access, s3_client: S3Client, tmp_path: Path, metadata: str | None, expected: float
) -> None:
    _write_safe(tmp_path, _scene())
    path = tmp_path / f"{PRODUCT}.SAFE" / "MTD_MSIL2A.xml"
    if metadata is None:
        path.unlink()
    else:
        path.write_text(metadata)
    _upload_tree(s3_client, s3_access.bucket_name, tmp_path, "scenes/")
    items = list(read_input(s3_access, "scenes", limits=InputLimits()))
    assert items and all(isinstance(item, InputPatch) for item in items)
    assert {item.boa_add_offset for item in items} == {expected}


def test_a_product_whose_bands_disagree_on_the_offset_is_refused_whole(
    s3_access: S3Access, s3_client: S3Client, tmp_path: Path
) -> None:
    _write_safe(tmp_path, _scene())
    (tmp_path / f"{PRODUCT}.SAFE" / "MTD_MSIL2A.xml").write_text(_metadata(["-1000", "0"]))
    _upload_tree(s3_client, s3_access.bucket_name, tmp_path, "scenes/")
    (item,) = list(read_input(s3_access, "scenes", limits=InputLimits()))
    assert isinstance(item, PatchRejection)
    assert "MTD_MSIL2A.xml" in item.reason and "BOA_ADD_OFFSET differs" in item.reason
