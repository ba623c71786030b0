"""3DML-ResNet training data mixing pymust-formed pieces with the fast simulator's pool."""

import json

import numpy as np
import pytest

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.core.training import load_config
from ultrasound_ai.io.ulm_files import read_acquisition
from ultrasound_ai.ulm.clutter import svd_filter
from ultrasound_ai.ulm.dml_training import (
    DEFAULT_CONFIG,
    DmlTask,
    crop_sample,
    data_options,
    draw_window,
    pixel_targets,
    positions_to_pixels,
    simulated_entry,
)
from ultrasound_ai.ulm.pymust_training_set import PIECE_SEED0, generate

pytest.importorskip("pymust")

N = 4  # the tiny preset's window
DATA = {"pool_size": 3, "pool_frames": 12, "sim_shape_zx": [24, 24], "crop_zx": [16, 16],
        "bubbles_per_frame": [150, 150], "noise_db": [-40, -40], "clutter_db": None, "val_sets": [[150, -40]],
        "val_frames": 8, "val_shape_zx": [24, 24], "svd_cutoff": 2}
PIECE_FRAMES = 6


@pytest.fixture(scope="module")
def piece_dir(tmp_path_factory):
    """One real training piece (the generator's randomised probe, tissue and noise), at a tiny size."""
    d = tmp_path_factory.mktemp("pymust_pieces")
    assert generate(d, 1, 0, n_frames=PIECE_FRAMES, shape_zx=(20, 32)) == ["piece_00000"]
    return d


def test_mix_draws_pymust_windows_at_the_set_fraction(piece_dir):
    d = data_options({**DATA, "pymust_dir": str(piece_dir), "pymust_fraction": 0.3})
    pieces = DmlTask.pymust_pieces(d)
    rng = np.random.default_rng(5)
    draws = [draw_window(rng, d, N, pieces) for _ in range(800)]
    share = np.mean([w["source"] == "pymust" for w in draws])
    assert abs(share - 0.3) < 0.06  # 3.5 standard deviations of 800 draws
    assert {w["source"] for w in draws} == {"sim", "pymust"}

    # A pymust window is the piece's SVD-filtered envelope (tissue on: the pipeline's filter) and its truth.
    acq = read_acquisition(pieces[0])
    assert acq.attrs["sim_seed"] == PIECE_SEED0 and acq.attrs["sim_clutter_db"] != "off"
    env = np.abs(np.asarray(svd_filter(acq.iq, cutoff=d["svd_cutoff"]))).astype(np.float16).astype(np.float32)
    w = next(w for w in draws if w["source"] == "pymust" and w["x0"] > 0)
    frames, pos, zoff, xoff, counts = crop_sample(w["entry"], w["t0"], N, w["z0"], w["x0"], d["crop_zx"], w["flip"],
                                                  w["reverse"])
    ref = env[w["t0"]:w["t0"] + N, w["z0"]:w["z0"] + 16, w["x0"]:w["x0"] + 16]
    ref = ref[:, :, ::-1] if w["flip"] else ref
    ref = ref[::-1] if w["reverse"] else ref
    np.testing.assert_array_equal(frames, ref)
    pix = positions_to_pixels(acq.gt_positions, acq.origin_mm, acq.pixel_size_mm)
    pix = pix[(pix[:, 0] >= w["t0"]) & (pix[:, 0] < w["t0"] + N)] - [w["t0"], w["z0"], w["x0"]]
    assert counts.sum() == pixel_targets(pix, N, (16, 16))[3].sum() > 0

    # Without pieces the draws are exactly the pool's, in the order training used before the mix.
    d0 = data_options(DATA)
    a, b = np.random.default_rng(9), np.random.default_rng(9)
    for _ in range(20):
        w = draw_window(a, d0, N, [])
        old = (int(b.integers(3)), int(b.integers(12 - N + 1)), int(b.integers(24 - 16 + 1)), int(b.integers(24 - 16 + 1)),
               bool(b.random() < 0.5), bool(b.random() < 0.5))
        assert (w["source"], (w["index"], w["t0"], w["z0"], w["x0"], w["flip"], w["reverse"])) == ("sim", old)
        assert w["entry"] is simulated_entry(seed=w["index"], bubbles_per_frame=150.0, noise_db=-40.0, n_frames=12,
                                             shape_zx=[24, 24], clutter_db=None, svd_cutoff=2)


def test_batches_and_card_record_the_mix(piece_dir):
    cfg = load_config({"method": "ulm_3dml_resnet", "output_dir": str(piece_dir / "run"), "device": "cpu",
                       "model": {"preset": "tiny"}, "schedule": {"batch_size": 3},
                       "data": {**DATA, "pymust_dir": str(piece_dir), "pymust_fraction": 1.0, "pymust_count": 1}},
                      defaults=DEFAULT_CONFIG)
    frames = next(DmlTask().batches(cfg, 0, 1, 0))[0]
    assert tuple(frames.shape) == (3, N, 16, 16)
    train = DmlTask().card(cfg, {})["training"]
    assert train["pymust_fraction"] == 1.0 and train["pymust_pieces"] == 1 and train["pymust_frames"] == PIECE_FRAMES
    assert train["pymust_seeds"] == [PIECE_SEED0] and "bubbles_per_frame" in train["pymust_bands"]
    assert "pymust-formed" in DmlTask().card(cfg, {})["training_data"]
    assert DmlTask().card(load_config({"data": DATA}, defaults=DEFAULT_CONFIG), {})["training"]["pymust_fraction"] == 0.0


