"""FiMA training, online alignment, the "fima" pose method and the `freehand train` verb.

(a) a tiny ReM (images only) trained on a few slow sweeps seen at several frame strides beats the
constant-motion predictor and the best constant on the out-of-plane translation of unseen sweeps;
strided windows carry the IMU inputs of their own frames. (b) online alignment lowers L_align and does not
depend on the order of the sweeps. (c) the method never reads tforms, chains from the identity, returns
normalised fusion weights, takes IMU subsets and long, large sweeps. (d) bad inputs fail clearly. (e) the
CLI trains and reconstructs.
"""

import json
import resource

import numpy as np
import pytest
import torch

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.freehand.simulation.phantom import Psf
from ultrasound_ai.freehand.simulation.simulator import simulate_sweep

SP = 0.3  # tiny ReM at 0.3-mm pixels on 48 x 48 frames (14 mm): speckle is resolved, and it trains fast


# ------------------------------------------------------------------------------------------ (a) training


def _pool(seeds, speeds_mm_s, n_frames, mcfg, n_imus=0, **kw):
    from ultrasound_ai.freehand.fima.training import pool_from_sweeps

    kw = {"rotation_deg_s": 0.0, "tremor": False, **kw}
    sweeps = [simulate_sweep(s, n_frames=n_frames, tactic="linear", frame_shape=mcfg.frame_shape,
                             pixel_spacing=mcfg.pixel_spacing_mm, n_imus=n_imus, reverse=False, speed_mm_s=v,
                             psf=Psf(), **kw) for s, v in zip(seeds, speeds_mm_s)]
    return pool_from_sweeps(sweeps, [f"sim-{s}" for s in seeds], mcfg), sweeps


@pytest.fixture(scope="module")
def trained_rem(tmp_path_factory, one_thread):
    from ultrasound_ai.freehand.fima.training import model_config, train_fima

    out = tmp_path_factory.mktemp("fima_rem")
    # Short windows (4-6 frames, also the inference window): many independent speeds per batch.
    model = {"preset": "tiny", "variant": "rem", "pixel_spacing_mm": SP, "frame_shape": [48, 48],
             "window_frames": [4, 6]}
    mcfg = model_config(model)
    # Eight slow training sweeps (3-6 mm/s) seen at frame strides 1-3 drawn per pair (0.15-0.9 mm per pair):
    # one anatomy at several speeds, so the speed must be read from the speckle, not from which sweep it is.
    # Validation: unseen anatomy at 6.5-13.5 mm/s, stride 1. Pure out-of-plane translation (no rotation, no
    # tremor): with them, the in-plane change of a pair grows with the stride, so in stride-augmented
    # training a large tz always comes with a large in-plane change; a tiny FiMA (no correlation layer)
    # learnt that cue and then put the fastest stride-1 validation sweep lowest (measured: tz MAE 0.21 mm
    # against 0.15 mm for the constant).
    config = {"output_dir": str(out / "run"), "name": "rem_tiny_test", "device": "cpu", "seed": 3, "model": model,
              "data": {"frame_strides": [1, 2, 3], "stride_mode": "pair"},
              "schedule": {"steps": 400, "batch_size": 8, "lr": 2e-3, "warmup_steps": 20, "log_every": 50,
                           "validate_every": 400, "checkpoint_every": 400}}
    train_pool, _ = _pool(range(501, 509), np.linspace(3.0, 6.0, 8), 32, mcfg)
    val_pool, val_sweeps = _pool([601, 602, 603], [6.5, 10.0, 13.5], 16, mcfg)
    result = train_fima(config, resume=False, train_pool=train_pool, val_pool=val_pool, progress_bar=False)
    return result, train_pool, val_pool, val_sweeps


