"""3DML-ResNet training: targets, loss, data, and a tiny model that learns on simulated crops."""

import csv
import json

import numpy as np
import pytest
import torch

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.ulm.dml_training import (
    DEFAULT_CONFIG,
    DmlTask,
    count_loss,
    crop_sample,
    data_options,
    dml_loss,
    gaussian_kernel,
    pixel_targets,
    positions_to_pixels,
    simulated_entry,
    train_dml,
)

TINY_DATA = {
    "pool_size": 4, "pool_frames": 40, "sim_shape_zx": [32, 32], "crop_zx": [16, 16],
    "bubbles_per_frame": [150, 150], "noise_db": [-40, -40], "clutter_db": None, "val_sets": [[150, -40]], "val_frames": 12,
    "val_shape_zx": [32, 32], "val_seed": 4242,
}


def tiny_config(out, steps=250, **schedule):
    sched = {"steps": steps, "batch_size": 4, "optimizer": "adam", "lr": 3e-3, "lr_schedule": "cosine",
             "warmup_steps": 0, "log_every": 50, "validate_every": steps, "checkpoint_every": steps}
    sched.update(schedule)
    return {"method": "ulm_3dml_resnet", "name": "dml_tiny_test", "output_dir": str(out), "seed": 0, "device": "cpu",
            "model": {"preset": "tiny"}, "data": dict(TINY_DATA), "schedule": sched}


# ----------------------------------------------------------------------------------------- targets


def test_pixel_targets_on_hand_made_positions():
    rows = np.array([
        [0, 2.3, 4.6],    # pixel (2, 5): offsets 2.3 - 2 + 0.5 = 0.8, 4.6 - 5 + 0.5 = 0.1
        [1, 0.5, 0.5],    # halves round up: pixel (1, 1), offsets 0, 0
        [1, 3.0, 3.0],    # exactly the centre of pixel (3, 3): offsets 0.5, 0.5
        [1, 3.2, 2.9],    # same pixel as the previous one: counted, but the first sets the offsets
        [0, -0.6, 2.0],   # outside (pixel -1): ignored
        [2, 1.0, 1.0],    # frame outside the window: ignored
    ])
    pos, zoff, xoff, counts = pixel_targets(rows, 2, (6, 7))
    assert pos.shape == zoff.shape == xoff.shape == (2, 6, 7) and counts.tolist() == [1, 3]
    assert np.argwhere(pos == 1).tolist() == [[0, 2, 5], [1, 1, 1], [1, 3, 3]]
    assert zoff[0, 2, 5] == pytest.approx(0.8) and xoff[0, 2, 5] == pytest.approx(0.1)
    assert zoff[1, 1, 1] == pytest.approx(0.0) and xoff[1, 1, 1] == pytest.approx(0.0)
    assert zoff[1, 3, 3] == pytest.approx(0.5) and xoff[1, 3, 3] == pytest.approx(0.5)
    assert np.all(zoff[pos == 0] == 0) and np.all(xoff[pos == 0] == 0)
    # Reconstructing the positions from the targets gives them back exactly.
    f, iz, ix = np.nonzero(pos)
    back = np.column_stack([f, iz + zoff[f, iz, ix] - 0.5, ix + xoff[f, iz, ix] - 0.5])
    np.testing.assert_allclose(back, rows[[0, 1, 2]], atol=1e-6)


def test_positions_to_pixels_uses_origin_and_non_square_spacing():
    gt = np.array([[3, 1.0 + 2 * 0.2, -5.0 + 7.25 * 0.3, 11]])
    px = positions_to_pixels(gt, origin_mm=(1.0, -5.0), pixel_size_mm=(0.2, 0.3))
    np.testing.assert_allclose(px, [[3, 2.0, 7.25]])
    with pytest.raises(InputError, match="frame, z_mm, x_mm"):
        positions_to_pixels(np.zeros((4, 2)), (0, 0), (1, 1))


