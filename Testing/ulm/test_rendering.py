"""Rendering grid, once-per-track density, direction and speed maps, PNG export."""

import numpy as np
import pytest
from PIL import Image

from ultrasound_ai.core.atomic import is_partial
from ultrasound_ai.core.errors import InputError
from ultrasound_ai.ulm.rendering import (
    Renderer,
    RenderGrid,
    colorize,
    gt_tracks,
    render_ground_truth,
    render_tracks,
    save_maps_png,
    save_png,
)
from ultrasound_ai.ulm.tracking import FineTracks


def _tracks(rows):
    """rows: (track_id, z, x, vz, vx)."""
    r = np.asarray(rows, dtype=float)
    return FineTracks(r[:, 0].astype(np.int64), np.zeros(len(r)), r[:, 1], r[:, 2], r[:, 3], r[:, 4])


GRID = RenderGrid(origin_mm=(0.0, 0.0), pixel_size_mm=(0.1, 0.1), shape=(4, 5))


def test_grid_covers_the_field_of_view():
    # 10 x 20 pixels of (0.2, 0.1) mm, first pixel centre at (1.0, -1.0); lambda 0.3 mm, factor 10.
    g = RenderGrid.for_acquisition((0.2, 0.1), (1.0, -1.0), (10, 20), wavelength_mm=0.3, factor=10)
    assert g.pixel_size_mm == pytest.approx((0.03, 0.03))
    assert g.shape == (67, 67)  # ceil(2.0 / 0.03), ceil(2.0 / 0.03)
    assert g.origin_mm == pytest.approx((1.0 - 0.1 + 0.015, -1.0 - 0.05 + 0.015))
    iz, ix, inside = g.index(np.array([0.9 + 1e-9, 2.9 - 1e-9]), np.array([-1.05 + 1e-9, 0.95 - 1e-9]))
    assert inside.all() and iz.tolist() == [0, 66] and ix.tolist() == [0, 66]
    with pytest.raises(InputError, match="resolution factor"):
        RenderGrid.for_acquisition((0.2, 0.1), (0, 0), (10, 20), 0.3, factor=0)


def test_each_track_counts_once_per_pixel():
    # Track 0 wanders inside pixel (1, 1) for 6 points, then goes to (1, 2); track 1 crosses (1, 1) once.
    rows = [(0, 0.1 + d, 0.1 - d, 0, 0) for d in (0, 0.01, -0.02, 0.03, 0.0, 0.01)] + [(0, 0.1, 0.2, 0, 0)]
    rows += [(1, 0.1, 0.1, 0, 0), (1, 0.2, 0.1, 0, 0)]
    img = render_tracks(_tracks(rows), GRID)["density"]
    assert img.dtype == np.float32 and img.shape == (4, 5)
    assert img[1, 1] == 2 and img[1, 2] == 1 and img[2, 1] == 1 and img.sum() == 4


def test_direction_and_speed():
    up = [(0, 0.1, 0.1, -3.0, 4.0), (0, 0.1, 0.1, -3.0, 4.0)]      # towards the probe, 5 mm/s
    down = [(1, 0.1, 0.1, 6.0, 8.0), (1, 0.2, 0.3, 6.0, 8.0)]      # away, 10 mm/s
    maps = render_tracks(_tracks(up + down), GRID)
    assert maps["direction"][1, 1] == 0 and maps["density"][1, 1] == 2  # one up + one down
    assert maps["direction"][2, 3] == -1
    assert maps["velocity_mm_s"][1, 1] == pytest.approx(7.5) and maps["velocity_mm_s"][2, 3] == pytest.approx(10)
    assert maps["velocity_mm_s"][0, 0] == 0
    maps = render_tracks(_tracks(up), GRID)
    assert maps["direction"][1, 1] == 1


def test_points_outside_the_grid_are_ignored_and_batches_add_up():
    rng = np.random.default_rng(0)
    rows = np.column_stack([rng.integers(0, 6, 200), rng.uniform(-0.1, 0.5, 200), rng.uniform(-0.1, 0.6, 200),
                            rng.normal(size=200), rng.normal(size=200)])
    rows = rows[np.argsort(rows[:, 0], kind="stable")]
    whole = render_tracks(_tracks(rows), GRID)
    r = Renderer(GRID)
    r.add(_tracks(rows[rows[:, 0] < 3]))
    r.add(_tracks(rows[rows[:, 0] >= 3]))
    parts = r.images()
    for k in whole:
        np.testing.assert_allclose(parts[k], whole[k], rtol=1e-6)
    assert whole["density"].max() <= 6


def test_ground_truth_rendering_interpolates_between_frames():
    # One bubble moving 0.35 mm along x in one frame: the interpolated path fills the pixels between.
    gt = np.array([[0, 0.1, 0.0, 3], [1, 0.1, 0.35, 3]])
    img = render_ground_truth(gt, GRID, frame_rate_hz=1000.0)["density"]
    assert img[1].tolist() == [1, 1, 1, 1, 0]
    with pytest.raises(InputError, match="bubble_id"):
        gt_tracks(gt[:, :3], 1000.0, 0.05)


def test_colour_maps():
    img = np.array([[0.0, 1.0], [8.0, 27.0]])
    rgb = colorize(img, "density")
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].max() < 20 and tuple(rgb[1, 1]) == (255, 255, 255)  # hot: (near) black -> white
    d = colorize(np.array([[-1.0, 0.0, 1.0]]), "direction")
    assert d[0, 0, 2] > d[0, 0, 0] and d[0, 2, 0] > d[0, 2, 2]  # negative blue, positive red
    with pytest.raises(InputError, match="kind"):
        colorize(img, "phase")


def test_png_export(tmp_path):
    maps = render_tracks(_tracks([(0, 0.1, 0.1, -1, 0), (1, 0.2, 0.3, 1, 1)]), GRID)
    save_png(maps["density"], tmp_path / "d.png", "density")
    save_maps_png(maps, tmp_path / "all.png")
    with Image.open(tmp_path / "d.png") as im:
        assert im.size == (5, 4) and im.mode == "RGB"
    with Image.open(tmp_path / "all.png") as im:
        assert im.size == (3 * 5 + 2 * 4, 4)
    assert not [p for p in tmp_path.iterdir() if is_partial(p)]