def test_tiny_rem_beats_constant_motion_on_out_of_plane_translation(trained_rem):
    result, train_pool, val_pool, _ = trained_rem
    m = result.metrics
    const = train_pool.training_targets([1, 2, 3]).astype(np.float64).mean(0)[2]
    want_const = np.mean(np.concatenate([np.abs(y[:, 2] - const) for y in val_pool.targets]))
    assert m["tz_mae_const_mm"] == pytest.approx(want_const, rel=1e-5)
    assert m["tz_mae_mm"] < m["tz_mae_const_mm"], m
    # ... and the best constant there is for these validation sweeps (their median) does worse too.
    tz = np.concatenate([y[:, 2] for y in val_pool.targets]).astype(np.float64)
    assert m["tz_mae_mm"] < np.abs(tz - np.median(tz)).mean(), m
    assert np.isfinite(m["fdr_pct"]) and np.isfinite(m["fdr_const_pct"])
    card = result.card
    assert card["method"] == "fima" and card["variant"] == "rem" and card["configuration"]["fusion"] == "none"
    assert card["input"]["frame_shape_hw"] == [48, 48] and card["input"]["pixel_spacing_mm"] == [SP, SP]
    assert card["input"]["n_imus"] == 0 and "xyz" in card["input"]["output"]
    assert card["training"]["frame_strides"] == [1, 2, 3] and "adam" in card["training"]["optimizer"]
    assert (result.output_dir / "best.pt").exists() and (result.output_dir / "final.card.json").exists()


