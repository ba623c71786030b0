"""End-to-end freehand reconstruction: acceptance against the phantom, CLI round trips, bad input, demo."""

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from ultrasound_ai.cli import main
from ultrasound_ai.core.atomic import is_partial
from ultrasound_ai.core.errors import Cancelled
from ultrasound_ai.core.geometry import make_rigid
from ultrasound_ai.freehand.compounding import Grid, reconstruct_volume
from ultrasound_ai.freehand.reconstruct import choose_grid, run_reconstruction
from ultrasound_ai.freehand.simulation.phantom import Psf
from ultrasound_ai.freehand.simulation.simulator import simulate_sweep
from ultrasound_ai.io.sweep import read_sweep, write_sweep
from ultrasound_ai.io.volume import read_volume

PSF = Psf()
METRIC_KEYS = {"fdr_pct", "adr_pct", "md_mm", "sd_mm", "hd_mm", "mea_deg", "gpe_mm", "lpe_mm"}


@pytest.fixture(scope="module")
def scanned(tmp_path_factory):
    """A 60-frame linear sweep of 96x104 px (with image noise), its phantom, and its file."""
    sweep, phantom = simulate_sweep(31, n_frames=60, tactic="linear", frame_shape=(96, 104), psf=PSF, reverse=False,
                                    return_phantom=True)
    path = tmp_path_factory.mktemp("scan") / "sweep.h5"
    write_sweep(sweep, path)
    return sweep, phantom, path