# -------------------------------------------------------------------------------------------- loss


def test_blur_kernel_is_a_normalised_symmetric_gaussian():
    k = gaussian_kernel(1.0, 2)
    assert k.shape == (5, 5)
    assert float(k.sum()) == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(k, k.T)
    torch.testing.assert_close(k, k.flip(0))
    assert k.argmax().item() == 12
    assert float(k[2, 3] / k[2, 2]) == pytest.approx(np.exp(-0.5), rel=1e-5)
    with pytest.raises(InputError):
        gaussian_kernel(0.0, 2)


def _targets(batch=2, n=3, z=8, x=9, seed=0):
    rng = np.random.default_rng(seed)
    rows = np.column_stack([rng.integers(0, batch * n, 12), rng.uniform(0, z - 1, 12), rng.uniform(0, x - 1, 12)])
    pos, zoff, xoff, _ = pixel_targets(rows, batch * n, (z, x))
    return tuple(torch.from_numpy(a.reshape(batch, n, z, x)) for a in (pos, zoff, xoff))


def test_loss_is_zero_at_the_target_and_positive_elsewhere():
    pos, zoff, xoff = _targets()
    k = gaussian_kernel()
    maps = torch.stack([pos, zoff, xoff], dim=2)
    terms = dml_loss(maps, pos, zoff, xoff, k)
    assert float(terms["loss_pos"]) == 0.0 and float(terms["loss_loc"]) == 0.0
    # Offsets in pixels without a bubble do not count; on a bubble they do, with weight 1/2.
    b, f, iz, ix = (int(v) for v in torch.nonzero(pos)[0])
    other = maps.clone()
    other[:, :, 1:][(pos == 0).unsqueeze(2).expand_as(other[:, :, 1:])] = 0.77
    assert float(dml_loss(other, pos, zoff, xoff, k)["loss_loc"]) == 0.0
    moved = maps.clone()
    moved[b, f, 1, iz, ix] += 0.2
    n_frames = pos.shape[0] * pos.shape[1]
    assert float(dml_loss(moved, pos, zoff, xoff, k)["loss_loc"]) == pytest.approx(0.5 * 0.04 / n_frames, rel=1e-5)


def test_position_loss_of_a_missed_bubble_is_the_blurred_delta_energy():
    z, x = 11, 11
    pos = torch.zeros(1, 1, z, x)
    pos[0, 0, 5, 5] = 1.0
    k = gaussian_kernel(1.0, 2)
    maps = torch.zeros(1, 1, 3, z, x)  # predicts nothing
    got = float(dml_loss(maps, pos, torch.zeros_like(pos), torch.zeros_like(pos), k)["loss_pos"])
    assert got == pytest.approx(float((k ** 2).sum()), rel=1e-6)
    # A detection one pixel off costs less than missing the bubble, thanks to the blur (the paper's point).
    near = maps.clone()
    near[0, 0, 0, 5, 6] = 1.0
    off = float(dml_loss(near, pos, torch.zeros_like(pos), torch.zeros_like(pos), k)["loss_pos"])
    assert off < 2 * got


def test_count_loss_is_huber_with_delta_one():
    pred = torch.tensor([3.0, 10.0])
    target = torch.tensor([3.5, 7.0])
    # 0.5 * 0.5^2 = 0.125 inside delta; |3| - 0.5 = 2.5 outside; mean 1.3125
    assert float(count_loss(pred, target)) == pytest.approx(1.3125)


# -------------------------------------------------------------------------------------------- data


