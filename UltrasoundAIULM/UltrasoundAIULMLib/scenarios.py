"""ULM scenarios (slicer-core: Testing/mrml/test_ulm_module.py; Slicer: UltrasoundAIULMTest).

They drive UltrasoundAIULMLogic on ``slicer.mrmlScene`` with real jobs and raise AssertionError on a
failed check. Helpers shared with the other modules' scenarios: ultrasound_ai.mrml.scenario_support;
the worker imports ``paused_process_task`` from here for the cancel scenario.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ultrasound_ai.mrml import scenario_support as support

# Short names for the shared checks (used on almost every line below).
_check, _close, _partials, _scene_node_ids, _expect_input_error = support.check, support.close, support.partial_files, support.scene_node_ids, support.expect_input_error

# The cancel scenario's task, made importable for the worker through ULTRASOUND_AI_EXTRA_TASKS.
PAUSED_TASK = "ulm.process_paused"
_PAUSED_TARGET = "UltrasoundAIULMLib.scenarios:paused_process_task"
_PAUSE_AT = 0.2  # after the first block of several: the job is mid-way
_MODULE_DIR = str(Path(__file__).resolve().parents[1])


# ---------------------------------------------------------------------------------------------------
# Data


def make_acquisition(path, seed: int = 3, n_frames: int = 200, bubbles_per_frame: float = 40.0,
                     clutter_db=None, noise_db=-30.0) -> Path:
    """A small simulated acquisition file (PALA geometry 84 x 143, ground truth with bubble ids);
    clutter off by default so that a test runs quickly and its numbers depend on the pipeline only."""
    from ultrasound_ai.ulm.simulator import simulate_to_file

    simulate_to_file(Path(path), n_frames=n_frames, bubbles_per_frame=bubbles_per_frame, clutter_db=clutter_db,
                     noise_db=noise_db, seed=seed)
    return Path(path)


def _input_folders(folder: Path) -> list:
    return sorted(p.name for p in Path(folder).glob("inputs-*"))


def _run_parameters(browser, **overrides) -> dict:
    # 50-frame blocks: several blocks (progress per block) in a 200-frame acquisition.
    parameters = {"inputSequence": browser, "method": "rs", "bubblesPerFrame": 40, "blockFrames": 50,
                  "minTrackLength": 5, "device": "cpu"}
    parameters.update(overrides)
    return parameters


# ---------------------------------------------------------------------------------------------------
# Processing


def process_scenario(acquisition_path, workdir, method: str = "rs", repeat: bool = False) -> dict:
    """Load the acquisition into the scene as a two-component IQ sequence (through the bridge), run the
    Logic with `method` in a real job, and check every output node against the result file the job
    wrote: geometry by the documented convention, values, colour tables, metrics table. With
    repeat=True load the results again and check that they replaced the first nodes.
    Returns {"logic", "browser", "nodes", "events", "result"}."""
    import slicer

    from ultrasound_ai.io.ulm_files import read_acquisition, read_result
    from ultrasound_ai.mrml import ijk_to_ras, sequence_to_complex
    from ultrasound_ai.mrml.tables import table_to_metrics
    from UltrasoundAIULMLib.logic import (
        COLOR_NODE_IDS,
        GROUND_TRUTH_ROLE,
        OUTPUT_ATTRIBUTE,
        UltrasoundAIULMLogic,
        map_ras_position,
        table_to_gt,
    )

    workdir = Path(workdir)
    truth = read_acquisition(acquisition_path)
    logic = UltrasoundAIULMLogic(workdir=workdir)
    browser = logic.load_acquisition(acquisition_path)
    seq = browser.GetMasterSequenceNode()
    _check(seq.GetNumberOfDataNodes() == truth.n_frames, f"the IQ sequence has {seq.GetNumberOfDataNodes()} frames, "
                                                          f"expected {truth.n_frames}")

    # The bridge's two-component sequence gives the file's IQ and geometry back exactly.
    back = sequence_to_complex(browser)
    _check(np.array_equal(back["iq"], truth.iq), "IQ changed on the way through the two-component sequence")
    _close(back["pixel_size_mm"], truth.pixel_size_mm, 1e-12, "pixel size through the sequence")
    _close(back["origin_mm"], truth.origin_mm, 1e-12, "origin through the sequence")
    table = browser.GetNodeReference(GROUND_TRUTH_ROLE)
    _check(table is not None, "the browser of an acquisition with ground truth must reference its table")
    _close(table_to_gt(table), truth.gt_positions, 0.0, "ground truth through the table")

    events = []
    parameters = _run_parameters(browser, method=method)
    nodes = logic.run(parameters, on_event=events.append)

    # Progress streamed from the worker, one report per block at least, never going backwards.
    fractions = [e["fraction"] for e in events if e.get("event") == "progress"]
    _check(len([f for f in fractions if 0 < f < 1]) >= 3, f"expected progress per block from the job, got {fractions}")
    _check(all(b >= a for a, b in zip(fractions, fractions[1:])), f"progress went backwards: {fractions}")
    _check(events[-1].get("event") == "result", f"the job's last event is {events[-1]}")

    result = read_result(nodes["result_file"])
    _check(result.attrs.get("method") == method, f"the result names method {result.attrs.get('method')!r}")
    _check(result.density.max() > 0, "the density map is empty")
    p = np.asarray(result.pixel_size_mm)
    _close(p, [truth.wavelength_mm / 10] * 2, 1e-9, "result pixel size (λ/10)")

    iq_proxy = browser.GetProxyNode(seq)
    for kind, dataset in (("density", "density"), ("direction", "direction"), ("velocity", "velocity_mm_s")):
        node = nodes[kind]
        image = getattr(result, dataset)
        _check(node.GetAttribute(OUTPUT_ATTRIBUTE) == kind, f"{kind} node not tagged")
        values = np.asarray(slicer.util.arrayFromVolume(node))
        _check(values.shape == (1,) + image.shape, f"{kind} node shape {values.shape}, expected (1,) + {image.shape}")
        _check(np.array_equal(values[0], image), f"{kind} node values differ from the result file's")
        # A known pixel's RAS position by the documented convention (LPS (x, 0, -z)).
        m = ijk_to_ras(node)
        for row, col in ((0, 0), (7, 11), (image.shape[0] - 1, image.shape[1] - 1)):
            _close((m @ [col, row, 0.0, 1.0])[:3], map_ras_position(row, col, result.pixel_size_mm, result.origin_mm),
                   1e-9, f"{kind} pixel ({row}, {col}) in RAS")
        # The same physical point in the IQ frame and in the map: the overlay is exact.
        iz, ix = 10, 20
        z = truth.origin_mm[0] + iz * truth.pixel_size_mm[0]
        x = truth.origin_mm[1] + ix * truth.pixel_size_mm[1]
        r, c = (z - result.origin_mm[0]) / p[0], (x - result.origin_mm[1]) / p[1]
        _close((m @ [c, r, 0.0, 1.0])[:3], (ijk_to_ras(iq_proxy) @ [ix, iz, 0.0, 1.0])[:3], 1e-9,
               f"{kind} map vs IQ frame at IQ pixel ({iz}, {ix})")
        display = node.GetDisplayNode()
        _check(display is not None and display.GetColorNodeID() == COLOR_NODE_IDS[kind],
               f"{kind} colour table {display.GetColorNodeID() if display else None!r}, expected {COLOR_NODE_IDS[kind]!r}")
    window = nodes["direction"].GetDisplayNode()
    _close(window.GetWindowLevelMin(), -window.GetWindowLevelMax(), 1e-9, "direction window centred on 0")

    # Metrics: present because the acquisition has ground truth, and the job's own numbers.
    metrics_node = nodes["metrics"]
    _check(metrics_node is not None, "no metrics table although the acquisition has ground truth")
    metrics = table_to_metrics(metrics_node)
    for key in ("jaccard", "precision", "recall", "ssim"):
        _check(key in metrics and np.isfinite(metrics[key]), f"metrics table lacks a finite {key}: {metrics}")
    _close(metrics["jaccard"], nodes["result"]["metrics"]["jaccard"], 1e-12, "metrics table jaccard vs the job's")
    _check(metrics["jaccard"] > 0.2, f"RS on a clean simulated acquisition should find bubbles: {metrics}")

    _check(_partials(workdir) == [], f"temporary files left behind: {_partials(workdir)}")
    _check(_input_folders(workdir) == [], f"exported inputs left behind: {_input_folders(workdir)}")

    out = {"logic": logic, "browser": browser, "nodes": nodes, "events": events, "result": result}
    if repeat:
        scene = browser.GetScene()
        n_nodes = scene.GetNumberOfNodes()
        again = logic.load_results(logic.launcher.result, parameters)
        for kind in ("density", "direction", "velocity", "metrics"):
            _check(again[kind].GetID() == nodes[kind].GetID(), f"a repeated run made a new {kind} node instead of replacing it")
        _check(scene.GetNumberOfNodes() == n_nodes, f"a repeated run changed the node count {n_nodes} -> {scene.GetNumberOfNodes()}")
        out["nodes"] = again
    return out


# ---------------------------------------------------------------------------------------------------
# Cancel


def paused_process_task(job, ctx):
    """``ulm.process`` that stops after its first block until it is cancelled."""
    from ultrasound_ai.jobs.registry import resolve_task

    return resolve_task("ulm.process")(job, support.PausingContext(ctx, _PAUSE_AT, "ULM job"))


def _paused_task_env() -> dict:
    return support.paused_task_env(_MODULE_DIR, _PAUSED_TARGET, PAUSED_TASK)


def cancel_scenario(acquisition_path, workdir, timeout_s: float = 180.0) -> None:
    """Cancel a ULM job mid-way: the job ends "cancelled", no result node appears in the scene, and no
    output, temporary or exported input file is left."""
    from UltrasoundAIULMLib.logic import UltrasoundAIULMLogic

    workdir = Path(workdir)
    logic = UltrasoundAIULMLogic(workdir=workdir)
    browser = logic.load_acquisition(acquisition_path)
    scene = browser.GetScene()
    before = _scene_node_ids(scene)
    parameters = _run_parameters(browser)
    launcher = logic.start(parameters, task=PAUSED_TASK, env=_paused_task_env())
    _check(len(_input_folders(workdir)) == 1, "the sequence was not exported for the job")
    support.wait_until_paused(launcher, timeout_s)

    support.cancel_paused(logic, launcher, parameters, timeout_s)
    _check(_scene_node_ids(scene) == before, "a cancelled job changed the scene")
    _check(_partials(workdir) == [], f"half-written files left after cancel: {_partials(workdir)}")
    _check(_input_folders(workdir) == [], f"exported inputs left after cancel: {_input_folders(workdir)}")
    outputs = sorted(p.name for p in workdir.iterdir())
    _check(outputs == [], f"files left after cancel: {outputs}")


# ---------------------------------------------------------------------------------------------------
# Bad input


def bad_input_scenario(workdir) -> None:
    """Clear errors, no job started and nothing created, for: a scalar (not two-component) sequence, an
    IQ sequence without a wavelength, an acquisition file without pixel size, a missing file, an unknown
    method, a bad number of bubbles per frame and no input at all."""
    import h5py

    from ultrasound_ai.mrml import complex_sequence, resolve_scene, volume_sequence_from_arrays
    from UltrasoundAIULMLib.logic import UltrasoundAIULMLogic

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    scene = resolve_scene(None)
    logic = UltrasoundAIULMLogic(workdir=workdir / "work")
    rng = np.random.default_rng(0)
    scalar = volume_sequence_from_arrays(rng.random((4, 1, 12, 16)).astype(np.float32), (0.2, 0.1, 0.2),
                                         (0.0, 0.0, 0.0), name="BModeFrames", scene=scene)
    iq = (rng.normal(size=(4, 12, 16)) + 1j * rng.normal(size=(4, 12, 16))).astype(np.complex64)
    no_wavelength = complex_sequence(iq, (0.1, 0.2), (3.0, -1.5), frame_rate_hz=1000.0, name="NoWavelength", scene=scene)
    before = _scene_node_ids(scene)

    _expect_input_error(lambda: logic.start({"inputSequence": scalar}), "BModeFrames", "scalar", "two-component")
    _expect_input_error(lambda: logic.start({"inputSequence": scalar.GetMasterSequenceNode()}), "scalar")
    _expect_input_error(lambda: logic.start({"inputSequence": no_wavelength}), "NoWavelength", "wavelength")

    no_pixel = workdir / "no-pixel-size.h5"
    with h5py.File(no_pixel, "w") as fh:
        fh.create_dataset("iq", data=iq)
        fh.attrs["origin_mm"] = [3.0, -1.5]
        fh.attrs["frame_rate_hz"] = 1000.0
        fh.attrs["wavelength_mm"] = 0.1
    _expect_input_error(lambda: logic.start({"inputAcquisitionFile": str(no_pixel)}), str(no_pixel), "pixel_size_mm")
    _expect_input_error(lambda: logic.load_acquisition(no_pixel), "pixel_size_mm")
    missing = workdir / "no-such-acquisition.h5"
    _expect_input_error(lambda: logic.start({"inputAcquisitionFile": str(missing)}), str(missing), "not found")
    _expect_input_error(lambda: logic.start({"inputSequence": no_wavelength, "method": "svm"}), "method", "svm", "rs")
    _expect_input_error(lambda: logic.start({"inputSequence": no_wavelength, "bubblesPerFrame": 0}), "bubblesPerFrame")
    _expect_input_error(lambda: logic.start({"inputSequence": no_wavelength, "linkDistance": -1}), "linkDistance")
    _expect_input_error(lambda: logic.start({"method": "rs"}), "inputSequence", "inputAcquisitionFile")
    _check(logic.launcher is None, "a job was started for bad input")
    _check(_scene_node_ids(scene) == before, "bad input changed the scene")
    left = sorted(p.name for p in (workdir / "work").rglob("*")) if (workdir / "work").exists() else []
    _check(left == [], f"bad input left files in the work folder: {left}")
