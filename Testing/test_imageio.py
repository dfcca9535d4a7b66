import numpy as np
import pytest
import SimpleITK as sitk

from AutoSegLib.imageio import Geometry, NonFiniteVoxelsError, file_ending, read_header, read_image, write_image

ROTATED = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


@pytest.mark.parametrize("ending", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_round_trip_preserves_array_and_geometry_exactly(tmp_path, ending):
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    # Binary fractions: NIfTI stores spacing and origin as float32 (see the next test).
    geometry = Geometry((3.5, 0.75, 0.8125), (-10.25, 20.5, 7.0), ROTATED)
    path = tmp_path / f"img{ending}"
    write_image(array, geometry, path)
    back, geo = read_image(path)
    np.testing.assert_array_equal(back, array)
    assert back.dtype == np.int16
    assert geo == geometry


def test_nifti_geometry_is_a_fixed_point_after_first_write(tmp_path):
    # NIfTI holds float32 geometry, so 0.8 mm comes back as 0.800000011920929; what matters
    # is that a geometry read from a file is written back bit for bit.
    geometry = Geometry((3.3, 0.8, 0.7), (-10.1, 20.3, 7.7), ROTATED)
    write_image(np.zeros((2, 3, 4), np.uint8), geometry, tmp_path / "a.nii.gz")
    _, first = read_image(tmp_path / "a.nii.gz")
    np.testing.assert_allclose(first.spacing, geometry.spacing, rtol=1e-6)
    write_image(np.zeros((2, 3, 4), np.uint8), first, tmp_path / "b.nii.gz")
    assert read_image(tmp_path / "b.nii.gz")[1] == first


def test_axis_order_is_numpy_zyx_against_simpleitk(tmp_path):
    # Spacing in the Geometry follows array axes: a (z, y, x) array with 3 mm slices.
    array = np.zeros((4, 5, 6), np.uint8)
    write_image(array, Geometry((3.0, 1.0, 0.5), (0, 0, 0), tuple(np.eye(3).ravel())), tmp_path / "a.nii.gz")
    image = sitk.ReadImage(str(tmp_path / "a.nii.gz"))
    assert image.GetSize() == (6, 5, 4)
    assert image.GetSpacing() == (0.5, 1.0, 3.0)


def test_header_reads_without_voxels(tmp_path):
    write_image(np.zeros((3, 4, 5), np.float32), Geometry.identity((1.0, 2.0, 3.0)), tmp_path / "h.nrrd")
    header = read_header(tmp_path / "h.nrrd")
    assert header.shape == (3, 4, 5)
    assert header.components == 1
    assert not header.is_integer
    assert header.geometry.spacing == (1.0, 2.0, 3.0)


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.nii.gz"):
        read_image(tmp_path / "nothere.nii.gz")


@pytest.mark.parametrize("ending", [".nii.gz", ".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_file_is_refused_naming_the_file(tmp_path, ending, keep):
    # ITK reads a truncated NIfTI as if whole, zero-filling the rest; we must not.
    path = tmp_path / f"cut{ending}"
    write_image(np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32),
                Geometry.identity((1.0, 1.0, 1.0)), path)
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])
    with pytest.raises(OSError, match=f"cut{ending}.*(truncated|corrupt)"):
        read_image(path)


@pytest.mark.parametrize("content", [b"", b"not an image at all" * 20])
def test_empty_or_garbage_file_is_refused(tmp_path, content):
    path = tmp_path / "junk.nii.gz"
    path.write_bytes(content)
    with pytest.raises(OSError, match="junk.nii.gz: cannot read image.*not a readable image"):
        read_image(path)


def test_failed_write_leaves_no_file(tmp_path):
    path = tmp_path / "x.nii.gz"
    with pytest.raises(ValueError):
        write_image(np.zeros((2, 2)), Geometry.identity((1.0, 1.0, 1.0)), path)
    assert list(tmp_path.iterdir()) == []


def test_file_ending():
    assert file_ending("a/b/case_0000.nii.gz") == ".nii.gz"
    assert file_ending("x.NRRD") == ".nrrd"
    assert file_ending("x.png") is None


@pytest.mark.parametrize("ending", [".nii.gz", ".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_finite_voxels_are_refused_in_every_format(tmp_path, ending, dtype):
    # ITK's NIfTI reader returns NaN/Inf as 0; the raw-byte scan must still find them.
    array = np.ones((5, 7, 9), dtype)
    array[1, 2, 3] = np.nan
    array[4, 6, 8] = -np.inf  # the very last voxel: chunk-boundary handling
    path = tmp_path / f"nan{ending}"
    write_image(array, Geometry.identity((1.0, 1.0, 1.0)), path)
    with pytest.raises(NonFiniteVoxelsError, match=f"nan{ending}: 1 NaN and 1 infinite voxel"):
        read_image(path)


@pytest.mark.parametrize("chunk", [1001, 4096, 1 << 22])
def test_float_nifti_scan_counts_across_chunk_boundaries(tmp_path, monkeypatch, chunk):
    from AutoSegLib import niftiraw

    monkeypatch.setattr(niftiraw, "_CHUNK", chunk)  # odd sizes split floats across chunks
    array = np.random.default_rng(0).normal(size=(10, 32, 33)).astype(np.float32)
    array.ravel()[[0, 250, 251, array.size - 1]] = np.nan
    write_image(array, Geometry.identity((1.0, 1.0, 1.0)), tmp_path / "big.nii.gz")
    with pytest.raises(NonFiniteVoxelsError) as info:
        read_image(tmp_path / "big.nii.gz")
    assert (info.value.nan, info.value.inf) == (4, 0)


def test_integer_nifti_gz_uses_the_gzip_trailer_fast_path(tmp_path, monkeypatch):
    from AutoSegLib import niftiraw

    path = tmp_path / "ct.nii.gz"
    write_image(np.zeros((4, 5, 6), np.int16), Geometry.identity((1.0, 1.0, 1.0)), path)
    monkeypatch.setattr(niftiraw, "scan", lambda *a, **k: pytest.fail("full scan not needed"))
    read_image(path)
