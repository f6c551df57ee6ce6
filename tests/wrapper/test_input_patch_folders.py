"""BigEarthNet patch folders stored directly as S3 objects, read from a real S3-protocol server."""

from __future__ import annotations

import numpy as np

from services.wrapper.inputs import InputLimits, InputPatch, PatchRejection, S3Access, read_input
from services.wrapper.inputs.s3_listing import S3Client
from wrapper_input_data import (
    ALL_BANDS,
    sample_band_array,
    sample_band_path,
    sample_georeference,
    sample_patch_names,
    upload_patch_folder,
)


def test_nested_patch_folders_come_out_in_key_order_with_relative_ids(
    s3_access: S3Access, s3_client: S3Client
) -> None:
    names = sample_patch_names()
    deep, shallow = names[:4], names[4:7]
    for name in deep:
        upload_patch_folder(s3_client, s3_access.bucket_name, "run/a/2017/", name)
    for name in shallow:
        upload_patch_folder(s3_client, s3_access.bucket_name, "run/b/", name)
    # A sibling whose name starts like the folder's must not be taken for part of it.
    upload_patch_folder(s3_client, s3_access.bucket_name, "run2/", names[7])

    items = list(read_input(s3_access, "run", limits=InputLimits(fetch_concurrency=3)))

    assert all(isinstance(item, InputPatch) for item in items)
    assert [item.patch_id for item in items] == [f"a/2017/{n}" for n in deep] + [f"b/{n}" for n in shallow]
    for item, name in zip(items, deep + shallow):
        assert isinstance(item, InputPatch)
        assert item.source == f"run/{item.patch_id}/"
        assert sorted(item.bands) == sorted(ALL_BANDS)
        for band in ALL_BANDS:
            np.testing.assert_array_equal(item.bands[band], sample_band_array(name, band))
        georeference = sample_georeference(name)
        assert (item.crs is not None) == (georeference is not None)
        if georeference is not None:
            assert item.crs == georeference[0]
    # Fetching runs ahead in threads; the order must not depend on which GET finished first.
    again = [item.patch_id for item in read_input(s3_access, "run", limits=InputLimits(fetch_concurrency=8))]
    assert again == [item.patch_id for item in items]


def test_folder_that_is_itself_a_patch(s3_access: S3Access, s3_client: S3Client) -> None:
    name = sample_patch_names()[0]
    upload_patch_folder(s3_client, s3_access.bucket_name, "single/", name)

    items = list(read_input(s3_access, f"single/{name}"))

    assert [(item.patch_id, item.source) for item in items] == [(name, f"single/{name}/")]


def test_missing_band_oversize_and_undecodable_objects(s3_access: S3Access, s3_client: S3Client) -> None:
    missing, oversize, broken, fine = sample_patch_names()[:4]
    bucket = s3_access.bucket_name
    upload_patch_folder(s3_client, bucket, "in/", missing, skip_bands=["B11", "B12"])
    upload_patch_folder(s3_client, bucket, "in/", oversize, skip_bands=["B05"])
    s3_client.put_object(Bucket=bucket, Key=f"in/{oversize}/{oversize}_B05.tif", Body=b"\x01" * 200_000)
    upload_patch_folder(s3_client, bucket, "in/", broken, skip_bands=["B02"])
    s3_client.put_object(Bucket=bucket, Key=f"in/{broken}/{broken}_B02.tif", Body=b"not a tiff at all")
    upload_patch_folder(s3_client, bucket, "in/", fine)

    items = list(read_input(s3_access, "in", limits=InputLimits(max_band_file_bytes=100_000)))

    by_id = {item.patch_id: item for item in items}
    assert [item.patch_id for item in items] == sorted(by_id)
    assert isinstance(by_id[missing], InputPatch)
    assert sorted(by_id[missing].bands) == sorted(set(ALL_BANDS) - {"B11", "B12"})
    assert isinstance(by_id[fine], InputPatch) and len(by_id[fine].bands) == len(ALL_BANDS)
    oversize_item, broken_item = by_id[oversize], by_id[broken]
    assert isinstance(oversize_item, PatchRejection) and "B05" in oversize_item.reason
    assert "200000 bytes" in oversize_item.reason
    assert isinstance(broken_item, PatchRejection) and "B02" in broken_item.reason


def test_band_file_of_the_wrong_size_rejects_its_patch(s3_access: S3Access, s3_client: S3Client) -> None:
    first, second = sample_patch_names()[:2]
    bucket = s3_access.bucket_name
    upload_patch_folder(s3_client, bucket, "in/", first, skip_bands=["B05"])
    # A 10 m band file where a 20 m one belongs: readable, but 120x120 instead of 60x60.
    s3_client.put_object(
        Bucket=bucket,
        Key=f"in/{first}/{first}_B05.tif",
        Body=sample_band_path(second, "B02").read_bytes(),
    )

    items = list(read_input(s3_access, "in"))

    assert len(items) == 1 and isinstance(items[0], PatchRejection)
    assert "B05 is 120x120, expected 60x60" in items[0].reason
