"""The `ulm.process` job task, run through the job worker (ultrasound_ai.jobs.worker.execute)."""

import io

import numpy as np
import pytest

from ultrasound_ai.core.atomic import is_partial
from ultrasound_ai.io.ulm_files import read_result, write_acquisition
from ultrasound_ai.jobs.protocol import decode_event
from ultrasound_ai.jobs.registry import TASKS
from ultrasound_ai.jobs.worker import CancelState, EventWriter, execute
from ultrasound_ai.ulm.metrics import evaluate_result
from ultrasound_ai.ulm.pipeline import process_acquisition

PARAMS = {"method": "wa", "min_track_length": 5, "block_frames": 100, "link_distance_px": 1.5}


def _run(job, cancel=None, writer_cls=EventWriter):
    stream = io.StringIO()
    code = execute(job, writer_cls(stream), cancel)
    return code, [decode_event(line) for line in stream.getvalue().splitlines()]


def _job(acq, out_dir, parameters, png=True):
    outputs = {"result": str(out_dir / "result.h5")}
    if png:
        outputs["png"] = str(out_dir / "maps.png")
    return {"task": "ulm.process", "inputs": {"acquisition": str(acq)}, "outputs": outputs,
            "parameters": parameters, "device": "cpu"}


def test_task_is_registered():
    assert TASKS["ulm.process"] == "ultrasound_ai.ulm.tasks:process_task"


def test_process_job_outputs_progress_summary_and_metrics(tmp_path, small_acquisition, small_acquisition_file):
    code, events = _run(_job(small_acquisition_file, tmp_path, PARAMS))
    assert code == 0, events[-1]
    fractions = [e["fraction"] for e in events if e["event"] == "progress"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    # One progress event per block of 100 frames (200 frames), then metrics and done.
    assert sum("frames" in e["message"] for e in events if e["event"] == "progress") == 2
    end = events[-1]
    assert end["event"] == "result"
    summary = end["result"]
    res = read_result(tmp_path / "result.h5")
    assert (tmp_path / "maps.png").stat().st_size > 0
    assert not [p for p in tmp_path.iterdir() if is_partial(p)]
    # The same result as the pipeline run directly with the same parameters.
    direct = process_acquisition(small_acquisition_file, "wa", {k: v for k, v in PARAMS.items() if k != "method"}
                                 | {"device": "cpu"})
    np.testing.assert_array_equal(res.localizations, direct.localizations)
    np.testing.assert_array_equal(res.density, direct.density)
    assert summary["method"] == "wa" and summary["n_frames"] == 200
    assert summary["n_localizations"] == res.localizations.shape[0]
    assert summary["n_tracked_localizations"] == int((res.localizations[:, 4] >= 0).sum())
    assert summary["n_tracks"] == res.attrs["n_tracks"] > 0
    assert summary["image_shape"] == list(res.density.shape)
    assert res.attrs["params"]["link_distance_px"] == 1.5
    # Metrics from the truth, after processing: those of `ulm evaluate`.
    ref = evaluate_result(res, small_acquisition.gt_positions, small_acquisition.wavelength_mm,
                          small_acquisition.frame_rate_hz)
    m = summary["metrics"]
    assert m["jaccard"] == pytest.approx(ref["jaccard"]) and m["raw"]["jaccard"] == pytest.approx(ref["raw"]["jaccard"])
    assert m["ssim"] == pytest.approx(ref["ssim"]) and 0 < m["raw"]["jaccard"] <= 1


def test_without_truth_same_result_and_no_metrics(tmp_path, small_acquisition, small_acquisition_file):
    acq = tmp_path / "nogt.h5"
    write_acquisition(small_acquisition.without_truth(), acq)
    out = tmp_path / "out"
    out.mkdir()
    code, events = _run(_job(acq, out, PARAMS, png=False))
    assert code == 0
    assert "metrics" not in events[-1]["result"]
    ref = process_acquisition(small_acquisition_file, "wa", {k: v for k, v in PARAMS.items() if k != "method"})
    np.testing.assert_array_equal(read_result(out / "result.h5").localizations, ref.localizations)


def test_cancel_between_blocks_leaves_no_output(tmp_path, small_acquisition_file):
    cancel = CancelState()

    class CancelOnFirstBlock(EventWriter):
        def emit(self, event, **fields):
            super().emit(event, **fields)
            if event == "progress" and "frames" in fields.get("message", ""):
                cancel.request("test")

    code, events = _run(_job(small_acquisition_file, tmp_path, PARAMS), cancel, CancelOnFirstBlock)
    assert code == 3 and events[-1]["event"] == "cancelled"
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_drives_the_counting_network(tmp_path, tiny_acq, tiny_dml_checkpoint):
    acq = tmp_path / "tiny.h5"
    write_acquisition(tiny_acq, acq)
    params = {"method": "rs", "counting_network": True, "checkpoint": str(tiny_dml_checkpoint), "max_maxima": None,
              "min_track_length": 2, "window_stride": 2}
    code, events = _run(_job(acq, tmp_path, params, png=False))
    assert code == 0, events[-1]
    ref = process_acquisition(tiny_acq, "rs", {k: v for k, v in params.items() if k not in ("method", "checkpoint")}
                              | {"model": str(tiny_dml_checkpoint), "device": "cpu"})
    np.testing.assert_array_equal(read_result(tmp_path / "result.h5").localizations, ref.localizations)
    assert events[-1]["result"]["n_localizations"] == ref.localizations.shape[0] > 0


@pytest.mark.parametrize("params, message", [
    ({"linking": 3}, "unknown parameter"),
    ({"device": "cpu"}, "job's 'device'"),
    ({"method": "gauss"}, "method"),
    ({"counting_network": True, "checkpoint": "/nowhere/missing_ckpt.pt"}, "missing_ckpt.pt"),
    ({"checkpoint": "a.pt", "model": "b.pt"}, "either"),
    ({"band_hz": 50}, "band_hz"),
    ({"svd_cutoff": 4, "block_frames": 3}, "block_frames"),
])
def test_bad_parameters_exit_2_without_output(tmp_path, tiny_acq, params, message):
    acq = tmp_path / "tiny.h5"
    write_acquisition(tiny_acq, acq)
    out = tmp_path / "out"
    code, events = _run(_job(acq, out, params))
    assert code == 2 and events[-1]["event"] == "error"
    assert message in events[-1]["message"]
    assert not out.exists() or list(out.iterdir()) == []


def test_bad_inputs_and_outputs_exit_2(tmp_path, tiny_acq):
    acq = tmp_path / "tiny.h5"
    write_acquisition(tiny_acq, acq)
    job = _job(acq, tmp_path, {})
    code, events = _run({**job, "outputs": {"png": str(tmp_path / "m.png")}})
    assert code == 2 and "result" in events[-1]["message"]
    code, events = _run({**job, "inputs": {"acquisition": str(acq), "truth": str(acq)}})
    assert code == 2 and "acquisition" in events[-1]["message"]
    (tmp_path / "not_h5.h5").write_bytes(b"junk")
    code, events = _run({**job, "inputs": {"acquisition": str(tmp_path / "not_h5.h5")}})
    assert code == 2, events[-1]