def test_crop_targets_match_the_simulated_truth_and_flip_consistently():
    e = simulated_entry(seed=11, bubbles_per_frame=150, noise_db=-40, n_frames=12, shape_zx=(32, 32))
    assert e["envelope"].shape == (12, 32, 32)
    frames, pos, zoff, xoff, counts = crop_sample(e, 3, 4, 5, 7, (16, 16))
    assert frames.shape == (4, 16, 16) and frames.dtype == np.float32
    # Every target pixel is a ground-truth bubble of those frames, in crop coordinates.
    gt = e["gt"]
    pix = positions_to_pixels(gt, e["origin_mm"], e["pixel_size_mm"])
    f, iz, ix = np.nonzero(pos)
    for a, b, c in zip(f, iz, ix):
        u = b + zoff[a, b, c] - 0.5 + 5
        v = c + xoff[a, b, c] - 0.5 + 7
        d = np.hypot(pix[:, 1] - u, pix[:, 2] - v)[pix[:, 0] == a + 3]
        assert d.min() < 1e-5
    assert counts.sum() >= len(f) > 0
    ff, fpos, fz, fx, fc = crop_sample(e, 3, 4, 5, 7, (16, 16), flip=True, reverse=True)
    np.testing.assert_array_equal(ff, frames[::-1, :, ::-1])
    np.testing.assert_array_equal(fpos, pos[::-1, :, ::-1])
    np.testing.assert_array_equal(fc, counts[::-1])
    np.testing.assert_allclose(fz, zoff[::-1, :, ::-1], atol=1e-6)
    m = fpos == 1
    np.testing.assert_allclose(fx[m], 1.0 - xoff[::-1, :, ::-1][m], atol=1e-5)


def test_batches_depend_only_on_seed_rank_and_step(tmp_path):
    from ultrasound_ai.core.training import load_config

    cfg = load_config(tiny_config(tmp_path, steps=10), defaults=DEFAULT_CONFIG)
    task = DmlTask()
    task.build_model(cfg)
    it = task.batches(cfg, 0, 1, 0)
    seq = [next(it) for _ in range(4)]
    again = next(task.batches(cfg, 0, 1, 3))
    for a, b in zip(seq[3], again):
        torch.testing.assert_close(a, b)
    assert not torch.equal(seq[0][0], seq[1][0])
    other_rank = next(task.batches(cfg, 1, 2, 3))
    assert not torch.equal(other_rank[0], again[0])
    frames, pos, zoff, xoff, counts = seq[0]
    assert frames.shape == (4, 4, 16, 16) and counts.shape == (4, 4)


def test_clutter_is_simulated_then_svd_filtered_by_default():
    d = data_options({})
    assert d["clutter_db"] == 20.0 and d["svd_cutoff"] == 4
    kw = dict(seed=3, bubbles_per_frame=100, noise_db=-30, n_frames=20, shape_zx=(24, 28))
    clean = simulated_entry(**kw, clutter_db=None)
    unfiltered = simulated_entry(**kw, clutter_db=20.0, svd_cutoff=0)
    filt = simulated_entry(**kw, clutter_db=20.0, svd_cutoff=4)
    np.testing.assert_array_equal(clean["gt"], filt["gt"])  # same bubbles
    # +20 dB tissue dominates the unfiltered envelope (rms 10 x a bubble); the SVD filter removes most of it.
    med = {k: float(np.median(e["envelope"].astype(np.float32))) for k, e in
           (("clean", clean), ("unfiltered", unfiltered), ("filtered", filt))}
    assert med["unfiltered"] > 50 * med["clean"]
    assert med["filtered"] < 0.1 * med["unfiltered"]


def test_bad_data_options_are_refused():
    with pytest.raises(InputError, match="unknown key"):
        data_options({"crop": [64, 64]})
    with pytest.raises(InputError, match="crop_zx"):
        data_options({"crop_zx": [100, 64]})
    with pytest.raises(InputError, match="val_sets"):
        data_options({"val_sets": []})
    with pytest.raises(InputError, match="method"):
        train_dml({**tiny_config("unused"), "method": "fima"})


# ------------------------------------------------------------------------------------- learning


