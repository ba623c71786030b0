"""The streamed ULM pipeline and the `ulm process` / `ulm evaluate` verbs."""

import json

import h5py
import numpy as np
import pytest

from ultrasound_ai.cli import main
from ultrasound_ai.core.atomic import is_partial
from ultrasound_ai.core.errors import Cancelled, InputError
from ultrasound_ai.io.ulm_files import read_result, write_acquisition
from ultrasound_ai.ulm.metrics import evaluate_result
from ultrasound_ai.ulm.pipeline import UlmParams, process_acquisition, register_localizer

# A fixed N (the classical default of the past) keeps these tests off the counting network.
FAST = dict(min_track_length=5, block_frames=64, bubbles_per_frame=40)


def _same(r1, r2):
    np.testing.assert_array_equal(r1.localizations, r2.localizations)
    for k in ("density", "direction", "velocity_mm_s"):
        np.testing.assert_array_equal(getattr(r1, k), getattr(r2, k))


def test_clean_acquisition_known_accuracy(clean_acquisition):
    res = process_acquisition(clean_acquisition, "rs", dict(svd_cutoff=None, **FAST))
    acq = clean_acquisition
    assert res.localizations.shape[1] == 5 and (res.localizations[:, 4] >= 0).any()
    assert res.density.shape == res.direction.shape == res.velocity_mm_s.shape
    assert res.pixel_size_mm[0] == pytest.approx(acq.wavelength_mm / 10)
    m = evaluate_result(res, acq.gt_positions, acq.wavelength_mm, acq.frame_rate_hz)
    assert m["raw"]["jaccard"] > 0.6 and m["raw"]["loc_error_lambda"] < 0.15
    assert m["tracked"]["precision"] > 0.8
    assert m["ssim"] > 0.5


def test_blocks_do_not_change_the_result(clean_acquisition):
    # Without SVD (which depends on the block), streaming in blocks of 16, 37 or all frames gives the
    # same localizations, the same tracks (they continue across block boundaries) and the same maps.
    kw = dict(svd_cutoff=None, min_track_length=5, bubbles_per_frame=40)
    whole = process_acquisition(clean_acquisition, "wa", dict(kw, block_frames=1000))
    for b in (16, 37):
        _same(process_acquisition(clean_acquisition, "wa", dict(kw, block_frames=b)), whole)


def test_overlapping_blocks_cover_each_frame_once(clean_acquisition):
    res = process_acquisition(clean_acquisition, "rs", dict(svd_cutoff=2, band_hz=(20, 400), block_frames=48,
                                                           bubbles_per_frame=7, min_track_length=3, max_maxima=None))
    per_frame = np.bincount(res.localizations[:, 0].astype(int), minlength=clean_acquisition.n_frames)
    assert (per_frame == 7).all()


def test_file_input_outputs_and_ground_truth_independence(tmp_path, small_acquisition, small_acquisition_file):
    out, png = tmp_path / "res.h5", tmp_path / "res.png"
    fractions = []
    res = process_acquisition(small_acquisition_file, "rs", dict(**FAST), out, png=png,
                              progress=lambda f, msg: fractions.append(f))
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) >= 3
    _same(read_result(out), res)
    assert png.stat().st_size > 0
    # The same acquisition without its ground truth, from a file and from memory: identical results.
    no_gt = tmp_path / "nogt.h5"
    write_acquisition(small_acquisition.without_truth(), no_gt)
    _same(process_acquisition(no_gt, "rs", dict(**FAST)), res)
    _same(process_acquisition(small_acquisition.without_truth(), "rs", dict(**FAST)), res)


def test_cancel_leaves_no_output(tmp_path, clean_acquisition):
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 1

    with pytest.raises(Cancelled):
        process_acquisition(clean_acquisition, "rs", dict(**FAST), tmp_path / "r.h5", cancel_check=cancel)
    assert list(tmp_path.iterdir()) == []


