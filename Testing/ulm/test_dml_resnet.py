"""3DML-ResNet network, counting network, sliding-window inference and the pipeline's "3dml" method."""

import numpy as np
import pytest
import torch

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.ulm.dml_inference import (
    DmlFrameCounter,
    DmlLocalizationRunner,
    FrameEstimate,
    SlidingWindowRunner,
    estimates_to_localizations,
    localize_3dml,
    select_detections,
)
from ultrasound_ai.ulm.dml_resnet import (
    PRESETS,
    DmlLocalizer,
    build_model,
    count_parameters,
    dml_config,
    normalise_windows,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # Testing/conftest.py


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """An untrained tiny model saved with a card, as training would write it."""
    from ultrasound_ai.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    net = build_model("tiny")
    path = tmp_path_factory.mktemp("dml_model") / "dml_tiny.pt"
    card = {"name": "dml_tiny", "method": "ulm_3dml_resnet", "configuration": net.config.to_dict(),
            "input": {"pixel_size_lambda": [1.0, 1.0], "frames_per_window": 4}, "training": {}, "metrics": {}}
    save_checkpoint(net.state_dict(), path, card)
    return path


@pytest.fixture(scope="module")
def tiny_acquisition():
    from ultrasound_ai.ulm.simulator import UlmSimConfig, simulate_acquisition

    return simulate_acquisition(UlmSimConfig(n_frames=20, bubbles_per_frame=10, clutter_db=20.0, noise_db=-30.0,
                                             seed=5, shape_zx=(24, 28)))


# ----------------------------------------------------------------------------------------- network


def test_output_shapes_ranges_and_odd_frame_sizes():
    torch.manual_seed(0)
    net = build_model("tiny")
    x = torch.rand(2, 5, 13, 17) * 7.0
    with torch.no_grad():
        out = net(x)
    assert out["maps"].shape == (2, 5, 3, 13, 17) and out["count"].shape == (2, 5)
    assert float(out["maps"].min()) >= 0.0 and float(out["maps"].max()) <= 1.0
    assert float(out["count"].min()) >= 0.0
    with pytest.raises(InputError, match=r"\[B, N, Z, X\]"):
        net(torch.rand(5, 13, 17))


def test_windows_are_normalised_by_their_own_maximum():
    x = torch.rand(3, 4, 6, 7) * torch.tensor([1.0, 5.0, 100.0]).view(3, 1, 1, 1)
    n = normalise_windows(x)
    torch.testing.assert_close(n.flatten(1).amax(1), torch.ones(3))
    torch.testing.assert_close(normalise_windows(torch.zeros(1, 2, 3, 3)), torch.zeros(1, 2, 3, 3))
    # So the network's output ignores the input's scale, and each window ignores its batch neighbours.
    torch.manual_seed(1)
    net = build_model("tiny").eval()
    with torch.no_grad():
        a = net(x)
        b = net(x * 37.0)
        c = net(x[1:2])
    torch.testing.assert_close(a["maps"], b["maps"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a["maps"][1:2], c["maps"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a["count"][1:2], c["count"], rtol=1e-5, atol=1e-5)


def test_time_is_a_convolution_axis():
    # 3x3x3 kernels group frames in threes: a change in frame 0 reaches the next frames, one frame per
    # conv. With one residual block there are 5 convs in a row (first, two in the block, mid, last), so
    # frame 0 reaches frames 0..5 and never frame 6.
    torch.manual_seed(2)
    net = build_model({"preset": "tiny", "blocks": 1}).eval()
    x = torch.rand(1, 8, 8, 8) * 0.5
    x[0, 7, 0, 0] = 1.0  # the window maximum stays put, so normalisation does not spread the change
    y = x.clone()
    y[0, 0, 4, 4] += 0.2
    with torch.no_grad():
        d = (net(x)["maps"] - net(y)["maps"]).abs().flatten(2).amax(2)[0]
    assert d[1] > 0 and d[5] > 0
    assert float(d[6]) == 0.0 and float(d[7]) == 0.0


def test_fast_inference_path_computes_the_training_formula():
    # Inference runs in place, PReLU as a leaky ReLU, optionally channels-last: the same numbers as the
    # differentiable forward used in training (learnable residual weights included).
    from ultrasound_ai.ulm.dml_inference import model_predictor

    torch.manual_seed(1)
    for learnable in (False, True):
        net = DmlLocalizer(dml_config({"preset": "tiny", "learnable_res_scale": learnable})).eval()
        with torch.no_grad():
            for blk in net.resnet.blocks:
                blk.act.weight.fill_(0.3)  # a slope that matters (the default 0.25 would do as well)
        x = torch.rand(2, 6, 12, 17)
        ref = net(x)["maps"].detach()
        with torch.no_grad():
            fast = net(x)["maps"]
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
        maps, counts = model_predictor(net, channels_last=True)(x.numpy())
        np.testing.assert_allclose(maps, ref.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(counts, net(x)["count"].detach().numpy(), rtol=1e-4, atol=1e-5)


def test_paper_configuration_parameter_count():
    net = build_model("paper")
    # conv_first 2,688 + 20 block convs 4,978,560 + 10 PReLU + conv_mid 248,928 + conv_last 7,779
    assert count_parameters(net.resnet) == 5_237_965
    assert abs(count_parameters(net.resnet) - 5.2e6) / 5.2e6 < 0.01
    cfg = PRESETS["paper"]
    assert (cfg.width, cfg.blocks, cfg.window_frames) == (96, 10, 10)
    shipped = PRESETS["shipped"]
    assert 32 <= shipped.width <= 48 and 4 <= shipped.blocks <= 6


def test_learnable_residual_weight_and_bad_configurations():
    fixed = build_model({"preset": "tiny"})
    learnable = build_model({"preset": "tiny", "learnable_res_scale": True})
    assert count_parameters(learnable) == count_parameters(fixed) + fixed.config.blocks
    assert "resnet.blocks.0.res_scale" not in fixed.state_dict()
    with pytest.raises(InputError, match="unknown"):
        dml_config("huge")
    with pytest.raises(InputError, match="unknown key"):
        dml_config({"preset": "tiny", "depth": 3})
    with pytest.raises(InputError, match="width"):
        dml_config({"width": 0})


# ------------------------------------------------------------------------------ sliding windows


def toy_predictor(log):
    """maps = (frame value, window start / 10, 0.5), count = 3 * frame value; records each window."""

    def predict(windows):
        b, n, z, x = windows.shape
        maps = np.zeros((b, n, 3, z, x), np.float32)
        maps[:, :, 0] = windows
        counts = np.zeros((b, n), np.float32)
        for k in range(b):
            start = int(windows[k, 0, 0, 0]) // 100  # frames carry their index (see frames_with_index)
            log.append((start, n))
            maps[k, :, 1] = start / 10.0
            counts[k] = 3.0 * windows[k, :, 0, 0] / 100.0
        maps[:, :, 2] = 0.5
        return maps, counts

    return predict


def frames_with_index(t, z=3, x=4):
    return (np.arange(t, dtype=np.float32) * 100.0)[:, None, None] + np.zeros((t, z, x), np.float32)


def test_sliding_window_average_equals_the_hand_computed_one():
    log = []
    runner = SlidingWindowRunner(toy_predictor(log), window_frames=3, stride=1, batch_windows=2)
    est = runner.push(frames_with_index(6)) + runner.finish()
    assert [s for s, _ in log] == [0, 1, 2, 3]
    assert [e.index for e in est] == list(range(6))
    # Frame t is in the windows starting at max(0, t-2)..min(t, 3): mean of their starts / 10.
    expected_starts = {0: [0], 1: [0, 1], 2: [0, 1, 2], 3: [1, 2, 3], 4: [2, 3], 5: [3]}
    for e in est:
        assert e.n_estimates == len(expected_starts[e.index])
        assert e.maps[1, 0, 0] == pytest.approx(np.mean(expected_starts[e.index]) / 10.0)
        assert e.maps[0, 1, 2] == pytest.approx(100.0 * e.index)
        assert e.count == pytest.approx(3.0 * e.index)
        np.testing.assert_array_equal(e.envelope, frames_with_index(6)[e.index])


def test_streaming_in_any_blocks_equals_one_push():
    frames = frames_with_index(11)
    for stride in (1, 2, 3):
        ref = SlidingWindowRunner(toy_predictor([]), 4, stride=stride)
        whole = ref.push(frames) + ref.finish()
        for cuts in ([3, 7], [1, 2, 3, 10], [5]):
            r = SlidingWindowRunner(toy_predictor([]), 4, stride=stride)
            got = []
            bounds = [0, *cuts, 11]
            for a, b in zip(bounds[:-1], bounds[1:]):
                got += r.push(frames[a:b])
            got += r.finish()
            assert [e.index for e in got] == list(range(11))
            for e, w in zip(got, whole):
                np.testing.assert_array_equal(e.maps, w.maps)
                assert e.count == w.count and e.n_estimates == w.n_estimates
    # Overlapping blocks (the pipeline's) skip the frames already pushed.
    r = SlidingWindowRunner(toy_predictor([]), 4, stride=1)
    got = r.push(frames[0:6], 0) + r.push(frames[4:11], 4) + r.finish()
    np.testing.assert_array_equal(np.stack([e.maps for e in got]), np.stack([e.maps for e in whole_stride1(frames)]))
    with pytest.raises(InputError, match="starts at frame"):
        r2 = SlidingWindowRunner(toy_predictor([]), 4)
        r2.push(frames[:3], 0)
        r2.push(frames[5:], 5)


def whole_stride1(frames):
    r = SlidingWindowRunner(toy_predictor([]), 4, stride=1)
    return r.push(frames) + r.finish()


def test_tail_window_and_short_acquisitions():
    log = []
    r = SlidingWindowRunner(toy_predictor(log), 4, stride=4)
    est = r.push(frames_with_index(10)) + r.finish()
    # Windows at 0 and 4, then a tail window 6..9 that only counts for the uncovered frames 8 and 9.
    assert log == [(0, 4), (4, 4), (6, 4)]
    assert [e.n_estimates for e in est] == [1] * 10
    assert est[7].maps[1, 0, 0] == pytest.approx(0.4) and est[8].maps[1, 0, 0] == pytest.approx(0.6)
    log.clear()
    r = SlidingWindowRunner(toy_predictor(log), 8)
    est = r.push(frames_with_index(3)) + r.finish()
    assert log == [(0, 3)] and len(est) == 3
    with pytest.raises(InputError, match="stride"):
        SlidingWindowRunner(toy_predictor([]), 4, stride=5)


def test_long_windows_estimate_each_frame_once_away_from_the_edges():
    log = []
    r = SlidingWindowRunner(toy_predictor(log), 8, stride=4, keep_margin=2)
    est = r.push(frames_with_index(19)) + r.finish()
    # Windows at 0, 4, 8 keep their frames [2, 6) (the first from 0); a tail window 11..18 the rest.
    assert log == [(0, 8), (4, 8), (8, 8), (11, 8)]
    want = {**dict.fromkeys(range(0, 6), 0), **dict.fromkeys(range(6, 10), 4), **dict.fromkeys(range(10, 14), 8),
            **dict.fromkeys(range(14, 19), 11)}
    assert [e.index for e in est] == list(range(19)) and all(e.n_estimates == 1 for e in est)
    assert [round(float(e.maps[1, 0, 0]) * 10) for e in est] == [want[t] for t in range(19)]
    # Streaming in any blocks gives the same estimates.
    for cuts in ([3, 7], [1, 2, 9, 10], [13]):
        r = SlidingWindowRunner(toy_predictor([]), 8, stride=4, keep_margin=2)
        bounds, got = [0, *cuts, 19], []
        for a, b in zip(bounds[:-1], bounds[1:]):
            got += r.push(frames_with_index(19)[a:b])
        got += r.finish()
        np.testing.assert_array_equal(np.stack([e.maps for e in got]), np.stack([e.maps for e in est]))
    with pytest.raises(InputError, match="keep margin"):
        SlidingWindowRunner(toy_predictor([]), 8, stride=4, keep_margin=3)


def test_window_workers_predict_at_once_and_give_the_estimates_of_one_worker():
    # CPU inference runs batches of windows on several threads (one torch thread each). The first two
    # predictions must be in flight together (a barrier both must reach; one worker would never release
    # it), and the estimates must be those of one worker, in any block sizes and strides.
    import threading

    barrier = threading.Barrier(2, timeout=10)
    calls = []
    toy = toy_predictor([])

    def predict(windows):
        name = threading.current_thread().name
        calls.append(name)
        if name.startswith("3dml-window") and calls.count(name) == 1:  # a lone batch runs in the caller
            barrier.wait()
        return toy(windows)

    frames = frames_with_index(23)
    for stride, cuts in ((1, []), (3, [5, 6, 17]), (4, [9])):
        ref = SlidingWindowRunner(toy_predictor([]), 4, stride=stride, batch_windows=1)
        want = ref.push(frames) + ref.finish()
        barrier.reset()
        calls.clear()
        r = SlidingWindowRunner(predict, 4, stride=stride, batch_windows=1, workers=2)
        bounds, got = [0, *cuts, 23], []
        for a, b in zip(bounds[:-1], bounds[1:]):
            got += r.push(frames[a:b])
        got += r.finish()
        assert [e.index for e in got] == list(range(23)) and len({c for c in calls if c.startswith("3dml")}) == 2
        for e, w in zip(got, want):
            np.testing.assert_array_equal(e.maps, w.maps)
            assert e.count == w.count and e.n_estimates == w.n_estimates
        assert r._pool is None  # shut down by finish()
    # push_iter hands the finished frames over batch by batch (to be localized while the next batches run).
    r = SlidingWindowRunner(toy_predictor([]), 4, stride=2, batch_windows=2, keep_margin=1, workers=2)
    parts = list(r.push_iter(frames)) + [r.finish()]
    ref = SlidingWindowRunner(toy_predictor([]), 4, stride=2, batch_windows=2, keep_margin=1)
    want = ref.push(frames) + ref.finish()
    assert len([p for p in parts if p]) >= 4 and [e.index for p in parts for e in p] == list(range(23))
    np.testing.assert_array_equal(np.stack([e.maps for p in parts for e in p]), np.stack([e.maps for e in want]))
    with pytest.raises(InputError, match="workers"):
        SlidingWindowRunner(toy_predictor([]), 4, workers=0)


def test_int8_localizations_of_the_shipped_model_match_fp32():
    # The default on CPU runs the shipped ResNet in int8 (dml_int8): on a fast-simulated piece nearly every
    # detection must be the fp32 one at the same place (a wrong scale or a lost residual branch moves or
    # drops most of them). On the pymust validation pieces the two gave the same Jaccard within 0.004.
    from ultrasound_ai.ulm.clutter import svd_filter
    from ultrasound_ai.ulm.simulator import UlmSimConfig, simulate_acquisition

    acq = simulate_acquisition(UlmSimConfig(n_frames=12, bubbles_per_frame=60, clutter_db=20.0, noise_db=-30.0,
                                            seed=31, shape_zx=(48, 64)))
    env = np.abs(svd_filter(acq.iq, 4)).astype(np.float32)
    rows = {}
    for precision in ("int8", "fp32"):
        r = DmlLocalizationRunner(acq.pixel_size_mm, acq.origin_mm, acq.wavelength_mm, device="cpu",
                                  precision=precision)
        assert r.int8 == (precision == "int8")
        rows[precision] = np.concatenate([r.push(env), r.finish()])
    a, b = rows["int8"], rows["fp32"]
    assert abs(len(a) - len(b)) <= 0.02 * len(b) and len(b) > 400
    same = 0
    for f in np.unique(b[:, 0]):
        pa, pb = a[a[:, 0] == f, 1:3], b[b[:, 0] == f, 1:3]
        d = np.hypot(pa[:, None, 0] - pb[None, :, 0], pa[:, None, 1] - pb[None, :, 1]).min(axis=1)
        same += int((d < 0.1 * acq.wavelength_mm).sum())
    assert same >= 0.95 * len(b)


def test_precision_choice_and_refusals(monkeypatch):
    from ultrasound_ai.ulm import dml_int8
    from ultrasound_ai.ulm.dml_inference import resolve_int8

    assert resolve_int8("fp32", "cpu") is False
    assert resolve_int8("auto", "cuda") is False
    with pytest.raises(InputError, match="CPU only"):
        resolve_int8("int8", "cuda")
    with pytest.raises(InputError, match="--precision"):
        resolve_int8("half", "cpu")
    monkeypatch.setattr(dml_int8, "int8_available", lambda: True)
    assert resolve_int8("auto", "cpu") is True and resolve_int8("int8", "cpu") is True
    monkeypatch.setattr(dml_int8, "int8_available", lambda: False)  # e.g. an ARM build: auto falls back to fp32
    assert resolve_int8("auto", "cpu") is False
    with pytest.raises(InputError, match="--precision fp32"):
        resolve_int8("int8", "cpu")


def test_window_workers_give_the_localizations_of_one_worker(tiny_checkpoint, tiny_acquisition):
    # The 3DML runner's default on CPU: one worker per torch thread, each with torch on one thread (the
    # caller's thread count is restored); the localizations are the same numbers as with one worker.
    from ultrasound_ai.ulm.clutter import svd_filter
    from ultrasound_ai.ulm.dml_inference import default_workers

    acq = tiny_acquisition
    env = np.abs(svd_filter(acq.iq, 4)).astype(np.float32)
    import sys

    from ultrasound_ai.ulm.dml_inference import GIL_SWITCH_INTERVAL_S, gil_switch_interval

    rows, intervals = {}, {}
    before = sys.getswitchinterval()
    for workers in (1, 2):
        r = DmlLocalizationRunner(acq.pixel_size_mm, acq.origin_mm, acq.wavelength_mm, model=tiny_checkpoint,
                                  device="cpu", window_mode="sliding", window_stride=2, batch_windows=1,
                                  workers=workers)
        predict = r.runner.predict

        def seen(windows, predict=predict, log=intervals.setdefault(workers, set())):
            log.add(sys.getswitchinterval())
            return predict(windows)

        r.runner.predict = seen
        torch.set_num_threads(workers)
        try:
            rows[workers] = np.concatenate([r.push(env[:11], 0), r.push(env[11:], 11), r.finish()])
            assert torch.get_num_threads() == workers
        finally:
            torch.set_num_threads(1)
    assert rows[1].shape[0] > 0
    np.testing.assert_array_equal(rows[2], rows[1])
    # With workers, Python's GIL switch interval is shortened while they run (the tracking thread would keep
    # the GIL up to 5 ms between two of a worker's torch operations), then restored; one worker leaves it.
    assert intervals == {1: {before}, 2: {min(before, GIL_SWITCH_INTERVAL_S)}} and sys.getswitchinterval() == before
    with gil_switch_interval(0.001):
        with gil_switch_interval(0.0002):
            assert sys.getswitchinterval() == pytest.approx(0.0002)
        assert sys.getswitchinterval() == pytest.approx(0.0002)  # restored by the last one out only
    assert sys.getswitchinterval() == before
    from ultrasound_ai.ulm.dml_inference import torch_threads_for_workers

    for threads, workers, inside in ((4, 2, 2), (2, 2, 1), (3, 4, 1), (2, 1, 2)):
        torch.set_num_threads(threads)
        try:
            with torch_threads_for_workers(workers):
                assert torch.get_num_threads() == inside
            assert torch.get_num_threads() == threads
        finally:
            torch.set_num_threads(1)
    assert default_workers("cpu") == 1  # this module runs torch on one thread
    torch.set_num_threads(2)
    try:
        assert default_workers("cpu") == 2
    finally:
        torch.set_num_threads(1)


def test_default_windows_estimate_each_frame_once_off_the_window_edges(tiny_checkpoint, tiny_acquisition):
    # The default layout ("inner"): the trained N-frame windows slid by N - 2, each frame estimated once,
    # from the window where it is neither first nor last (on the speed benchmark's 100-bubble set a
    # frame estimated at a window's edge had raw Jaccard 0.53, inside 0.61-0.62; tiled windows lost
    # 0.026 that way). Only the acquisition's first and last frames are estimated at an edge.
    from ultrasound_ai.ulm.pipeline import UlmParams

    assert UlmParams().window_mode == "inner"
    acq = tiny_acquisition
    runner = DmlLocalizationRunner(acq.pixel_size_mm, acq.origin_mm, acq.wavelength_mm, model=tiny_checkpoint,
                                   device="cpu")
    r = runner.runner
    assert (r.n, r.stride, r.m) == (4, 2, 1)
    log = []
    r.predict = toy_predictor(log)
    est = r.push(frames_with_index(11)) + r.finish()
    assert log == [(0, 4), (2, 4), (4, 4), (6, 4), (7, 4)]  # the last one: the tail window for frames 9, 10
    starts = [round(float(e.maps[1, 0, 0]) * 10) for e in est]
    assert [e.index for e in est] == list(range(11)) and all(e.n_estimates == 1 for e in est)
    assert starts == [0, 0, 0, 2, 2, 4, 4, 6, 6, 7, 7]
    positions = [e.index - s for e, s in zip(est, starts)]
    assert all(1 <= j <= 2 for j in positions[1:-1]) and positions[0] == 0 and positions[-1] == 3
    # --window-stride below N - 2 averages several inner estimates (here 2 per frame, positions 1 and 2).
    r = DmlLocalizationRunner(acq.pixel_size_mm, acq.origin_mm, acq.wavelength_mm, model=tiny_checkpoint,
                              device="cpu", window_stride=1).runner
    r.predict = toy_predictor([])
    est = r.push(frames_with_index(9)) + r.finish()
    assert (r.stride, r.m) == (1, 1) and [e.n_estimates for e in est] == [1, 1, 2, 2, 2, 2, 2, 1, 1]
    assert est[4].maps[1, 0, 0] == pytest.approx((0.2 + 0.3) / 2)  # windows at 2 and 3
    with pytest.raises(InputError, match="--window-stride"):
        DmlLocalizationRunner(acq.pixel_size_mm, acq.origin_mm, acq.wavelength_mm, model=tiny_checkpoint,
                              device="cpu", window_stride=3)


def test_default_windows_predict_only_the_frames_they_keep(tiny_checkpoint, tiny_acquisition):
    # The default ("inner") windows drop their edge frames, so the network computes the counting network and
    # the last convolution for the kept frames only (every earlier layer is needed on all N frames): the
    # estimates must be those of whole windows (within float rounding), and the predictor must be asked
    # for the kept frames: (0, N - 1) in the first window, (1, N - 1) after, the uncovered ones in the tail.
    acq = tiny_acquisition
    env = np.abs(acq.iq[:11]).astype(np.float32)

    def runner(log, ranges: bool):
        r = DmlLocalizationRunner(acq.pixel_size_mm, acq.origin_mm, acq.wavelength_mm, model=tiny_checkpoint,
                                  device="cpu", workers=1, batch_windows=2)
        full = r.runner.predict

        def predict(windows, keep=None):
            log.append((windows.shape[0], keep))
            return full(windows, keep=keep)

        predict.predicts_frame_range = ranges
        r.runner.predict = predict
        return r

    seen = []
    log, ref_log = [], []
    r, ref = runner(log, True), runner(ref_log, False)
    r.net.counter.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    est = r.runner.push(env) + r.runner.finish()
    want = ref.runner.push(env) + ref.runner.finish()
    # Windows at 0, 2 | 4, 6 (batches of 2), then a tail window at 7 for frames 9 and 10.
    assert log == [(2, (0, 3)), (2, (1, 3)), (1, (2, 4))] and all(k is None for _, k in ref_log)
    assert seen == [2 * 3, 2 * 2, 2 * 2]  # kept frames only (a lone window runs beside a copy of itself)
    assert [e.index for e in est] == [e.index for e in want] == list(range(11))
    np.testing.assert_allclose(np.stack([e.maps for e in est]), np.stack([e.maps for e in want]), rtol=0, atol=2e-6)
    np.testing.assert_allclose([e.count for e in est], [e.count for e in want], rtol=1e-5)
    with pytest.raises(InputError, match="frames to predict"):
        r.net(torch.zeros(1, 4, 8, 8), keep=(3, 3))


def test_a_single_window_runs_in_a_batch_of_two_with_the_same_numbers():
    # A batch of one 3D window does not take oneDNN's convolution on CPU (about 14x slower per window
    # than a batch of two): the fast predictor pads it with a copy; its outputs equal the network's.
    from ultrasound_ai.ulm.dml_inference import model_predictor

    torch.manual_seed(3)
    net = DmlLocalizer(dml_config("tiny")).eval()
    x = np.random.default_rng(0).random((1, 4, 12, 17), dtype=np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(x))
    seen = []
    net.resnet.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    maps, counts = model_predictor(net, channels_last=True)(x)
    assert seen == [2] and maps.shape == (1, 4, 3, 12, 17) and counts.shape == (1, 4)
    np.testing.assert_allclose(maps, ref["maps"].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(counts, ref["count"].numpy(), rtol=1e-4, atol=1e-5)
    seen.clear()
    model_predictor(net, channels_last=True)(np.concatenate([x, x]))  # larger batches are left alone
    model_predictor(net, channels_last=False, fused=False, pad_single=False)(x)  # the old path is not padded
    assert seen == [2, 1]


def test_peaks_only_keeps_one_detection_per_bubble():
    maps = np.zeros((3, 6, 7), np.float32)
    maps[0, 2, 3], maps[0, 2, 4] = 0.9, 0.8  # one bubble spread over two pixels
    maps[0, 5, 0] = 0.5
    iz, ix, *_ = select_detections(maps, 2)
    assert list(zip(iz, ix)) == [(2, 3), (2, 4)]
    iz, ix, *_ = select_detections(maps, 2, peaks_only=True)
    assert list(zip(iz, ix)) == [(2, 3), (5, 0)]
    assert select_detections(maps, 5, peaks_only=True)[0].size == 2  # fewer peaks (Pos > 0) than asked


# ----------------------------------------------------------------------- detections and geometry


def test_top_n_detections_convert_to_millimetres():
    maps = np.zeros((3, 5, 6), np.float32)
    maps[0, 2, 3] = 0.9
    maps[1, 2, 3] = 0.75  # z offset +0.25 px
    maps[2, 2, 3] = 0.25  # x offset -0.25 px
    maps[0, 4, 0] = 0.6
    maps[1:, 4, 0] = 0.5
    maps[0, 0, 5] = 0.1
    iz, ix, zo, xo, p = select_detections(maps, 2)
    assert iz.tolist() == [2, 4] and ix.tolist() == [3, 0] and p.tolist() == pytest.approx([0.9, 0.6])
    env = np.arange(30, dtype=np.float32).reshape(5, 6)
    est = [FrameEstimate(index=7, envelope=env, maps=maps, count=1.6, n_estimates=3)]
    pix, origin = (0.2, 0.3), (1.0, -2.0)
    rows = estimates_to_localizations(est, pix, origin)  # round(1.6) = 2 from the counter
    np.testing.assert_allclose(rows, [[7, 1.0 + 2.25 * 0.2, -2.0 + 2.75 * 0.3, env[2, 3]],
                                      [7, 1.0 + 4 * 0.2, -2.0 + 0 * 0.3, env[4, 0]]])
    assert estimates_to_localizations(est, pix, origin, bubbles_per_frame=1).shape == (1, 4)
    assert estimates_to_localizations(est, pix, origin, bubbles_per_frame={7: 0}).shape == (0, 4)
    assert estimates_to_localizations(est, pix, origin, bubbles_per_frame=100).shape == (30, 4)



def _spot_estimate(true_zx, net_zx, shape=(24, 28)):
    """One frame: a Gaussian spot (sigma 1 px) at true_zx and a network Pos peak in its pixel whose
    offsets put the detection at net_zx."""
    zz, xx = np.mgrid[:shape[0], :shape[1]]
    env = np.exp(-((zz - true_zx[0]) ** 2 + (xx - true_zx[1]) ** 2) / 2.0).astype(np.float32)
    iz, ix = int(round(net_zx[0])), int(round(net_zx[1]))
    maps = np.zeros((3,) + shape, np.float32)
    maps[0, iz, ix] = 0.9
    maps[1, iz, ix] = net_zx[0] - iz + 0.5
    maps[2, iz, ix] = net_zx[1] - ix + 0.5
    return [FrameEstimate(index=0, envelope=env, maps=maps, count=1.0, n_estimates=1)]


def test_3dml_offsets_are_averaged_with_radial_symmetry_where_the_two_agree(tiny_checkpoint, tiny_acquisition):
    # On pymust-formed validation frames the network's sub-pixel offsets were less precise than its
    # detections (raw/tracked Jaccard at 100 bubbles/frame, -40 dB: 0.343/0.324 vs RS 0.347/0.346);
    # averaging them with radial symmetry on the envelope around the detected pixel, where the two
    # agree within 0.3 px, gave 0.389/0.371. The default runner does it; far apart, the network wins.
    from ultrasound_ai.ulm.pipeline import UlmParams

    acq = tiny_acquisition
    runner = DmlLocalizationRunner((1.0, 1.0), (0.0, 0.0), 1.0, model=tiny_checkpoint, device="cpu")
    true_zx = (10.3, 12.6)
    net = (10.3 + 0.2, 12.6 - 0.15)  # 0.25 px off: agrees with RS within 0.3 px per axis
    rows = runner._rows(_spot_estimate(true_zx, net))
    assert rows.shape == (1, 4)
    np.testing.assert_allclose(rows[0, 1:3], [(true_zx[0] + net[0]) / 2, (true_zx[1] + net[1]) / 2], atol=0.02)
    far = (10.3 + 0.45, 12.6)  # disagrees: the network's position is kept
    np.testing.assert_allclose(runner._rows(_spot_estimate(true_zx, far))[0, 1:3], far, atol=1e-6)
    # Off: the network's offsets alone (as before); the pipeline passes its parameter through.
    plain = estimates_to_localizations(_spot_estimate(true_zx, net), (1.0, 1.0), (0.0, 0.0))
    np.testing.assert_allclose(plain[0, 1:3], net, atol=1e-6)
    assert UlmParams().rs_agreement_px == pytest.approx(0.3)
    off = DmlLocalizationRunner(acq.pixel_size_mm, acq.origin_mm, acq.wavelength_mm, model=tiny_checkpoint,
                                device="cpu", rs_agreement_px=0)
    assert off.rs_agreement_px == 0
    for bad in (-0.1, float("nan"), "x"):
        with pytest.raises(InputError, match="--rs-agreement"):
            UlmParams(rs_agreement_px=bad).validate()


# ------------------------------------------------------------------------------- model and pipeline


def test_runner_on_a_checkpoint_matches_the_network_and_refuses_other_pixel_sizes(tiny_checkpoint, tiny_acquisition):
    acq = tiny_acquisition
    rows = localize_3dml(acq, model=tiny_checkpoint, device="cpu", block_frames=7)
    assert rows.shape[1] == 4 and np.all(np.diff(rows[:, 0]) >= 0)
    assert set(np.unique(rows[:, 0]).astype(int)) <= set(range(acq.n_frames))
    z, x = acq.z_mm(), acq.x_mm()
    assert rows[:, 1].min() >= z[0] - acq.pixel_size_mm[0] / 2 and rows[:, 2].max() <= x[-1] + acq.pixel_size_mm[1] / 2
    # The counter sets the detections per frame: check against the network run by hand on frame 0's windows.
    net = DmlLocalizer(dml_config("tiny"))
    from ultrasound_ai.models.checkpoint import load_into

    load_into(net, tiny_checkpoint)
    env = torch.from_numpy(np.abs(acq.iq[:4]))[None]
    with torch.no_grad():
        count0 = float(net(env)["count"][0, 0])  # frame 0 is only in the first window
    assert int((rows[:, 0] == 0).sum()) == min(int(np.floor(count0 + 0.5)), 24 * 28)
    fixed = localize_3dml(acq, model=tiny_checkpoint, device="cpu", bubbles_per_frame=3)
    assert np.bincount(fixed[:, 0].astype(int)).tolist() == [3] * acq.n_frames
    with pytest.raises(InputError, match="wavelengths"):
        DmlLocalizationRunner((2 * acq.pixel_size_mm[0], acq.pixel_size_mm[1]), acq.origin_mm, acq.wavelength_mm,
                              model=tiny_checkpoint, device="cpu")
    counts = DmlFrameCounter(tiny_checkpoint, "cpu")(acq.iq[:6])
    assert counts.dtype == np.int64 and counts.shape == (6,) and np.all(counts >= 0)


def test_pipeline_3dml_is_identical_without_ground_truth(tiny_checkpoint, tiny_acquisition):
    from ultrasound_ai.ulm.pipeline import process_acquisition

    params = {"counting_network": True, "model": str(tiny_checkpoint), "device": "cpu", "block_frames": 10,
              "min_track_length": 2}
    with_gt = process_acquisition(tiny_acquisition, "3dml", dict(params))
    assert tiny_acquisition.gt_positions is not None
    without = process_acquisition(tiny_acquisition.without_truth(), "3dml", dict(params))
    assert with_gt.localizations.shape[0] > 0
    np.testing.assert_array_equal(with_gt.localizations, without.localizations)
    np.testing.assert_array_equal(with_gt.density, without.density)
    # Without the per-block SVD filter, the block size does not change the localizations: the runner
    # carries its windows across blocks.
    raw = {**params, "svd_cutoff": None}
    a = process_acquisition(tiny_acquisition, "3dml", {**raw, "block_frames": 8})
    b = process_acquisition(tiny_acquisition, "3dml", {**raw, "block_frames": 13})
    np.testing.assert_allclose(a.localizations[:, :4], b.localizations[:, :4], rtol=0, atol=1e-6)
