"""Compounding: the fast path equals the reference exactly; known answers; grids; hole filling; errors."""

import numpy as np
import pytest

from ultrasound_ai.core import geometry
from ultrasound_ai.core.errors import InputError
from ultrasound_ai.freehand import compounding as C
from ultrasound_ai.io.volume import Volume

SPACING = (0.3, 0.2)  # sx != sy so an axis swap cannot pass


def random_sweep(seed, n=9, h=13, w=17):
    """Random uint8 frames and a posed sweep: rotations of tens of degrees and a few mm steps."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (n, h, w), dtype=np.uint8)
    params = np.concatenate([np.cumsum(rng.normal(0, 0.4, (n, 3)), axis=0) + [5, -2, 30],
                             rng.uniform(-40, 40, (n, 3))], axis=1)
    return frames, geometry.params_to_matrix(params, "xyz", True)


def assert_same(a, b):
    np.testing.assert_array_equal(a.volume.array, b.volume.array)
    np.testing.assert_array_equal(a.coverage.array, b.coverage.array)
    assert a.volume.array.dtype == np.float32 and a.coverage.array.dtype == np.uint8
    if a.hit_count is not None or b.hit_count is not None:
        np.testing.assert_array_equal(a.hit_count, b.hit_count)


# ----------------------------------------------------------------------------------------------
# Fast path == reference


@pytest.mark.parametrize("mode", C.COMPOUNDING_MODES)
@pytest.mark.parametrize("chunk", [1, 4, None])
def test_fast_path_equals_reference_on_auto_grid(mode, chunk):
    frames, T = random_sweep(1)
    grid = C.output_grid_for(T, frames.shape[1:], SPACING, spacing_mm=0.45)
    fast = C.reconstruct_volume(frames, T, SPACING, grid=grid, compounding=mode, device="cpu", chunk_frames=chunk)
    ref = C.reconstruct_volume_reference(frames, T, SPACING, grid=grid, compounding=mode)
    assert_same(fast, ref)
    assert fast.coverage.array.sum() > 100
    if mode == "mean":
        # Every pixel counts: the auto grid holds all of them.
        assert fast.hit_count.sum() == frames.size


@pytest.mark.parametrize("mode", C.COMPOUNDING_MODES)
def test_fast_path_equals_reference_with_pixels_outside_the_grid(mode):
    frames, T = random_sweep(2, n=12)
    full = C.output_grid_for(T, frames.shape[1:], SPACING, spacing_mm=(0.4, 0.5, 0.35), orientation="axis")
    # A smaller, rotated grid cutting through the sweep, plus one frame moved far outside it.
    R = geometry.euler_to_matrix([0.3, -0.2, 0.5], "xyz")
    centre = full.origin_lps + full.direction @ (full.spacing_xyz * np.array(full.shape_ijk) / 2)
    grid = C.Grid((6, 9, 7), np.array([0.4, 0.5, 0.35]), centre - R @ np.array([1.2, 2.0, 1.0]), R)
    T = T.copy()
    T[5, :3, 3] += 500.0
    fast = C.reconstruct_volume(frames, T, SPACING, grid=grid, compounding=mode, device="cpu", chunk_frames=5)
    ref = C.reconstruct_volume_reference(frames, T, SPACING, grid=grid, compounding=mode)
    assert_same(fast, ref)
    assert 0 < fast.coverage.array.sum() < fast.coverage.array.size
    if mode == "mean":
        assert 0 < fast.hit_count.sum() < frames.size


@pytest.mark.parametrize("seed", range(5))
def test_fast_path_equals_reference_random_geometry(seed):
    # Voxels from much smaller to much larger than the pixels (many pixels of one frame per voxel makes
    # the raster order of "latest" matter), random grids that cut the sweep, random chunking.
    rng = np.random.default_rng(100 + seed)
    frames, T = random_sweep(200 + seed, n=int(rng.integers(2, 8)), h=int(rng.integers(3, 15)),
                             w=int(rng.integers(3, 15)))
    spacing = rng.uniform(0.1, 1.5, 3)
    full = C.output_grid_for(T, frames.shape[1:], SPACING, spacing_mm=spacing)
    shape = tuple(int(max(1, s * f)) for s, f in zip(full.shape_kji, rng.uniform(0.4, 1.2, 3)))
    R = geometry.euler_to_matrix(rng.uniform(-0.5, 0.5, 3), "xyz") @ full.direction
    grid = C.Grid(shape, spacing, full.origin_lps + rng.normal(0, 1.0, 3), R)
    chunk = int(rng.integers(1, 4))
    for mode in C.COMPOUNDING_MODES:
        assert_same(C.reconstruct_volume(frames, T, SPACING, grid=grid, compounding=mode, device="cpu",
                                         chunk_frames=chunk),
                    C.reconstruct_volume_reference(frames, T, SPACING, grid=grid, compounding=mode))


def test_unpacked_mean_accumulators_give_the_same_answer(monkeypatch):
    frames, T = random_sweep(3)
    packed = C.reconstruct_volume(frames, T, SPACING, spacing_mm=0.5, device="cpu")
    monkeypatch.setattr(C, "PACKED_MAX_COUNT", 0)  # force separate sum and count accumulators
    separate = C.reconstruct_volume(frames, T, SPACING, spacing_mm=0.5, device="cpu")
    assert_same(packed, separate)


def test_h5py_dataset_frames_give_the_same_answer(tmp_path):
    h5py = pytest.importorskip("h5py")
    frames, T = random_sweep(4)
    with h5py.File(tmp_path / "f.h5", "w") as fh:
        fh["frames"] = frames
    with h5py.File(tmp_path / "f.h5", "r") as fh:
        from_file = C.reconstruct_volume(fh["frames"], T, SPACING, compounding="latest", device="cpu", chunk_frames=2)
    assert_same(from_file, C.reconstruct_volume(frames, T, SPACING, compounding="latest", device="cpu"))


@pytest.mark.gpu
def test_cuda_equals_cpu():
    frames, T = random_sweep(5, n=20, h=40, w=50)
    for mode in C.COMPOUNDING_MODES:
        assert_same(C.reconstruct_volume(frames, T, SPACING, compounding=mode, device="cuda"),
                    C.reconstruct_volume(frames, T, SPACING, compounding=mode, device="cpu"))


# ----------------------------------------------------------------------------------------------
# Known answers


def test_single_frame_on_matching_grid_is_the_frame():
    rng = np.random.default_rng(6)
    frames = rng.integers(0, 256, (1, 7, 11), dtype=np.uint8)
    T = np.eye(4)[None]
    out = C.reconstruct_volume(frames, T, (0.5, 0.5), spacing_mm=0.5, orientation="axis", device="cpu")
    assert out.volume.array.shape == (1, 7, 11)  # [k, j, i]: rows along j (y), columns along i (x)
    np.testing.assert_array_equal(out.volume.array[0], frames[0])
    assert out.coverage.array.all()
    np.testing.assert_allclose(out.volume.origin_lps, 0)
    np.testing.assert_allclose(out.volume.spacing_xyz, 0.5)


def test_half_spacing_rows_round_half_up_into_voxels():
    # Rows 0.25 mm apart into 0.5 mm voxels: row r sits at index r/2, rounded half up, so voxel j
    # receives rows 2j-1 and 2j (voxel 0 only row 0).
    frames = np.arange(6 * 3, dtype=np.uint8).reshape(1, 6, 3) * 10
    grid = C.Grid((1, 4, 3), np.array([0.5, 0.5, 0.5]), np.zeros(3), np.eye(3))
    mean = C.reconstruct_volume(frames, np.eye(4)[None], (0.5, 0.25), grid=grid, device="cpu")
    f = frames[0].astype(float)
    expected = np.stack([f[0], (f[1] + f[2]) / 2, (f[3] + f[4]) / 2, f[5]])
    np.testing.assert_array_equal(mean.volume.array[0], expected.astype(np.float32))
    np.testing.assert_array_equal(mean.hit_count[0], [[1] * 3, [2] * 3, [2] * 3, [1] * 3])
    latest = C.reconstruct_volume(frames, np.eye(4)[None], (0.5, 0.25), grid=grid, compounding="latest",
                                  device="cpu")
    np.testing.assert_array_equal(latest.volume.array[0], np.stack([f[0], f[2], f[4], f[5]]))


def test_compounding_modes_on_repeated_poses():
    # Frames at one pose share their pixel -> voxel mapping, so the compounded volume follows from the
    # single-frame ones: mean of the means (equal counts), max of the maxima, the last frame's latest.
    rng = np.random.default_rng(7)
    frames = rng.integers(0, 256, (3, 9, 8), dtype=np.uint8)
    T = np.repeat(geometry.params_to_matrix([1, 2, 3, 10, 20, 30], "xyz", True)[None], 3, axis=0)
    grid = C.output_grid_for(T, frames.shape[1:], SPACING, spacing_mm=0.4)
    one = {m: [C.reconstruct_volume_reference(frames[f:f + 1], T[:1], SPACING, grid=grid, compounding=m)
               .volume.array for f in range(3)] for m in C.COMPOUNDING_MODES}
    run = {m: C.reconstruct_volume(frames, T, SPACING, grid=grid, compounding=m, device="cpu").volume.array
           for m in C.COMPOUNDING_MODES}
    np.testing.assert_allclose(run["mean"], np.mean(one["mean"], axis=0), rtol=1e-6)
    np.testing.assert_array_equal(run["max"], np.max(one["max"], axis=0))
    np.testing.assert_array_equal(run["latest"], one["latest"][2])


def test_latest_takes_the_last_frame():
    frames = np.stack([np.full((4, 4), 10, np.uint8), np.full((4, 4), 200, np.uint8), np.full((4, 4), 7, np.uint8)])
    T = np.repeat(np.eye(4)[None], 3, axis=0)
    kw = dict(spacing_mm=0.5, orientation="axis", device="cpu")
    assert np.all(C.reconstruct_volume(frames, T, (0.5, 0.5), compounding="latest", **kw).volume.array == 7)
    assert np.all(C.reconstruct_volume(frames, T, (0.5, 0.5), compounding="max", **kw).volume.array == 200)
    mean = C.reconstruct_volume(frames, T, (0.5, 0.5), compounding="mean", **kw)
    np.testing.assert_array_equal(mean.volume.array, np.float32(217 / 3))
    assert np.all(mean.hit_count == 3)


def test_fixed_point_index_matches_float64_mapping_away_from_ties():
    frames, T = random_sweep(8, n=4)
    grid = C.output_grid_for(T, frames.shape[1:], SPACING, spacing_mm=0.37, margin_mm=1.0)
    h, w = frames.shape[1:]
    aff = C._pixel_to_index_affines(T, *SPACING, grid)
    bits, _ = C._fraction_bits(aff, w, grid)
    rows, cols = C._fixed_point_terms(aff, h, w, bits)
    fixed = (rows[:, :, None, :] + cols[:, None, :, :]) >> bits  # [N, H, W, 3]
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    pix_mm = np.stack([c * SPACING[0], r * SPACING[1], np.zeros_like(r, float)], -1)
    world = geometry.apply_transform(T[:, None, None], pix_mm[None])
    vol = Volume(np.zeros(grid.shape_kji, np.uint8), grid.spacing_xyz, grid.origin_lps, grid.direction)
    cont = vol.physical_to_index(world.reshape(-1, 3)).reshape(fixed.shape)
    away = np.abs((cont - np.floor(cont)) - 0.5) > 1e-5
    np.testing.assert_array_equal(fixed[away], np.floor(cont + 0.5)[away])
    assert away.mean() > 0.99
    assert 16 <= bits <= 20


# ----------------------------------------------------------------------------------------------
# Output grid


def test_output_grid_for_translation_sweep_has_known_shape():
    T = np.repeat(np.eye(4)[None], 5, axis=0)
    T[:, 2, 3] = np.arange(5) * 1.0  # 4 mm out of plane
    T[:, :3, 3] += [10, -20, 5]
    grid = C.output_grid_for(T, (7, 11), (0.5, 0.25), spacing_mm=0.5)
    assert grid.shape_kji == (9, 4, 11)  # z: 4/0.5+1, y: 1.5/0.5+1, x: 5/0.5+1
    np.testing.assert_allclose(grid.origin_lps, [10, -20, 5])
    np.testing.assert_allclose(grid.direction, np.eye(3))
    wide = C.output_grid_for(T, (7, 11), (0.5, 0.25), spacing_mm=0.5, margin_mm=1.0)
    assert wide.shape_kji == (13, 8, 15)
    np.testing.assert_allclose(wide.origin_lps, [9, -21, 4])


@pytest.mark.parametrize("orientation", C.ORIENTATIONS)
def test_output_grid_holds_every_pixel(orientation):
    frames, T = random_sweep(9)
    grid = C.output_grid_for(T, frames.shape[1:], SPACING, spacing_mm=0.6, orientation=orientation)
    if orientation == "first":
        np.testing.assert_allclose(grid.direction, T[0, :3, :3], atol=1e-12)
    else:
        np.testing.assert_array_equal(grid.direction, np.eye(3))
    out = C.reconstruct_volume_reference(frames, T, SPACING, grid=grid)
    assert out.hit_count.sum() == frames.size
    # Tight: every face of the box is touched by some pixel.
    cov = out.coverage.array.astype(bool)
    for axis in range(3):
        assert cov.any(axis=tuple(a for a in range(3) if a != axis))[[0, -1]].all()


def test_first_orientation_is_tighter_for_an_oblique_sweep():
    R = geometry.euler_to_matrix([0.4, 0.7, -0.3], "xyz")
    T = np.repeat(np.eye(4)[None], 20, axis=0)
    T[:, :3, :3] = R
    T[:, :3, 3] = (R @ np.array([0, 0, 1.0]))[None] * np.arange(20)[:, None]
    first = C.output_grid_for(T, (30, 40), (0.2, 0.2), spacing_mm=0.5, orientation="first")
    axis = C.output_grid_for(T, (30, 40), (0.2, 0.2), spacing_mm=0.5, orientation="axis")
    assert first.n_voxels < axis.n_voxels / 2


def test_result_volumes_carry_the_grid_geometry():
    frames, T = random_sweep(10)
    grid = C.output_grid_for(T, frames.shape[1:], SPACING, spacing_mm=0.5)
    out = C.reconstruct_volume(frames, T, SPACING, grid=Volume(np.zeros(grid.shape_kji, np.uint8), grid.spacing_xyz,
                                                               grid.origin_lps, grid.direction), device="cpu")
    for vol in (out.volume, out.coverage):
        np.testing.assert_allclose(vol.ijk_to_lps(), grid.ijk_to_lps())


# ----------------------------------------------------------------------------------------------
# Hole filling


def test_gaussian_fill_restores_a_constant_and_leaves_far_voxels_alone():
    values = np.full((7, 7, 7), 42.0, np.float32)
    covered = np.ones((7, 7, 7), bool)
    covered[3, 3, 3] = False
    covered[:, :, 6] = False  # a whole uncovered face: half-covered neighbourhoods still get filled
    covered[0, 0, 6] = covered[6, 6, 6] = False
    values[~covered] = 0
    out, filled = C.fill_volume_holes(values, covered, (0.5, 0.5, 0.5), "gaussian", kernel_mm=0.5, min_ratio=0.25)
    assert filled[3, 3, 3] and out[3, 3, 3] == pytest.approx(42.0, rel=1e-6)
    np.testing.assert_allclose(out[filled], 42.0, rtol=1e-6)
    assert not (filled & covered).any()
    np.testing.assert_array_equal(out[covered], values[covered])
    # An island with nothing covered nearby stays empty.
    values2 = np.zeros((9, 9, 9), np.float32)
    cov2 = np.zeros((9, 9, 9), bool)
    cov2[:2] = True
    values2[:2] = 5
    out2, filled2 = C.fill_volume_holes(values2, cov2, (1, 1, 1), "gaussian", kernel_mm=1.0, min_ratio=0.25)
    # Slice 2 sees 9 of 27 neighbours covered (1/3 >= 0.25), except at the array's edges (6 of 27:
    # outside the grid counts as uncovered); slice 3 and beyond see none.
    assert filled2[2, 1:-1, 1:-1].all() and not filled2[2, 0].any() and not filled2[3:].any()
    assert np.all(out2[3:] == 0)


def test_nearest_fill_uses_the_nearest_covered_voxel_in_mm():
    k, j, i = np.meshgrid(np.arange(5), np.arange(5), np.arange(5), indexing="ij")
    values = (100 * k + 10 * j + i).astype(np.float32)
    covered = np.ones((5, 5, 5), bool)
    covered[2, 2, 2] = covered[2, 3, 2] = False
    # y (j) spacing is the smallest: the nearest covered voxels lie along j.
    out, filled = C.fill_volume_holes(values, covered, (1.0, 0.6, 2.0), "nearest", kernel_mm=1.0, min_ratio=0.5)
    assert filled.sum() == 2
    assert out[2, 2, 2] == values[2, 1, 2] and out[2, 3, 2] == values[2, 4, 2]
    # Beyond the kernel radius nothing is filled.
    out, filled = C.fill_volume_holes(values, covered, (1.0, 0.6, 2.0), "nearest", kernel_mm=0.5, min_ratio=0.01)
    assert not filled.any()


def test_min_ratio_controls_which_holes_are_filled():
    values = np.ones((5, 5, 5), np.float32)
    covered = np.zeros((5, 5, 5), bool)
    covered[2, 2, 1] = True  # one covered voxel among 27 in the 3x3x3 neighbourhood of (2, 2, 2)
    _, filled = C.fill_volume_holes(values, covered, (1, 1, 1), "gaussian", kernel_mm=1.0, min_ratio=0.5)
    assert not filled.any()
    _, filled = C.fill_volume_holes(values, covered, (1, 1, 1), "gaussian", kernel_mm=1.0, min_ratio=1 / 27)
    assert filled[2, 2, 2] and filled.sum() == 26  # its 3x3x3 box, minus itself


def test_reconstruct_with_hole_filling_fills_gaps_between_sparse_frames():
    rng = np.random.default_rng(11)
    n = 6
    frames = np.full((n, 8, 10), 100, np.uint8) + rng.integers(0, 3, (n, 8, 10), dtype=np.uint8)
    T = np.repeat(np.eye(4)[None], n, axis=0)
    T[:, 2, 3] = np.arange(n) * 1.0  # 1 mm apart into 0.5 mm voxels: every other slice is empty
    plain = C.reconstruct_volume(frames, T, (0.5, 0.5), spacing_mm=0.5, device="cpu")
    assert plain.coverage.array[1::2].sum() == 0
    for method in ("gaussian", "nearest"):
        out = C.reconstruct_volume(frames, T, (0.5, 0.5), spacing_mm=0.5, fill_holes=method, fill_kernel_mm=0.5,
                                   device="cpu")
        np.testing.assert_array_equal(out.filled, plain.coverage.array == 0)
        np.testing.assert_array_equal(out.volume.array[plain.coverage.array == 1],
                                      plain.volume.array[plain.coverage.array == 1])
        gaps = out.volume.array[out.filled]
        assert gaps.min() >= 100 and gaps.max() <= 102
        np.testing.assert_array_equal(out.coverage.array, plain.coverage.array)


# ----------------------------------------------------------------------------------------------
# Progress and bad input


def test_progress_reaches_one_in_order():
    frames, T = random_sweep(12, n=7)
    seen = []
    C.reconstruct_volume(frames, T, SPACING, chunk_frames=3, device="cpu", progress=lambda f, m: seen.append(f))
    assert seen == sorted(seen) and seen[-1] == 1.0 and len(seen) == 3


def test_bad_inputs_raise_input_error():
    frames, T = random_sweep(13, n=3)
    with pytest.raises(InputError, match="frames.*uint8"):
        C.reconstruct_volume(frames.astype(np.float32), T, SPACING, device="cpu")
    with pytest.raises(InputError, match=r"frames.*\[N, H, W\]"):
        C.reconstruct_volume(frames[0], T, SPACING, device="cpu")
    with pytest.raises(InputError, match="one pose per frame"):
        C.reconstruct_volume(frames, T[:2], SPACING, device="cpu")
    bad = T.copy()
    bad[1, 0, 0] = np.nan
    with pytest.raises(InputError, match="tforms.*NaN"):
        C.reconstruct_volume(frames, bad, SPACING, device="cpu")
    with pytest.raises(InputError, match="compounding"):
        C.reconstruct_volume(frames, T, SPACING, compounding="median", device="cpu")
    with pytest.raises(InputError, match="fill_holes"):
        C.reconstruct_volume(frames, T, SPACING, fill_holes="stick", device="cpu")
    with pytest.raises(InputError, match="fill_kernel_mm"):
        C.reconstruct_volume(frames, T, SPACING, fill_holes="gaussian", fill_kernel_mm=0, device="cpu")
    with pytest.raises(InputError, match="spacing_mm"):
        C.reconstruct_volume(frames, T, SPACING, spacing_mm=-0.5, device="cpu")
    with pytest.raises(InputError, match="pixel_spacing_xy"):
        C.reconstruct_volume(frames, T, (0.3,), device="cpu")
    with pytest.raises(InputError, match="chunk_frames"):
        C.reconstruct_volume(frames, T, SPACING, chunk_frames=0, device="cpu")
    with pytest.raises(InputError, match="device"):
        C.reconstruct_volume(frames, T, SPACING, device="tpu")
    with pytest.raises(InputError, match="too large"):
        C.reconstruct_volume(frames, T, SPACING, spacing_mm=1e-4, device="cpu")
    with pytest.raises(InputError, match="orientation"):
        C.output_grid_for(T, frames.shape[1:], SPACING, orientation="diagonal")
    with pytest.raises(InputError, match="margin_mm"):
        C.output_grid_for(T, frames.shape[1:], SPACING, margin_mm=-1)
    with pytest.raises(InputError, match="grid"):
        C.reconstruct_volume(frames, T, SPACING, grid="big", device="cpu")
    with pytest.raises(InputError, match="covered"):
        C.fill_volume_holes(np.zeros((2, 2, 2)), np.zeros((2, 2)), (1, 1, 1))
