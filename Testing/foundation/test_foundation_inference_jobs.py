"""Foundation inference at the physical pixel size, ultrasound DICOM regions (real files from pydicom-data),
the classifier study's metric, and the job tasks foundation.segment / foundation.classify end to end."""

import io
import json
from pathlib import Path

import data_store  # the pydicom-data package: real ultrasound DICOM files (test extra)
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from ultrasound_ai.core.atomic import is_partial
from ultrasound_ai.core.errors import InputError
from ultrasound_ai.foundation.bmode_sim import simulate_batch, simulate_bmode
from ultrasound_ai.foundation.classifier_study import confusion, macro_f1
from ultrasound_ai.foundation.dicom_regions import image_region
from ultrasound_ai.foundation.inference import (
    LoadedModel,
    classify,
    load_model,
    resampling_plan,
    segment,
    window_starts,
)
from ultrasound_ai.foundation.losses import dice_per_class
from ultrasound_ai.jobs.worker import CancelState, EventWriter, execute

DICOM = Path(data_store.__file__).parent / "data"


@pytest.fixture(scope="module")
def seg_model():
    return load_model("usfm_seg_lesion", "cpu", "segment")


# ------------------------------------------------------------------------------------ windows, resampling


def test_window_starts_cover_the_length_and_end_flush():
    assert window_starts(100, 128) == [0]
    assert window_starts(128, 128) == [0]
    assert window_starts(300, 128) == [0, 96, 172]
    for n in (129, 200, 257, 1000):
        s = window_starts(n, 128)
        assert s[0] == 0 and s[-1] == n - 128 and all(0 < b - a <= 96 for a, b in zip(s, s[1:]))


def test_plan_resamples_each_axis_by_its_own_spacing():
    # x spacing 0.5 mm, y 0.25 mm onto 0.3125 mm pixels: an axis swap would give other sizes.
    plan = resampling_plan((200, 100), 128, (0.5, 0.25), (0.3125, 0.3125))
    assert plan.resampled == (160, 160) and plan.padded == (160, 160)
    assert plan.windows == [(0, 0), (0, 32), (32, 0), (32, 32)]  # 160 px: starts 0 and 160 - 128
    # Without a physical size (or a card without one): one window, the whole frame resized.
    assert resampling_plan((200, 100), 128, None, (0.3125, 0.3125)).windows == [(0, 0)]
    assert resampling_plan((200, 100), 128, (0.5, 0.25), None).resampled == (128, 128)


def test_at_the_training_pixel_size_windowing_equals_the_plain_model(seg_model):
    img = simulate_bmode(5, 128, label=1).image
    with pytest.warns(UserWarning, match="no physical pixel size"):
        plain, p_plain = segment(img, seg_model)
    windowed, p_win = segment(img, seg_model, pixel_spacing_mm=(0.3125, 0.3125))
    np.testing.assert_allclose(p_win, p_plain, atol=1e-5)
    assert np.array_equal(windowed, plain)


def test_resampling_to_the_training_pixel_size_beats_resizing_a_wide_field(seg_model):
    # A 2x2 mosaic of 40 mm simulated images is an 80 mm field at the training pixel size (0.3125 mm).
    tiles = simulate_batch(4242, range(4), 128, labels=[0, 1])
    image = np.block([[tiles[0].image, tiles[1].image], [tiles[2].image, tiles[3].image]])
    truth = np.block([[tiles[0].mask, tiles[1].mask], [tiles[2].mask, tiles[3].mask]])
    resampled, _ = segment(image, seg_model, pixel_spacing_mm=(0.3125, 0.3125))
    with pytest.warns(UserWarning):
        squeezed, _ = segment(image, seg_model)  # old behaviour: the 80 mm field squeezed into 128 px
    d_res = float(dice_per_class(resampled, truth, 2)[-1])
    d_sq = float(dice_per_class(squeezed, truth, 2)[-1])
    assert d_res > 0.6 and d_res > d_sq + 0.1, (d_res, d_sq)


def test_region_limits_the_work_and_outside_is_background(seg_model):
    img = np.full((150, 200), 0.9, dtype=np.float32)
    img[20:148, 40:168] = simulate_bmode(9, 128, label=0).image
    labels, probs = segment(img, seg_model, pixel_spacing_mm=(0.3125, 0.3125), region=(40, 20, 167, 147))
    assert labels[:20].sum() == 0 and labels[:, :40].sum() == 0 and np.all(probs[0, :20] == 1.0)
    with pytest.raises(InputError, match="region"):
        segment(img, seg_model, region=(40, 20, 200, 147))


class _MeanBrightnessIsNormal(torch.nn.Module):
    """A stand-in classifier with a known rule: brighter windows look 'normal', dark ones 'malignant'."""

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(m), -4 * m, 4 * m], 1)