def test_mix_refuses_a_missing_or_empty_directory_naming_the_option(piece_dir, tmp_path, one_thread):
    from ultrasound_ai.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    for bad, key in ((dict(pymust_dir=str(tmp_path / "missing"), pymust_fraction=0.2), "data.pymust_dir"),
                     (dict(pymust_dir=str(empty), pymust_fraction=0.2), "data.pymust_dir"),
                     (dict(pymust_fraction=0.2), "data.pymust_dir"),
                     (dict(pymust_dir=str(empty), pymust_fraction=1.5), "data.pymust_fraction"),
                     (dict(pymust_dir=str(piece_dir), pymust_fraction=0.5, pymust_count=2), "data.pymust_count")):
        with pytest.raises(InputError, match=key.replace(".", r"\.")):
            data_options({**DATA, **bad})
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"method": "ulm_3dml_resnet", "output_dir": str(tmp_path / "run"), "device": "cpu",
                                "model": {"preset": "tiny"}, "schedule": {"steps": 1},
                                "data": {**DATA, "pymust_dir": str(empty), "pymust_fraction": 0.5}}))
    assert main(["ulm", "train", "--config", str(path), "--quiet"]) == 2
    assert not (tmp_path / "run").exists()


def test_fine_tuning_starts_from_a_checkpoint_and_validates_on_files(piece_dir, one_thread):
    import torch

    from ultrasound_ai.ulm.dml_inference import load_dml_model

    net, card = load_dml_model("ulm_3dml_small", device="cpu")
    shipped = net.state_dict()
    cfg = load_config({"model": {**card["configuration"], "init_from": "ulm_3dml_small"}, "data": DATA},
                      defaults=DEFAULT_CONFIG)
    tuned = DmlTask().build_model(cfg).state_dict()
    assert tuned.keys() == shipped.keys() and all(torch.equal(tuned[k], shipped[k]) for k in shipped)
    train = DmlTask().card(cfg, {})["training"]
    assert train["init_from"] == "ulm_3dml_small" and train["init_from_sha256"] == card["sha256"]
    with pytest.raises(InputError, match=r"model\.init_from"):
        DmlTask().build_model(load_config({"model": {"preset": "tiny", "init_from": "ulm_3dml_small"}, "data": DATA},
                                          defaults=DEFAULT_CONFIG))

    # Validation files (as the frozen set's validation pieces) add their own metrics; "jaccard" stays the pool's.
    torch.manual_seed(0)
    tiny = {"method": "ulm_3dml_resnet", "device": "cpu", "model": {"preset": "tiny"}}
    net = DmlTask().build_model(load_config({**tiny, "data": DATA}, defaults=DEFAULT_CONFIG)).eval()
    piece = str(piece_dir / "piece_00000.h5")
    plain = DmlTask().validate(net, load_config({**tiny, "data": DATA}, defaults=DEFAULT_CONFIG), "cpu")
    with_files = DmlTask().validate(net, load_config({**tiny, "data": {**DATA, "val_files": [piece]}},
                                                     defaults=DEFAULT_CONFIG), "cpu")
    assert with_files["jaccard"] == plain["jaccard"] and "jaccard_files" not in plain
    assert with_files["jaccard_files"] == with_files["jaccard_file_piece_00000"]
    assert 0.0 <= with_files["jaccard_files"] <= 1.0
    with pytest.raises(InputError, match=r"data\.val_files"):
        data_options({**DATA, "val_files": [str(piece_dir / "nothing.h5")]})


def test_validation_can_run_the_pipelines_inner_windows(one_thread):
    """data.val_keep_margin with val_window_stride N - 2: each frame estimated once, away from window edges (the
    pipeline's default "inner" windows), so best.pt is chosen on what users run."""
    import torch

    from ultrasound_ai.ulm.dml_inference import SlidingWindowRunner, model_predictor

    torch.manual_seed(0)
    tiny = {"method": "ulm_3dml_resnet", "device": "cpu", "model": {"preset": "tiny"}}
    inner = {**DATA, "val_window_stride": N - 2, "val_keep_margin": 1}
    cfg = load_config({**tiny, "data": inner}, defaults=DEFAULT_CONFIG)
    net = DmlTask().build_model(cfg).eval()
    got = DmlTask().validate(net, cfg, "cpu")["count_rel_error"]
    sliding = DmlTask().validate(net, load_config({**tiny, "data": DATA}, defaults=DEFAULT_CONFIG), "cpu")

    (_, e), = DmlTask().validation_entries(cfg)
    runner = SlidingWindowRunner(model_predictor(net, "cpu"), N, stride=N - 2, keep_margin=1)
    est = runner.push(e["envelope"].astype(np.float32)) + runner.finish()
    truth = np.diff(e["frame_starts"]).astype(np.float64)
    expected = np.mean([abs(x.count - truth[x.index]) / max(truth[x.index], 1.0) for x in est])
    assert got == pytest.approx(expected, rel=1e-12)
    # An untrained network's counts hardly depend on the layout, but they do (each window has its own maximum).
    assert abs(got - sliding["count_rel_error"]) > 1e-9 * got
    with pytest.raises(InputError, match=r"data\.val_keep_margin"):
        data_options({**DATA, "val_keep_margin": -1})