def test_registry_and_bad_parameters(clean_acquisition):
    seen = []

    class Fixed:
        def __init__(self, ctx):
            self.ctx = ctx

        def push(self, frames, start):
            seen.append((start, frames.shape[0]))
            n = frames.shape[0]
            return np.column_stack([start + np.arange(n), np.full(n, 5.0), np.full(n, 0.0), np.ones(n)])

        def finish(self):
            return np.zeros((0, 4))

    register_localizer("fixed-test", Fixed)
    res = process_acquisition(clean_acquisition, "fixed-test", dict(svd_cutoff=None, block_frames=30, min_track_length=2,
                                                                           bubbles_per_frame=1))
    assert [s for s, _ in seen] == [0, 30, 60, 90] and sum(n for _, n in seen) == clean_acquisition.n_frames
    assert (res.localizations[:, 4] == 0).all()  # one still bubble: one track over all the blocks
    with pytest.raises(InputError, match="method"):
        process_acquisition(clean_acquisition, "gauss")
    with pytest.raises(InputError, match="link distance"):
        process_acquisition(clean_acquisition, "rs", dict(link_distance_px=-1))
    with pytest.raises(InputError, match="unknown"):
        process_acquisition(clean_acquisition, "rs", dict(linking=3))
    with pytest.raises(InputError, match="counting network.*no_such_counter.pt"):
        process_acquisition(clean_acquisition, "rs", UlmParams(counting_network=True, model="/nowhere/no_such_counter.pt"))
    with pytest.raises(InputError, match="device"):
        process_acquisition(clean_acquisition, "rs", dict(device="tpu"))