def test_classify_reports_the_most_lesion_like_window():
    card = {"configuration": {"task": "classify", "class_names": ["benign", "malignant", "normal"],
                              "vit": {"img_size": 32}}, "input": {"pixel_spacing_mm": [1.0, 1.0]}}
    lm = LoadedModel(_MeanBrightnessIsNormal(), card, torch.device("cpu"))
    img = np.full((64, 96), 230, dtype=np.uint8)
    img[40:64, 70:96] = 13  # one dark corner
    probs, names = classify(img, lm, pixel_spacing_mm=(1.0, 1.0))
    dark = img[32:64, 64:96] / 255.0  # the window over the dark corner (starts 0/24/32 and 0/24/48/64)
    expected = torch.softmax(_MeanBrightnessIsNormal()(torch.from_numpy((dark[None, None] - 0.5) / 0.25)), 1)[0]
    np.testing.assert_allclose(probs, expected.numpy(), atol=1e-5)
    assert names[int(np.argmax(probs))] == "malignant"


# ------------------------------------------------------------------------------------------ metrics


def test_macro_f1_hand_computed():
    truth = [0, 0, 0, 1, 1, 2]
    pred = [0, 0, 1, 1, 2, 2]
    # F1: class 0 = 2*2/(4+0+1) = 0.8; class 1 = 2*1/(2+1+1) = 0.5; class 2 = 2*1/(2+1+0) = 2/3.
    assert macro_f1(truth, pred, 3) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert confusion(truth, pred, 3).tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert macro_f1([0, 0], [0, 0], 3) == pytest.approx(1 / 3)  # absent, never-predicted classes score 0


# ------------------------------------------------------------------------------ DICOM ultrasound regions


def test_dicom_regions_of_real_scanner_files():
    ob = image_region(DICOM / "OBXXXX1A.dcm")  # Philips, palette colour; MaxX1 = 800 on an 800-wide image
    assert ob.bounds == (120, 60, 799, 518) and ob.regions == 1
    assert ob.pixel_spacing_mm == pytest.approx((0.2622878766, 0.2622878766))
    aloka = image_region(DICOM / "gdcm-US-ALOKA-16.dcm")  # a dual view: two tissue regions at one pixel size
    assert aloka.bounds == (32, 24, 639, 415) and aloka.regions == 2
    assert aloka.pixel_spacing_mm == pytest.approx((0.3826530650, 0.3826530650))
    cine = image_region(DICOM / "color3d_jpeg_baseline.dcm")
    assert cine.bounds == (84, 31, 595, 414) and cine.pixel_spacing_mm == pytest.approx((0.5104970559,) * 2)
    assert image_region(DICOM / "US1_UNCR.dcm") is None  # GE file without regions
    with pytest.raises(InputError, match="not found"):
        image_region(DICOM / "missing.dcm")


# ------------------------------------------------------------------------------------------ job tasks


_DECODED: dict = {}


def _as_slicer_reads(name: str, path: Path, frames=None) -> Path:
    """The DICOM pixels as ITK's GDCM reader gives them (RGB, 1 mm pixels), saved as NRRD (each file is
    decoded once per session: the 120-frame JPEG cine takes seconds)."""
    if name not in _DECODED:
        _DECODED[name] = sitk.ReadImage(str(DICOM / name))
    img = _DECODED[name]
    if frames is not None:
        img = img[:, :, frames[0]:frames[1]]
    sitk.WriteImage(img, str(path))
    return path


def _run(job, cancel_after_first_frame=False):
    buf = io.StringIO()
    cancel = CancelState()

    class _Writer(EventWriter):
        def emit(self, event, **fields):
            super().emit(event, **fields)
            if cancel_after_first_frame and event == "progress" and "frame 1 of" in fields.get("message", ""):
                cancel.request("test")

    code = execute(job, _Writer(buf), cancel)
    return code, [json.loads(line) for line in buf.getvalue().splitlines()]


def test_segment_job_on_a_real_cine_keeps_the_input_geometry(tmp_path):
    src = _as_slicer_reads("color3d_jpeg_baseline.dcm", tmp_path / "cine.nrrd", frames=(10, 12))
    spacing = image_region(DICOM / "color3d_jpeg_baseline.dcm").pixel_spacing_mm
    # A part of the sector (the whole 512 x 384 px region at 0.51 mm is ~120 model windows a frame on CPU).
    bounds = (250, 150, 349, 229)
    job = {"task": "foundation.segment", "inputs": {"image": str(src)},
           "outputs": {"labels": str(tmp_path / "lab.nrrd"), "table": str(tmp_path / "t.csv")},
           "parameters": {"pixel_spacing_mm": list(spacing), "region": list(bounds)}, "device": "cpu"}
    code, events = _run(job)
    assert code == 0, events[-1]
    res = events[-1]["result"]
    assert res["frame_indices"] == [0, 1] and res["label_names"] == ["background", "lesion"] and not res["warnings"]
    fractions = [e["fraction"] for e in events if e["event"] == "progress"]
    assert fractions == sorted(fractions) and any("frame 2 of 2" in e.get("message", "") for e in events)
    ref, out = sitk.ReadImage(str(src)), sitk.ReadImage(str(tmp_path / "lab.nrrd"))
    assert out.GetSize() == ref.GetSize() and out.GetNumberOfComponentsPerPixel() == 1
    assert out.GetSpacing() == ref.GetSpacing() and out.GetOrigin() == ref.GetOrigin()
    labels = sitk.GetArrayFromImage(out)
    x0, y0, x1, y1 = bounds
    assert labels[:, :y0].sum() == 0 and labels[:, :, x1 + 1:].sum() == 0  # nothing outside the region
    assert (tmp_path / "t.csv").read_text().splitlines()[0] == "frame,fraction_background,fraction_lesion"

    # One frame only (the panel's "current frame"): a one-slice volume where that frame lies.
    job["parameters"]["frame"] = 1
    code, events = _run(job)
    out = sitk.ReadImage(str(tmp_path / "lab.nrrd"))
    assert code == 0 and out.GetSize()[2] == 1
    assert out.GetOrigin() == pytest.approx(ref.TransformIndexToPhysicalPoint((0, 0, 1)))
    assert np.array_equal(sitk.GetArrayFromImage(out)[0], labels[1])