def _heldout_crops(n_windows=24):
    e = simulated_entry(seed=777, bubbles_per_frame=150, noise_db=-40, n_frames=40, shape_zx=(32, 32))
    rng = np.random.default_rng(5)
    return [crop_sample(e, int(rng.integers(0, 36)), 4, int(rng.integers(0, 17)), int(rng.integers(0, 17)), (16, 16))
            for _ in range(n_windows)]


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("dml_train")
        result = train_dml(tiny_config(out), resume=False, progress_bar=False)
    finally:
        torch.set_num_threads(before)
    return result


def test_tiny_model_learns_to_detect_and_localize(trained_tiny, one_thread):
    from ultrasound_ai.ulm.dml_inference import load_dml_model, select_detections

    net, card = load_dml_model(trained_tiny.final_path, "cpu")
    hits = total = 0
    err_model, err_centre = [], []
    chance = []
    with torch.no_grad():
        for frames, pos, zoff, xoff, counts in _heldout_crops():
            maps = net(torch.from_numpy(frames)[None])["maps"][0].numpy()
            for f in range(frames.shape[0]):
                truth = pos[f] == 1
                k = int(truth.sum())
                if k == 0:
                    continue
                iz, ix, _, _, _ = select_detections(maps[f], k)  # top-k with the true k
                hits += int(truth[iz, ix].sum())
                total += k
                chance.append(k / truth.size)
                dz = maps[f, 1][truth] - zoff[f][truth]
                dx = maps[f, 2][truth] - xoff[f][truth]
                err_model.append(np.hypot(dz, dx))
                err_centre.append(np.hypot(0.5 - zoff[f][truth], 0.5 - xoff[f][truth]))
    recall = hits / total
    # Chance (random pixels) finds k/area of them: ~1-2 %; the trained network finds most bubbles.
    assert recall > 0.5 > 10 * np.mean(chance)
    # Sub-pixel offsets beat "the bubble is at the pixel centre" on the true bubble pixels.
    assert np.mean(np.concatenate(err_model)) < 0.8 * np.mean(np.concatenate(err_centre))


def test_training_log_card_and_validation_improvement(trained_tiny):
    res = trained_tiny
    assert res.steps == 250 and res.final_path.is_file() and res.best_path is not None
    card = json.loads(res.final_path.with_name("final.card.json").read_text())
    assert card["method"] == "ulm_3dml_resnet"
    assert card["configuration"]["width"] == 8 and card["configuration"]["window_frames"] == 4
    assert card["input"]["pixel_size_lambda"] == [1.0, 1.0] and card["input"]["frames_per_window"] == 4
    assert "window" in card["input"]["intensity"] and card["training"]["ulm_sim_version"]
    assert card["training"]["validation_seeds"] == [4242]
    with open(res.log_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    base = float(rows[0]["val_jaccard"])
    final = float(rows[-1]["val_jaccard"])
    assert rows[0]["step"] == "0" and rows[-1]["step"] == "250"
    assert final > base + 0.1 and final == pytest.approx(res.metrics["jaccard"])
    assert float(rows[-1]["loss"]) < float(rows[1]["loss"])
    # The counting network learns too: its relative count error falls well below the untrained one.
    assert res.metrics["count_rel_error"] < 0.75 * float(rows[0]["val_count_rel_error"])


def test_train_cli_runs_and_refuses_a_bad_config(tmp_path, one_thread):
    from ultrasound_ai.cli import main

    cfg = tiny_config(tmp_path / "run", steps=2)
    cfg["data"]["val_frames"] = 4
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    assert main(["ulm", "train", "--config", str(path), "--quiet"]) == 0
    assert (tmp_path / "run" / "final.pt").is_file() and (tmp_path / "run" / "final.card.json").is_file()
    cfg["data"]["pool"] = 3
    path.write_text(json.dumps(cfg))
    assert main(["ulm", "train", "--config", str(path), "--quiet", "--no-resume"]) == 2