def test_turning_the_scene_turns_only_the_gravity_in_the_specific_force():
    from ultrasound_ai.freehand.fima.training import random_rotation, turn_gravity
    from ultrasound_ai.freehand.imu_dead_reckoning import GRAVITY_M_S2, imu_rotations

    rng = np.random.default_rng(3)
    q = random_rotation(rng)
    np.testing.assert_allclose(q @ q.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(q) == pytest.approx(1.0)
    euler = rng.uniform(-60, 60, size=(2, 7, 3))
    acc = rng.normal(size=(2, 7, 3)) + [0, 0, 9.81]
    rot = imu_rotations(euler)
    world = np.einsum("mnij,mnj->mni", rot, acc) + GRAVITY_M_S2  # a = R f + g
    turned_rot = np.einsum("ij,mnjk->mnik", q, rot)
    expected = np.einsum("mnji,mnj->mni", turned_rot, np.einsum("ij,mnj->mni", q, world) - GRAVITY_M_S2)
    np.testing.assert_allclose(turn_gravity(acc, euler, q), expected, atol=1e-4)
    np.testing.assert_allclose(turn_gravity(acc, euler, np.eye(3)), acc, atol=1e-5)


def test_windows_carry_their_own_frames_targets_and_imu_inputs():
    from ultrasound_ai.freehand.fima.training import data_options, draw_windows, model_config, pair_targets

    mcfg = model_config({"preset": "tiny", "variant": "fima", "n_imus": 3})
    # Noise-free IMUs: the relative rotation of a pair's two frames is exactly the target's rotation.
    pool, _ = _pool([11, 12], [5.0, 8.0], 20, mcfg, n_imus=3, imu_noise=None)
    rng = np.random.default_rng(0)
    frames, targets, acc, ang = draw_windows(pool, rng, 6, 5, [1, 3], with_imus=True, stride_mode="pair")
    assert frames.shape == (6, 5, 32, 36) and targets.shape == (6, 4, 6) and acc.shape == ang.shape == (6, 4, 3, 3)
    np.testing.assert_allclose(ang.numpy(), np.broadcast_to(targets.numpy()[:, :, None, 3:], ang.shape), atol=1e-4)
    steps_seen = set()
    for f, y in zip(frames.numpy(), targets.numpy()):
        hits = [(i, [int(np.flatnonzero((sw == g).all(axis=(1, 2)))[0]) for g in f])
                for i, sw in enumerate(pool.frames) if all((sw == g).all(axis=(1, 2)).any() for g in f)]
        assert len(hits) == 1
        i, idx = hits[0]
        steps_seen.update(np.diff(idx).tolist())
        np.testing.assert_allclose(y, pair_targets(pool.tforms[i], np.array(idx)), atol=1e-5)
    assert steps_seen == {1, 3}  # strides mixed inside windows
    # IMU subsets (adaptive fusion): fewer IMUs per pair.
    _, _, acc2, _ = draw_windows(pool, rng, 2, 5, [1], imus=[2], with_imus=True)
    assert acc2.shape == (2, 4, 1, 3)
    # Gravity augmentation: the same window, the same angles, a turned gravity (|f| of the gravity kept).
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    f1, y1, a1, r1 = draw_windows(pool, rng_a, 3, 5, [1], with_imus=True)
    f2, y2, a2, r2 = draw_windows(pool, rng_b, 3, 5, [1], with_imus=True, gravity_augment=True)
    assert torch.equal(f1, f2) and torch.equal(y1, y2) and torch.equal(r1, r2)
    assert (a1 - a2).abs().max() > 1.0
    np.testing.assert_allclose(a2.norm(dim=-1).mean().item(), a1.norm(dim=-1).mean().item(), rtol=0.05)
    for bad in ({"frame_strides": []}, {"window_frames": [5, 3]}, {"stride_mode": "frame"}, {"pearson_weight": -1},
                {"imu_subsets": "yes"}, {"gravity_augment": 1}, {"colour": 1}, {"sim_pixel_spacing_mm": 0},
                {"sim_spacing_jitter": 1.0}):
        with pytest.raises(InputError, match="data"):
            data_options(bad)


def test_training_sweeps_are_simulated_at_a_scanner_spacing_and_resampled_onto_the_grid():
    from ultrasound_ai.freehand.fima.training import model_config, pool_from_sweeps
    from ultrasound_ai.freehand.simulation.simulator import simulate_sweep_for_grid

    mcfg = model_config({"preset": "tiny", "variant": "rem", "pixel_spacing_mm": 0.3, "frame_shape": [24, 26]})
    kw = {"tactic": "curved", "n_imus": 2}
    acq = simulate_sweep_for_grid(7, 6, (24, 26), 0.3, 0.15, 0.1, **kw)
    grid = simulate_sweep_for_grid(7, 6, (24, 26), 0.3, None, **kw)
    sx, sy = acq.pixel_spacing_xy
    assert sx == sy and 0.135 <= sx <= 0.165 and sx != 0.15  # jittered per seed
    H, W = acq.frames.shape[1:]
    for n_px, n_grid in ((H, 24), (W, 26)):  # the smallest frame that holds the grid's extent
        assert (n_px - 1) * sx >= (n_grid - 1) * 0.3 > (n_px - 2) * sx
    assert grid.frames.shape[1:] == (24, 26) and tuple(grid.pixel_spacing_xy) == (0.3, 0.3)
    # same trajectory (the image origin sits at the face centre minus half the frame width, which differs)
    np.testing.assert_allclose(acq.tforms[:, :3, :3], grid.tforms[:, :3, :3])
    np.testing.assert_allclose(acq.imu_acc, grid.imu_acc)
    np.testing.assert_array_equal(simulate_sweep_for_grid(7, 6, (24, 26), 0.3, 0.15, 0.1, **kw).frames, acq.frames)
    pa, pg = pool_from_sweeps([acq], ["acq"], mcfg), pool_from_sweeps([grid], ["grid"], mcfg)
    assert pa.frames[0].shape == pg.frames[0].shape == (6, 24, 26)
    # the grid sits at the top of the acquisition frame, centred laterally, less than a pixel from the
    # simulated grid's origin
    np.testing.assert_allclose(pa.targets[0], pg.targets[0], atol=5e-3)


def test_pairs_encoded_at_once_shrink_on_large_grids():
    from ultrasound_ai.freehand.fima.method import auto_pair_chunk, method_options
    from ultrasound_ai.freehand.fima.model import make_config

    assert [auto_pair_chunk(s) for s in ((48, 52), (124, 130), (248, 260), (2000, 2000))] == [16, 16, 4, 1]
    paper = make_config("paper", "rem")
    assert tuple(paper.frame_shape) == (248, 260)
    assert method_options({}, paper, 0)["pair_chunk"] == 4
    assert method_options({"pair_chunk": 2}, paper, 0)["pair_chunk"] == 2  # an explicit value wins


# ------------------------------------------------------------------------------- (e) CLI and checkpoints


@pytest.fixture(scope="module")
def cli_fima(tmp_path_factory, one_thread):
    """A 2-step tiny FiMA (3 IMUs) trained through `ultrasound-ai freehand train`."""
    from ultrasound_ai.cli import main

    out = tmp_path_factory.mktemp("fima_cli")
    cfg = out / "fima.yaml"
    cfg.write_text("method: fima\nname: fima_tiny_cli\nmodel: {preset: tiny, n_imus: 3}\n"
                   "data: {train_sweeps: 2, train_frames: 12, val_sweeps: 1, val_frames: 10, tactic: linear,\n"
                   "       frame_strides: [1, 2], imu_subsets: true}\n"
                   "schedule: {batch_size: 2, warmup_steps: 0, log_every: 1, validate_every: 2, checkpoint_every: 2}\n")
    code = main(["freehand", "train", "--method", "fima", "--config", str(cfg), "--output", str(out / "run"),
                 "--steps", "2", "--device", "cpu", "--quiet"])
    return code, out / "run"


def test_cli_train_writes_final_checkpoint_and_card(cli_fima):
    code, run = cli_fima
    assert code == 0
    assert (run / "final.pt").exists() and (run / "best.pt").exists()
    card = json.loads((run / "final.card.json").read_text())
    assert card["method"] == "fima" and card["variant"] == "fima" and card["name"] == "fima_tiny_cli"
    assert card["input"]["n_imus"] == 3 and card["input"]["online_alignment"] is True
    assert card["training"]["simulator_version"] and card["training"]["imu_subsets"] is True
    assert card["training"]["steps"] == 2 and set(card["metrics"]) >= {"tz_mae_mm", "tz_mae_const_mm", "fdr_pct"}


def test_cli_train_other_methods(tmp_path, one_thread):
    from ultrasound_ai.cli import main

    # --method picks the FiMA variant; moglo goes to its own trainer. One step each on tiny data.
    cfg = tmp_path / "rem.json"
    cfg.write_text(json.dumps({"model": {"preset": "tiny"}, "schedule": {"batch_size": 1, "warmup_steps": 0},
                               "data": {"train_sweeps": 1, "train_frames": 10, "val_sweeps": 1, "val_frames": 8,
                                        "tactic": "linear", "bn_recalibration_batches": 2}}))
    assert main(["freehand", "train", "--method", "rem-prime", "--config", str(cfg), "--output", str(tmp_path / "r"),
                 "--steps", "1", "--device", "cpu", "--quiet"]) == 0
    card = json.loads((tmp_path / "r" / "final.card.json").read_text())
    assert card["variant"] == "rem-prime" and card["configuration"]["ssmf_orders"] == ["row"]
    cfg = tmp_path / "moglo.json"
    cfg.write_text(json.dumps({"method": "moglo", "model": {"preset": "tiny"}, "schedule": {"batch_size": 1,
                               "warmup_steps": 0}, "data": {"train_sweeps": 1, "train_frames": 8, "val_sweeps": 1,
                                                            "val_frames": 6, "tactic": "linear"}}))
    assert main(["freehand", "train", "--method", "moglo", "--config", str(cfg), "--output", str(tmp_path / "m"),
                 "--steps", "1", "--device", "cpu", "--quiet"]) == 0
    assert json.loads((tmp_path / "m" / "final.card.json").read_text())["method"] == "moglo"
    # A moglo config under a FiMA method is refused, naming the method.
    assert main(["freehand", "train", "--method", "fima", "--config", str(cfg), "--output", str(tmp_path / "x"),
                 "--steps", "1", "--device", "cpu", "--quiet"]) == 2


@pytest.fixture(scope="module")
def imu_sweep():
    # 20 frames (longer than the tiny window of 16: windowed inference) on another grid than the model's.
    return simulate_sweep(21, n_frames=20, tactic="curved", frame_shape=(40, 44), pixel_spacing=(0.5, 0.55), n_imus=3)


def test_cli_reconstruct_with_online_alignment(cli_fima, imu_sweep, tmp_path):
    from ultrasound_ai.cli import main
    from ultrasound_ai.io.sweep import read_sweep, write_sweep

    _, run = cli_fima
    src = write_sweep(imu_sweep, tmp_path / "sweep.h5")
    est = tmp_path / "est.h5"
    code = main(["freehand", "reconstruct", str(src), "--method", "fima", "--checkpoint", str(run / "final.pt"),
                 "--online-align", "--align-steps", "3", "--imus", "0,2", "--out-sweep", str(est), "--no-progress",
                 "--device", "cpu"])
    assert code == 0
    out = read_sweep(est)
    assert out.imu_weights.shape == (19, 3) and np.all(out.imu_weights[:, 1] == 0)
    assert out.attrs["pose_online_align"] in (True, 1) and out.attrs["pose_align_steps"] == 3
    assert main(["freehand", "reconstruct", str(src), "--method", "imu", "--imus", "0", "--no-progress"]) == 2


# ------------------------------------------------------------------------------------ (b) online alignment


@pytest.fixture(scope="module")
def fima_net(cli_fima):
    from ultrasound_ai.freehand.fima.method import load_fima

    _, run = cli_fima
    model, card = load_fima(str(run / "final.pt"), "cpu")
    return model, card


def _grid_sweep(seed, n_frames, model, n_imus=3):
    return simulate_sweep(seed, n_frames=n_frames, tactic="curved", frame_shape=model.cfg.frame_shape,
                          pixel_spacing=model.cfg.pixel_spacing_mm, n_imus=n_imus)


def test_online_alignment_lowers_loss_resets_and_ignores_order(fima_net, one_thread):
    from ultrasound_ai.freehand.fima.align import DEFAULT_LR, DEFAULT_STEPS, DEFAULT_TAU, AlignOptions
    from ultrasound_ai.freehand.fima.method import align_sweep

    model, _ = fima_net
    assert (DEFAULT_STEPS, DEFAULT_LR, DEFAULT_TAU) == (60, 2e-6, 0.1)
    assert (AlignOptions().steps, AlignOptions().lr, AlignOptions().whole_network) == (60, 2e-6, False)
    a, b = _grid_sweep(31, 12, model), _grid_sweep(32, 12, model, n_imus=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def run(sweep, **kw):
        return align_sweep(model, sweep.frames, sweep.imu_acc, sweep.imu_euler_deg, steps=12, lr=1e-3, **kw)

    first = run(a)
    assert len(first.align_history) == 13 and first.align_history[-1] < first.align_history[0]
    assert set(first.align_parts) == {"info_nce", "prior"}
    nce = first.align_parts["info_nce"]
    assert len(nce) == 13 and nce[-1] < nce[0]  # L_align (eq. 3) itself goes down
    run(b)
    again = run(a)  # after another sweep: the weights were reset, so the same result
    np.testing.assert_array_equal(first.params, again.params)
    assert first.align_history == again.align_history
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the trained model itself never changes
    # The adapted estimate differs from the plain one, and the weights stay normalised.
    from ultrasound_ai.freehand.fima.method import imu_inputs, predict_pairs

    plain = predict_pairs(model, a.frames, *imu_inputs(a.imu_acc, a.imu_euler_deg))
    assert not np.allclose(plain.params, first.params)
    np.testing.assert_allclose(first.imu_weights.sum(1), 1.0, atol=1e-5)
    # Whole-network alignment adapts the encoder too (a few steps).
    whole = align_sweep(model, a.frames, a.imu_acc, a.imu_euler_deg, steps=3, lr=1e-3, whole_network=True)
    assert len(whole.align_history) == 4 and whole.align_history[-1] < whole.align_history[0]
    with pytest.raises(InputError, match="align_lr"):
        align_sweep(model, a.frames, a.imu_acc, a.imu_euler_deg, lr=0.0)
    with pytest.raises(InputError, match="align_steps"):
        align_sweep(model, a.frames, a.imu_acc, a.imu_euler_deg, steps=-1)


# ------------------------------------------------------------------------------------------ (c) the method


def test_method_ignores_tforms_weights_normalised_and_imu_subsets(cli_fima, imu_sweep, one_thread):
    from ultrasound_ai.freehand.methods import get_method

    _, run = cli_fima
    pt = str(run / "final.pt")
    method = get_method("fima")
    kw = dict(checkpoint=pt, device="cpu", align_steps=4)
    a = method.estimate(imu_sweep, **kw)
    b = method.estimate(imu_sweep.without_truth(), **kw)
    np.testing.assert_array_equal(a.tforms, b.tforms)
    np.testing.assert_array_equal(a.imu_weights, b.imu_weights)
    assert np.array_equal(a.tforms[0], np.eye(4))
    n, m = imu_sweep.n_frames, imu_sweep.n_imus
    assert a.tforms.shape == (n, 4, 4) and a.imu_weights.shape == (n - 1, m)
    np.testing.assert_allclose(a.imu_weights.sum(1), 1.0, atol=1e-5)  # softmax over the IMUs
    assert np.all(a.imu_weights >= 0)
    # The fima variant aligns online by default; the attributes say how.
    assert a.attrs["online_align"] is True and a.attrs["align_steps"] == 4 and a.attrs["variant"] == "fima"
    assert a.attrs["network_frame_shape_hw"] == [32, 36] and a.attrs["imus_used"] == [0, 1, 2]
    # A subset of the IMUs: the others get weight 0, the rows still sum to 1.
    c = method.estimate(imu_sweep, checkpoint=pt, device="cpu", imus=[2, 0], online_align=False)
    assert c.imu_weights.shape == (n - 1, m) and np.all(c.imu_weights[:, 1] == 0)
    np.testing.assert_allclose(c.imu_weights.sum(1), 1.0, atol=1e-5)
    assert c.attrs["online_align"] is False and c.attrs["imus_used"] == [2, 0]
    one = method.estimate(imu_sweep, checkpoint=pt, device="cpu", imus=[1], online_align=False)
    np.testing.assert_array_equal(one.imu_weights[:, 1], 1.0)


def test_method_bounded_on_a_long_large_sweep(cli_fima, one_thread):
    from ultrasound_ai.freehand.methods import get_method
    from ultrasound_ai.io.sweep import Sweep

    _, run = cli_fima
    # 180 frames of 248 x 260 pixels at 0.15 mm with 4 IMUs (the paper's size), plain noise: the estimate runs
    # window by window on the card's grid, with memory far below the full-resolution float sweep.
    rng = np.random.default_rng(0)
    n = 180
    eul = np.cumsum(rng.normal(0, 0.2, (4, n, 3)), axis=1).astype(np.float32)
    acc = (np.array([0, 0, 9.81]) + rng.normal(0, 0.05, (4, n, 3))).astype(np.float32)
    sweep = Sweep(frames=rng.integers(0, 256, (n, 248, 260), dtype=np.uint8), pixel_spacing_xy=(0.15, 0.15),
                  frame_rate_hz=20.0, imu_acc=acc, imu_euler_deg=eul)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    est = get_method("fima").estimate(sweep, checkpoint=str(run / "final.pt"), device="cpu", align_steps=2)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    assert est.tforms.shape == (n, 4, 4) and est.imu_weights.shape == (n - 1, 4)
    assert np.all(np.isfinite(est.tforms)) and grown_mb < 400, grown_mb


# ----------------------------------------------------------------------------------------- (d) bad inputs


def _save_net(tmp_path, name, cfg, **card_changes):
    from ultrasound_ai.freehand.fima.model import FimaNet
    from ultrasound_ai.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    net = FimaNet(cfg)
    conf = {"preset": "tiny", **cfg.to_dict(), **card_changes}
    card = {"name": name, "method": "fima", "configuration": conf, "training": {}, "metrics": {},
            "input": {"frame_shape_hw": list(cfg.frame_shape), "pixel_spacing_mm": [cfg.pixel_spacing_mm] * 2}}
    pt = tmp_path / f"{name}.pt"
    save_checkpoint(net.state_dict(), pt, card)
    return str(pt)


def test_bad_inputs_fail_clearly(cli_fima, trained_rem, imu_sweep, tmp_path):
    from ultrasound_ai.freehand.fima.model import make_config
    from ultrasound_ai.freehand.fima.training import train_fima
    from ultrasound_ai.freehand.methods import get_method

    _, run = cli_fima
    pt = str(run / "final.pt")
    method = get_method("fima")
    # A fusing variant needs IMU data.
    no_imu = imu_sweep.without_truth()
    no_imu.imu_acc = no_imu.imu_euler_deg = None
    with pytest.raises(InputError, match="no IMU data"):
        method.estimate(no_imu, checkpoint=pt, device="cpu")
    # Linear fusion (ReM+F') needs exactly its IMU count.
    linear = _save_net(tmp_path, "remfp", make_config("tiny", "rem-f-prime", n_imus=3))
    method.estimate(imu_sweep, checkpoint=linear, device="cpu")  # 3 IMUs: fine
    with pytest.raises(InputError, match="exactly 3 IMUs"):
        method.estimate(imu_sweep, checkpoint=linear, device="cpu", imus=[0, 1])
    # A card naming an unknown variant.
    unknown = _save_net(tmp_path, "weird", make_config("tiny", "rem"), variant="rem-x")
    with pytest.raises(InputError, match="unknown FiMA variant 'rem-x'"):
        method.estimate(imu_sweep, checkpoint=unknown, device="cpu")
    with pytest.raises(InputError, match="variant"):
        train_fima({"output_dir": str(tmp_path / "x"), "model": {"preset": "tiny", "variant": "resnet"}})
    with pytest.raises(InputError, match="method"):
        train_fima({"method": "moglo", "output_dir": str(tmp_path / "x")})
    # Bad alignment and IMU parameters name themselves.
    for params, name in [({"align_steps": 0}, "align_steps"), ({"align_steps": 2.5}, "align_steps"),
                         ({"align_steps": True}, "align_steps"), ({"align_lr": 0.0}, "align_lr"),
                         ({"align_lr": float("nan")}, "align_lr"), ({"align_lr": "fast"}, "align_lr"),
                         ({"online_align": "yes"}, "online_align"), ({"imus": [3]}, "imus"),
                         ({"imus": [0, 0]}, "imus"), ({"imus": []}, "imus"), ({"pair_chunk": 0}, "pair_chunk")]:
        with pytest.raises(InputError, match=name):
            method.estimate(imu_sweep, checkpoint=pt, device="cpu", **params)
    with pytest.raises(InputError, match="unknown parameter"):
        method.estimate(imu_sweep, checkpoint=pt, device="cpu", align_tau=0.2)
    # The images-only variant has nothing to align and takes no IMUs.
    rem_pt = str(trained_rem[0].final_path)
    with pytest.raises(InputError, match="online_align"):
        method.estimate(imu_sweep, checkpoint=rem_pt, device="cpu", online_align=True)
    with pytest.raises(InputError, match="imus"):
        method.estimate(imu_sweep, checkpoint=rem_pt, device="cpu", imus=[0])
    # Another method's checkpoint.
    from ultrasound_ai.models.checkpoint import read_card

    card = read_card(linear)
    card["method"] = "moglo"
    (tmp_path / "moglo_like.card.json").write_text(json.dumps(card))
    (tmp_path / "moglo_like.pt").write_bytes((tmp_path / "remfp.pt").read_bytes())
    with pytest.raises(InputError, match="expected a 'fima' one"):
        method.estimate(imu_sweep, checkpoint=str(tmp_path / "moglo_like.pt"), device="cpu")


def test_init_from_starts_fine_tuning_from_a_checkpoints_weights(trained_rem, tmp_path):
    """model.init_from: every weight from a fima checkpoint of the same configuration (not the head's
    constant-motion start); another method's checkpoint or another configuration is refused by name."""
    from ultrasound_ai.core.training import TrainConfig
    from ultrasound_ai.freehand.fima.training import FimaTask, model_config, resolve_config

    _, train_pool, val_pool, _ = trained_rem
    model = {"preset": "tiny", "variant": "rem", "pixel_spacing_mm": SP, "frame_shape": [48, 48],
             "window_frames": [4, 6]}
    pt = _save_net(tmp_path, "start", model_config(model))
    cfg = resolve_config({"output_dir": str(tmp_path / "run"), "model": {**model, "init_from": pt}}, None)
    assert isinstance(cfg, TrainConfig)
    net = FimaTask(train_pool=train_pool, val_pool=val_pool).build_model(cfg)
    saved = torch.load(pt, map_location="cpu", weights_only=True)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, saved[k].to(v.dtype), rtol=0, atol=0, msg=k)
    other = _save_net(tmp_path, "wider", model_config({**model, "base_width": 8}))
    bad = resolve_config({"output_dir": str(tmp_path / "run2"), "model": {**model, "init_from": other}}, None)
    with pytest.raises(InputError, match="init_from"):
        FimaTask(train_pool=train_pool, val_pool=val_pool).build_model(bad)