def test_cli_process_and_evaluate(tmp_path, small_acquisition_file, capsys):
    out, png = tmp_path / "r.h5", tmp_path / "r.png"
    code = main(["ulm", "process", str(small_acquisition_file), "--method", "wa", "--out", str(out), "--png", str(png),
                 "--block-frames", "100", "--min-track-length", "5", "--link-distance", "1.5", "--quiet"])
    assert code == 0 and out.exists() and png.exists()
    assert read_result(out).attrs["params"]["link_distance_px"] == 1.5
    capsys.readouterr()
    assert main(["ulm", "evaluate", str(out), "--truth", str(small_acquisition_file)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    for key in ("jaccard", "precision", "recall", "loc_error_lambda", "loc_error_mm", "ssim", "rmse"):
        assert key in metrics and key in metrics["raw"] or key in ("ssim", "rmse")
    assert 0 <= metrics["raw"]["jaccard"] <= 1 and -1 <= metrics["ssim"] <= 1


def _bad_file(path, data, attrs):
    with h5py.File(path, "w") as f:
        f.create_dataset("iq", data=data)
        for k, v in attrs.items():
            f.attrs[k] = v
    return path


@pytest.mark.parametrize("case", ["2d", "dtype", "no_pixel_size"])
def test_cli_bad_inputs_exit_2(tmp_path, case, capsys):
    attrs = dict(pixel_size_mm=[0.1, 0.1], origin_mm=[0.0, 0.0], frame_rate_hz=1000.0, wavelength_mm=0.1)
    data = np.zeros((20, 16, 16), np.complex64)
    if case == "2d":
        data = data[0]
    elif case == "dtype":
        data = np.zeros((20, 16, 16), np.int16)
    else:
        del attrs["pixel_size_mm"]
    path = _bad_file(tmp_path / "bad.h5", data, attrs)
    code = main(["ulm", "process", str(path), "--out", str(tmp_path / "out.h5"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert {"2d": "3-D", "dtype": "complex64", "no_pixel_size": "pixel_size_mm"}[case] in err
    assert not (tmp_path / "out.h5").exists() and not [p for p in tmp_path.iterdir() if is_partial(p)]


# ------------------------------------------------------------------- short tail, counter, window stride


def _first_frames(acq, n):
    from ultrasound_ai.io.ulm_files import Acquisition

    return Acquisition(iq=acq.iq[:n], pixel_size_mm=acq.pixel_size_mm, origin_mm=acq.origin_mm,
                       frame_rate_hz=acq.frame_rate_hz, wavelength_mm=acq.wavelength_mm)


def test_short_last_block_is_merged_into_the_previous_one(clean_acquisition):
    from ultrasound_ai.ulm.clutter import svd_filter

    acq = _first_frames(clean_acquisition, 20)
    pushed = []

    class Record:
        def __init__(self, ctx):
            pass

        def push(self, frames, start):
            pushed.append((start, frames.copy()))
            return np.zeros((0, 4))

        def finish(self):
            return np.zeros((0, 4))

    register_localizer("record-test", Record)
    # 20 frames in blocks of 8 with cutoff 4: the 4-frame tail (no more frames than the cutoff) used to
    # fail in parse_cutoff; it is filtered together with the block before it.
    process_acquisition(acq, "record-test", dict(svd_cutoff=4, block_frames=8, device="cpu"))
    assert [(s, f.shape[0]) for s, f in pushed] == [(0, 8), (8, 12)]
    np.testing.assert_allclose(pushed[0][1], svd_filter(acq.iq[:8], 4), atol=1e-4)
    np.testing.assert_allclose(pushed[1][1], svd_filter(acq.iq[8:], 4), atol=1e-4)
    # The same through a real method: every frame localized once, with its N detections.
    res = process_acquisition(acq, "rs", dict(svd_cutoff=4, block_frames=8, bubbles_per_frame=5, max_maxima=None,
                                              min_track_length=2, device="cpu"))
    assert np.bincount(res.localizations[:, 0].astype(int), minlength=20).tolist() == [5] * 20
    # With a band-pass too (overlapping blocks), the merged tail still tiles the frames exactly.
    pushed.clear()
    process_acquisition(_first_frames(clean_acquisition, 70), "record-test",
                        dict(svd_cutoff=4, band_hz=(20, 400), block_frames=40, margin_frames=4, device="cpu"))
    starts = [s for s, _ in pushed]
    assert starts == [0, 36] and sum(f.shape[0] for _, f in pushed) == 70
    with pytest.raises(InputError, match="block_frames"):
        process_acquisition(acq, "rs", dict(svd_cutoff=4, block_frames=4))


def test_counting_network_drives_the_classical_methods(tiny_dml_checkpoint, tiny_acq, tmp_path, one_torch_thread):
    from ultrasound_ai.ulm.clutter import svd_filter
    from ultrasound_ai.ulm.dml_inference import DmlFrameCounter

    params = dict(counting_network=True, model=str(tiny_dml_checkpoint), device="cpu", max_maxima=None,
                  min_track_length=2)
    res = process_acquisition(tiny_acq, "rs", dict(params))
    # The counts are the checkpoint's counting network on the SVD-filtered block (one block here).
    counts = DmlFrameCounter(tiny_dml_checkpoint, "cpu")(svd_filter(tiny_acq.iq, 4), 0)
    assert counts.shape == (24,) and counts.sum() > 0
    ref = process_acquisition(tiny_acq, "rs", dict(params, counting_network=False, bubbles_per_frame=counts))
    np.testing.assert_array_equal(res.localizations, ref.localizations)
    assert res.attrs["params"]["counting_network"] is True
    # Through the CLI as well (wa), and a missing checkpoint is named in a clear error (exit 2).
    acq_path, out = tmp_path / "a.h5", tmp_path / "r.h5"
    write_acquisition(tiny_acq, acq_path)
    assert main(["ulm", "process", str(acq_path), "--method", "wa", "--counting-network", "--model",
                 str(tiny_dml_checkpoint), "--device", "cpu", "--out", str(out), "--quiet"]) == 0
    assert read_result(out).localizations.shape[0] > 0
    assert main(["ulm", "process", str(acq_path), "--counting-network", "--model", str(tmp_path / "gone.pt"),
                 "--out", str(tmp_path / "r2.h5"), "--quiet"]) == 2
    assert not (tmp_path / "r2.h5").exists()
    with pytest.raises(InputError, match="counting network.*gone.pt"):
        process_acquisition(tiny_acq, "rs", dict(params, model="/missing/gone.pt"))


def test_window_stride_reaches_the_3dml_runner(tiny_dml_checkpoint, tiny_acq, one_torch_thread, tmp_path):
    from ultrasound_ai.ulm.dml_inference import localize_3dml

    base = dict(model=str(tiny_dml_checkpoint), device="cpu", svd_cutoff=None, bubbles_per_frame=4,
                min_track_length=2, block_frames=10, window_mode="sliding")
    got = {}
    for stride in (1, 3):
        res = process_acquisition(tiny_acq, "3dml", dict(base, window_stride=stride))
        ref = localize_3dml(tiny_acq, model=tiny_dml_checkpoint, device="cpu", bubbles_per_frame=4,
                            window_mode="sliding", window_stride=stride)
        np.testing.assert_allclose(res.localizations[:, :4], ref, rtol=0, atol=1e-6)
        assert res.attrs["params"]["window_stride"] == stride
        got[stride] = res.localizations
    assert not np.array_equal(got[1], got[3])  # the stride really changed the averaging
    # Tiled windows (each frame once) differ from sliding ones; the defaults are sliding at stride 2, as
    # localize_3dml's.
    tiled = process_acquisition(tiny_acq, "3dml", dict(base, window_mode="tiled"))
    ref = localize_3dml(tiny_acq, model=tiny_dml_checkpoint, device="cpu", bubbles_per_frame=4, window_mode="tiled")
    np.testing.assert_allclose(tiled.localizations[:, :4], ref, rtol=0, atol=1e-6)
    assert not np.array_equal(tiled.localizations, got[1])
    default = dict(base)
    del default["window_mode"]
    res = process_acquisition(tiny_acq, "3dml", default)
    ref = localize_3dml(tiny_acq, model=tiny_dml_checkpoint, device="cpu", bubbles_per_frame=4)
    np.testing.assert_allclose(res.localizations[:, :4], ref, rtol=0, atol=1e-6)
    assert res.attrs["params"]["window_mode"] == "inner" and res.attrs["params"]["window_stride"] is None
    assert res.attrs["params"]["rs_agreement_px"] == pytest.approx(0.3)
    # --rs-agreement reaches the runner (0: the network's offsets alone; 5 px: nearly always averaged).
    runs = {}
    for agreement in (0, 5):
        runs[agreement] = process_acquisition(tiny_acq, "3dml", dict(default, rs_agreement_px=agreement))
        ref = localize_3dml(tiny_acq, model=tiny_dml_checkpoint, device="cpu", bubbles_per_frame=4,
                            rs_agreement_px=agreement)
        np.testing.assert_allclose(runs[agreement].localizations[:, :4], ref, rtol=0, atol=1e-6)
        assert runs[agreement].attrs["params"]["rs_agreement_px"] == agreement
    assert not np.allclose(runs[0].localizations[:, 1:3], runs[5].localizations[:, 1:3])
    # --precision reaches the runner (auto = int8 on CPU here; fp32 = the arithmetic before).
    assert res.attrs["params"]["precision"] == "auto"
    runs = {}
    for precision in ("int8", "fp32"):
        runs[precision] = process_acquisition(tiny_acq, "3dml", dict(default, precision=precision))
        ref = localize_3dml(tiny_acq, model=tiny_dml_checkpoint, device="cpu", bubbles_per_frame=4,
                            precision=precision)
        np.testing.assert_allclose(runs[precision].localizations[:, :4], ref, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(runs["int8"].localizations, res.localizations)
    assert not np.array_equal(runs["int8"].localizations, runs["fp32"].localizations)
    with pytest.raises(InputError, match="--precision"):
        process_acquisition(tiny_acq, "3dml", dict(base, precision="fp16"))
    with pytest.raises(InputError, match="window mode"):
        process_acquisition(tiny_acq, "3dml", dict(base, window_mode="paper"))
    for bad in (0, 1.5, "two"):
        with pytest.raises(InputError, match="window stride"):
            process_acquisition(tiny_acq, "3dml", dict(base, window_stride=bad))
    acq_path, out = tmp_path / "a.h5", tmp_path / "r.h5"
    write_acquisition(tiny_acq, acq_path)
    cli = ["ulm", "process", str(acq_path), "--method", "3dml", "--model", str(tiny_dml_checkpoint), "--device", "cpu",
           "--svd-cutoff", "0", "--bubbles-per-frame", "4", "--min-track-length", "2", "--block-frames", "10",
           "--window-mode", "sliding", "--out", str(out), "--quiet"]
    assert main(cli + ["--window-stride", "3"]) == 0
    np.testing.assert_array_equal(read_result(out).localizations, got[3])
    assert main(cli + ["--window-stride", "0"]) == 2


def test_rows_tracked_part_by_part_give_the_result_of_whole_blocks(tiny_dml_checkpoint, tiny_acq, one_torch_thread):
    # The 3DML runner hands its rows to the pipeline's tracker batch by batch (push_into), so tracking runs
    # while the next windows are predicted; the result must be that of the same localizer pushing whole
    # blocks (a localizer without push_into).
    from ultrasound_ai.ulm.pipeline import dml_localizer

    parts = []

    class WholeBlocks:
        def __init__(self, ctx):
            self.inner = dml_localizer(ctx)

        def push(self, frames, start):
            return self.inner.push(frames, start)

        def finish(self):
            return self.inner.finish()

    class Counting(WholeBlocks):
        def push_into(self, frames, start, sink):
            self.inner.push_into(frames, start, lambda rows: (parts.append(rows.shape[0]), sink(rows)))

    register_localizer("whole-blocks-test", WholeBlocks)
    register_localizer("parts-test", Counting)
    params = dict(model=str(tiny_dml_checkpoint), device="cpu", bubbles_per_frame=4, min_track_length=2,
                  block_frames=12)
    whole = process_acquisition(tiny_acq, "whole-blocks-test", params)
    split = process_acquisition(tiny_acq, "parts-test", params)
    assert len(parts) > 2 and whole.localizations.shape[0] > 0
    np.testing.assert_array_equal(split.localizations, whole.localizations)
    np.testing.assert_array_equal(split.density, whole.density)
    np.testing.assert_array_equal(process_acquisition(tiny_acq, "3dml", params).localizations, whole.localizations)