def _ncc(a, b, mask):
    a = a[mask].astype(np.float64)
    b = b[mask].astype(np.float64)
    a -= a.mean()
    b -= b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def _perturbed(tforms, mm, deg, seed=0):
    """Every frame but the first moved by `mm` in a random direction and turned by `deg` about a random axis."""
    rng = np.random.default_rng(seed)
    n = len(tforms)
    axis = rng.normal(size=(n, 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    shift = rng.normal(size=(n, 3))
    shift /= np.linalg.norm(shift, axis=1, keepdims=True)
    a = np.radians(deg)
    K = np.zeros((n, 3, 3))
    K[:, 0, 1], K[:, 0, 2], K[:, 1, 2] = -axis[:, 2], axis[:, 1], -axis[:, 0]
    K = K - K.transpose(0, 2, 1)
    R = np.eye(3) + np.sin(a) * K + (1 - np.cos(a)) * K @ K  # Rodrigues
    out = tforms @ make_rigid(R, shift * mm)
    out[0] = tforms[0]
    return out


def test_tracked_reconstruction_matches_the_noise_free_phantom(scanned):
    """Acceptance: NCC >= 0.8 with the phantom's noise-free B-mode on the same grid; 1 mm / 1° pose
    errors lower it by at least 0.1."""
    sweep, phantom, path = scanned
    run = run_reconstruction(path, "tracked", spacing_mm=0.3, make_volume=True)
    grid = Grid.from_volume(run.volume)
    # Reference built without the compounding code: each grid slice is a plane parallel to the first
    # frame (the grid is aligned with it), rendered noise-free at its world pose.
    nk, nj, ni = grid.shape_kji
    D, s = grid.direction, grid.spacing_xyz
    T0 = sweep.tforms[0]  # the estimate's world is the first frame's image space
    reference = np.stack([
        phantom.render_plane(T0 @ make_rigid(D, grid.origin_lps + D[:, 2] * s[2] * k), (nj, ni), (s[0], s[1]), PSF)
        for k in range(nk)
    ])
    covered = run.coverage.array > 0
    assert covered.mean() > 0.5
    ncc = _ncc(run.volume.array, reference, covered)
    assert ncc >= 0.8, ncc
    wrong = reconstruct_volume(sweep.frames, _perturbed(run.tforms, 1.0, 1.0), sweep.pixel_spacing_xy, grid=grid)
    both = covered & (wrong.coverage.array > 0)
    ncc_wrong = _ncc(wrong.volume.array, reference, both)
    assert ncc - ncc_wrong >= 0.1, (ncc, ncc_wrong)


def test_cli_round_trip_tracked(scanned, tmp_path, capsys):
    sweep, _, path = scanned
    est, vol, png = tmp_path / "est.h5", tmp_path / "vol.nrrd", tmp_path / "pic.png"
    assert main(["freehand", "reconstruct", str(path), "--method", "tracked", "--out-sweep", str(est),
                 "--out-volume", str(vol), "--png", str(png), "--spacing", "0.5", "--quiet"]) == 0
    e = read_sweep(est)
    assert np.array_equal(e.frames, sweep.frames)
    assert np.array_equal(e.tforms[0], np.eye(4))
    np.testing.assert_allclose(e.tforms, np.linalg.inv(sweep.tforms[0]) @ sweep.tforms, atol=1e-9)
    assert e.attrs["pose_method"] == "tracked" and e.attrs["seed"] == 31
    assert np.array_equal(e.imu_acc, sweep.imu_acc) and np.array_equal(e.timestamps_s, sweep.timestamps_s)
    v = read_volume(vol)
    np.testing.assert_allclose(v.spacing_xyz, 0.5)
    assert v.array.max() > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    capsys.readouterr()
    assert main(["freehand", "evaluate", str(est), "--truth", str(path)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert METRIC_KEYS <= set(metrics) and metrics["method"] == "tracked"
    for key in METRIC_KEYS:
        assert abs(metrics[key]) < 1e-6, (key, metrics[key])


def test_cli_imu_estimate_file_and_evaluation(scanned, tmp_path, capsys):
    sweep, _, path = scanned
    est = tmp_path / "imu.h5"
    assert main(["freehand", "reconstruct", str(path), "--method", "imu", "--out-sweep", str(est),
                 "--quiet"]) == 0
    e = read_sweep(est)
    assert e.attrs["pose_method"] == "imu"
    assert e.imu_weights.shape == (sweep.n_frames - 1, sweep.n_imus)
    capsys.readouterr()
    assert main(["freehand", "evaluate", str(est), "--truth", str(path), "--out", str(tmp_path / "m.json")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics == json.loads((tmp_path / "m.json").read_text())
    assert metrics["mea_deg"] < 2.0 and metrics["md_mm"] > 0


def test_imu_reconstruction_is_identical_without_tforms_in_the_file(scanned, tmp_path):
    sweep, _, path = scanned
    bare = write_sweep(sweep.without_truth(), tmp_path / "bare.h5")
    a = run_reconstruction(path, "imu", out_sweep=tmp_path / "a.h5")
    b = run_reconstruction(bare, "imu", out_sweep=tmp_path / "b.h5")
    assert a.metrics is not None and b.metrics is None  # evaluation only where the truth is known
    ea, eb = read_sweep(tmp_path / "a.h5"), read_sweep(tmp_path / "b.h5")
    assert np.array_equal(ea.tforms, eb.tforms) and np.array_equal(ea.imu_weights, eb.imu_weights)


def test_bad_inputs_give_exit_2_and_leave_no_output(scanned, tmp_path, capsys):
    sweep, _, path = scanned
    out = tmp_path / "out"
    out.mkdir()
    outputs = ["--out-sweep", str(out / "e.h5"), "--out-volume", str(out / "v.nrrd"), "--png", str(out / "p.png"),
               "--quiet"]
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not an hdf5 file at all")
    assert main(["freehand", "reconstruct", str(garbage)] + outputs) == 2
    assert "garbage.h5" in capsys.readouterr().err
    assert main(["freehand", "reconstruct", str(tmp_path / "missing.h5")] + outputs) == 2
    bare = write_sweep(sweep.without_truth(), tmp_path / "bare.h5")
    assert main(["freehand", "reconstruct", str(bare), "--method", "tracked"] + outputs) == 2
    assert "no 'tforms'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as unknown:  # --method choices come from the registry
        main(["freehand", "reconstruct", str(path), "--method", "nope"] + outputs)
    assert unknown.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err
    assert main(["freehand", "evaluate", str(bare), "--truth", str(path)]) == 2
    assert list(out.iterdir()) == []


def test_cancel_leaves_no_output_and_progress_is_monotone(scanned, tmp_path):
    _, _, path = scanned
    seen = []
    run_reconstruction(path, "tracked", out_sweep=tmp_path / "ok.h5", make_volume=True, spacing_mm=0.6,
                       progress=lambda f, m: seen.append(f))
    assert seen == sorted(seen) and seen[-1] == 1.0
    out = tmp_path / "cancelled"
    fractions = []

    def cancel():
        return bool(fractions) and fractions[-1] >= 0.6  # during compounding

    with pytest.raises(Cancelled):
        run_reconstruction(path, "tracked", out_sweep=out / "e.h5", out_volume=out / "v.nrrd", spacing_mm=0.6,
                           progress=lambda f, m: fractions.append(f), cancel=cancel)
    assert not out.exists() or not any(out.iterdir())


def test_huge_grids_are_coarsened_with_a_note(scanned):
    sweep, _, _ = scanned
    tforms = np.linalg.inv(sweep.tforms[0]) @ sweep.tforms
    grid, spacing, note = choose_grid(tforms, sweep.frames.shape[1:], sweep.pixel_spacing_xy, 0.1, max_voxels=50_000)
    assert spacing > 0.1 and grid.n_voxels <= 50_000 and "raised" in note
    grid2, spacing2, note2 = choose_grid(tforms, sweep.frames.shape[1:], sweep.pixel_spacing_xy, 0.5)
    assert spacing2 == 0.5 and note2 is None


def test_demo_writes_a_slicer_scene_that_references_its_files(tmp_path):
    from ultrasound_ai.demo import run_demo

    lines = []
    result = run_demo(tmp_path / "demo", n_frames=20, frame_shape=(48, 52), spacing_mm=0.6, png=False, quiet=True,
                      methods=("tracked", "imu"), log=lines.append)
    out = tmp_path / "demo"
    assert set(result["metrics"]) == {"tracked", "imu"}
    assert abs(result["metrics"]["tracked"]["md_mm"]) < 1e-9
    table = "\n".join(lines)
    assert "FDR (%)" in table and "imu" in table and "MEA" in table
    root = ET.parse(out / "scene.mrml").getroot()
    files = [el.get("fileName") for el in root if el.get("fileName")]
    assert sorted(files) == sorted(["tracked_volume.nrrd", "imu_volume.nrrd", "tracked_trajectory.mrk.json",
                                    "imu_trajectory.mrk.json", "true_trajectory.mrk.json"])
    for f in files:
        assert (out / f).is_file()
    curve = json.loads((out / "imu_trajectory.mrk.json").read_text())["markups"][0]
    assert curve["type"] == "Curve" and curve["coordinateSystem"] == "LPS" and len(curve["controlPoints"]) == 20
    assert not [p for p in out.iterdir() if is_partial(p)]

    # The scene really opens in MRML: the volumes with the NRRD's geometry, the curves in RAS.
    from ultrasound_ai.io.volume import read_volume
    from ultrasound_ai.mrml import curve_to_trajectory, ijk_to_ras, new_scene

    scene = new_scene()
    scene.SetURL(str(out / "scene.mrml"))
    assert scene.Connect() == 1
    volumes = {n.GetName(): n for n in (scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
                                         for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")))}
    assert len(volumes) == 2
    nrrd = read_volume(out / "tracked_volume.nrrd")
    node = next(n for name, n in volumes.items() if name.startswith("tracked"))
    np.testing.assert_allclose(ijk_to_ras(node), np.diag([-1, -1, 1, 1]) @ nrrd.ijk_to_lps(), atol=1e-6)
    curves = [scene.GetNthNodeByClass(i, "vtkMRMLMarkupsCurveNode")
              for i in range(scene.GetNumberOfNodesByClass("vtkMRMLMarkupsCurveNode"))]
    assert len(curves) == 3
    lps = [np.array([p["position"] for p in json.loads((out / f).read_text())["markups"][0]["controlPoints"]])
           for f in ("tracked_trajectory.mrk.json",)]
    tracked_curve = next(c for c in curves if c.GetName().startswith("tracked"))
    np.testing.assert_allclose(curve_to_trajectory(tracked_curve), lps[0], atol=1e-6)
    scene.Clear(1)


def test_job_task_runs_in_the_worker(scanned, tmp_path, monkeypatch):
    import io

    from ultrasound_ai.jobs.worker import EventWriter, execute

    _, _, path = scanned
    stream = io.StringIO()
    job = {"task": "freehand.reconstruct", "inputs": {"sweep": str(path)},
           "outputs": {"estimate": str(tmp_path / "est.h5"), "volume": str(tmp_path / "vol.nrrd")},
           "parameters": {"method": "imu", "spacing_mm": 0.8}, "device": "cpu"}
    assert execute(job, EventWriter(stream)) == 0
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    result = events[-1]
    assert result["event"] == "result" and result["result"]["method"] == "imu"
    assert result["result"]["paths"]["volume"] == str(tmp_path / "vol.nrrd")
    assert any(e["event"] == "progress" and 0 < e["fraction"] < 1 for e in events)
    assert read_sweep(tmp_path / "est.h5").attrs["pose_method"] == "imu"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["est.h5", "vol.nrrd"]
    bad = dict(job, parameters={"method": "imu", "colour": "red"}, outputs={"estimate": str(tmp_path / "x.h5")})
    assert execute(bad, EventWriter(io.StringIO())) == 2
    assert not (tmp_path / "x.h5").exists()


def test_demo_adds_learned_methods_only_when_a_model_is_installed(tmp_path, monkeypatch):
    from ultrasound_ai.demo import default_demo_methods
    from ultrasound_ai.freehand.fima.model import FimaNet, make_config
    from ultrasound_ai.models import registry
    from ultrasound_ai.models.checkpoint import save_checkpoint

    empty, models = tmp_path / "empty", tmp_path / "models"
    empty.mkdir()
    models.mkdir()
    monkeypatch.setattr(registry, "SHIPPED_MODELS_DIR", empty)
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    assert default_demo_methods() == ["tracked", "imu"]
    cfg = make_config("tiny", "fima")
    save_checkpoint(FimaNet(cfg).state_dict(), models / "fima_tiny.pt",
                    {"name": "fima_tiny", "method": "fima", "configuration": {"preset": "tiny", **cfg.to_dict()},
                     "input": {}, "training": {}, "metrics": {}})
    monkeypatch.setenv(registry.ENV_VAR, str(models))
    assert default_demo_methods() == ["tracked", "imu", "fima"]


def test_frames_without_an_image_are_named_in_the_run_notes():
    """Stretches of uniform frames (probe lifted off, frozen screen) carry no motion a method can read: the run's
    notes name them (0-based frame indices); a sweep without them gets no such note."""
    import dataclasses

    sweep = simulate_sweep(2, n_frames=14, frame_shape=(40, 48), n_imus=0)
    assert not any("no image" in n for n in run_reconstruction(sweep, "tracked", evaluate=False).notes)
    frames = sweep.frames.copy()
    frames[4:7] = 0
    frames[11] = 128
    run = run_reconstruction(dataclasses.replace(sweep, frames=frames), "tracked", evaluate=False)
    notes = [n for n in run.notes if "no image" in n]
    assert len(notes) == 1 and "frames 4-6, 11 (4 of 14)" in notes[0]
