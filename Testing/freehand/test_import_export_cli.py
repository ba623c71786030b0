"""`ultrasound-ai freehand export` / `import`: a sweep survives the PLUS round trip through the CLI."""

import numpy as np

from ultrasound_ai.cli import main
from ultrasound_ai.core import geometry as g
from ultrasound_ai.core.atomic import is_partial
from ultrasound_ai.io.sweep import Sweep, read_sweep, write_sweep


def _sweep(n=6, h=20, w=30):
    rng = np.random.default_rng(3)
    params = np.column_stack([np.linspace(0, 5, n), rng.normal(0, 1, n), rng.normal(0, 1, n),
                              rng.normal(0, 4, (n, 3))])
    tforms = g.params_to_matrix(params, "xyz", degrees=True)
    frames = rng.integers(0, 256, (n, h, w), dtype=np.uint8)
    return Sweep(frames=frames, pixel_spacing_xy=(0.2, 0.35), tforms=tforms, timestamps_s=np.arange(n) * 0.05)


def test_export_then_import_reproduces_the_sweep(tmp_path):
    src = tmp_path / "sweep.h5"
    sweep = _sweep()
    write_sweep(sweep, src)
    plus = tmp_path / "sweep.igs.nrrd"
    assert main(["freehand", "export", str(src), str(plus)]) == 0
    back = tmp_path / "back.h5"
    assert main(["freehand", "import", str(plus), str(back)]) == 0
    got = read_sweep(back)
    np.testing.assert_array_equal(got.frames, sweep.frames)
    np.testing.assert_allclose(got.pixel_spacing_xy, sweep.pixel_spacing_xy, rtol=1e-12)
    np.testing.assert_allclose(got.tforms, sweep.tforms, atol=1e-9)
    np.testing.assert_allclose(got.timestamps_s, sweep.timestamps_s, atol=1e-9)


def test_bad_inputs_exit_2_and_write_nothing(tmp_path, capsys):
    src = tmp_path / "sweep.h5"
    write_sweep(_sweep().without_truth(), src)
    assert main(["freehand", "export", str(src), str(tmp_path / "out.igs.nrrd")]) == 2
    assert "tforms" in capsys.readouterr().err
    assert main(["freehand", "import", str(tmp_path / "scan.xyz"), str(tmp_path / "o.h5")]) == 2
    assert "unknown scan format" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.h5"]
    assert not [p for p in tmp_path.iterdir() if is_partial(p)]