def test_segment_job_without_physical_size_warns_and_cancel_leaves_nothing(tmp_path):
    src = _as_slicer_reads("US1_UNCR.dcm", tmp_path / "us1.nrrd")
    job = {"task": "foundation.segment", "inputs": {"image": str(src)},
           "outputs": {"labels": str(tmp_path / "lab.nrrd")}, "parameters": {}, "device": "cpu"}
    code, events = _run(job)
    assert code == 0 and "no physical pixel size" in events[-1]["result"]["warnings"][0]
    assert any(e["event"] == "log" and "no physical pixel size" in e["message"] for e in events)

    cine = _as_slicer_reads("color3d_jpeg_baseline.dcm", tmp_path / "cine.nrrd", frames=(0, 3))
    job = {**job, "inputs": {"image": str(cine)}, "outputs": {"labels": str(tmp_path / "c.nrrd")}}
    code, events = _run(job, cancel_after_first_frame=True)
    assert code == 3 and events[-1]["event"] == "cancelled"
    assert not (tmp_path / "c.nrrd").exists() and not any(is_partial(p) for p in tmp_path.iterdir())


@pytest.mark.parametrize("change, match", [
    ({"inputs": {"image": "NOTE.txt"}}, "unreadable"),
    ({"parameters": {"region": [0, 0, 5000, 10]}}, "region"),
    ({"parameters": {"pixel_spacing_mm": [0.2, -1]}}, "pixel_spacing_mm"),
    ({"parameters": {"frame": 7}}, "frame"),
    ({"parameters": {"model": "usfm_vit_tiny_pretrained"}}, "'segment' model"),
    ({"parameters": {"stride": 2}}, "unknown parameter"),
    ({"outputs": {"labels": "out.png.txt"}}, "extension"),
])
def test_bad_input_exits_2_naming_it(tmp_path, change, match):
    (tmp_path / "NOTE.txt").write_text("not an image")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((40, 50), np.uint8)), str(tmp_path / "img.nrrd"))
    job = {"task": "foundation.segment", "inputs": {"image": str(tmp_path / "img.nrrd")},
           "outputs": {"labels": str(tmp_path / "lab.nrrd")}, "parameters": {}, "device": "cpu"}
    for key, value in change.items():
        job[key] = {k: (str(tmp_path / v) if key != "parameters" else v) for k, v in value.items()}
    code, events = _run(job)
    assert code == 2 and events[-1]["event"] == "error" and match in events[-1]["message"], events[-1]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(("lab", ".lab", "out", ".out"))] == []


def test_cli_takes_pixel_size_and_region_from_the_dicom_file(tmp_path, capsys):
    from ultrasound_ai.cli import main as cli_main

    src = _as_slicer_reads("OBXXXX1A.dcm", tmp_path / "ob.nrrd")
    assert cli_main(["foundation", "segment", str(src), "--model", "usfm_seg_lesion", "--output",
                     str(tmp_path / "lab.nrrd"), "--dicom", str(DICOM / "OBXXXX1A.dcm"), "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["pixel_spacing_mm"] == pytest.approx([0.2622878766] * 2) and out["region"] == [120, 60, 799, 518]
    assert sitk.ReadImage(str(tmp_path / "lab.nrrd")).GetSize() == (800, 600, 1)


def test_independent_bmode_family_is_separate_and_deterministic():
    import ast

    from ultrasound_ai.validation import bmode_indep

    tree = ast.parse(Path(bmode_indep.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(m.startswith("ultrasound_ai") for m in imported), imported  # nothing from the simulator
    a, la = bmode_indep.generate(3, 5)
    b, lb = bmode_indep.generate(3, 5)
    assert la == lb and np.array_equal(a, b) and not np.array_equal(a, bmode_indep.generate(3, 6)[0])
    assert a.shape == (128, 128) and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    assert a[0, 0] == 0 and a[0, -1] == 0 and a[64, 64] > 0  # black outside the convex fan
    _, labels = bmode_indep.generate_set(1, 30, 64)
    assert set(labels.tolist()) == {0, 1, 2}
