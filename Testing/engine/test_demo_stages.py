"""The demo without progress bars prints one line per stage, and leaves FiMA's online alignment off."""

from ultrasound_ai.demo import run_demo


def test_quiet_demo_logs_each_stage_and_runs_fima_without_online_alignment(tmp_path, monkeypatch):
    from ultrasound_ai.freehand.fima.model import FimaNet, make_config
    from ultrasound_ai.io.sweep import read_sweep
    from ultrasound_ai.models import registry
    from ultrasound_ai.models.checkpoint import save_checkpoint

    empty, models = tmp_path / "empty", tmp_path / "models"
    empty.mkdir()
    models.mkdir()
    cfg = make_config("tiny", "fima")  # its card asks for online alignment: the demo must still leave it off
    save_checkpoint(FimaNet(cfg).state_dict(), models / "fima_tiny.pt",
                    {"name": "fima_tiny", "method": "fima", "variant": "fima", "default": True,
                     "configuration": {"preset": "tiny", **cfg.to_dict()},
                     "input": {"frame_shape_hw": list(cfg.frame_shape), "pixel_spacing_mm": [cfg.pixel_spacing_mm] * 2,
                               "window_frames": list(cfg.window_frames), "n_imus": cfg.n_imus,
                               "online_alignment": True},
                     "training": {"data": "none (random weights)"}, "metrics": {}})
    monkeypatch.setattr(registry, "SHIPPED_MODELS_DIR", empty)
    monkeypatch.setenv(registry.ENV_VAR, str(models))
    lines = []
    result = run_demo(tmp_path / "demo", n_frames=12, frame_shape=(48, 52), spacing_mm=0.8, png=False, quiet=True,
                      methods=("imu", "fima"), log=lines.append)
    stages = [line for line in lines if ": started" in line or ": finished in " in line]
    assert [s.split(":")[0] for s in stages] == ["simulate sweep"] * 2 + ["reconstruct (imu)"] * 2 + \
        ["reconstruct (fima)"] * 2
    assert stages[-1] == f"reconstruct (fima): finished in {result['seconds']['fima']:.1f} s"
    assert read_sweep(tmp_path / "demo" / "fima_estimate.h5").attrs["pose_online_align"] in (False, 0)
