import json
import sys
import types

import numpy as np
import pytest

from ultrasound_ai.cli import main
from ultrasound_ai.core.atomic import is_partial
from ultrasound_ai.core.geometry import params_to_matrix
from ultrasound_ai.io.volume import Volume, write_volume
from ultrasound_ai.registration.case import read_case, read_transform_tfm, write_transform_tfm
from ultrasound_ai.registration.metrics import perturbation_with_sre, sre, tre


def _no_partials(folder):
    return not [p for p in folder.rglob("*") if is_partial(p)]


def test_simulate_writes_cases(tmp_path):
    assert main(["registration", "simulate", str(tmp_path / "sim"), "--cases", "2", "--seed", "40", "--small",
                 "--quiet"]) == 0
    names = sorted(p.name for p in (tmp_path / "sim").iterdir())
    assert names == ["sim_00040", "sim_00041"]
    case = read_case(tmp_path / "sim" / "sim_00041")
    assert case.attrs["seed"] == 41 and case.truth_fixed_to_moving is not None
    assert _no_partials(tmp_path)


def test_register_mi_and_evaluate(tmp_path, small_case_dir, small_case, capsys):
    T_true = small_case.truth_fixed_to_moving
    T0 = perturbation_with_sre(T_true, 4.0, small_case.surface_fixed, np.random.default_rng(0))
    init = write_transform_tfm(T0, tmp_path / "T0.tfm")
    out, js = tmp_path / "out" / "T.tfm", tmp_path / "out" / "T.json"
    code = main(["registration", "register", "--case", str(small_case_dir), "--initial", str(init), "--method", "mi",
                 "--out", str(out), "--json", str(js), "--quiet"])
    assert code == 0
    T = read_transform_tfm(out)
    doc = json.loads(js.read_text())
    assert doc["method"] == "mi" and np.allclose(doc["fixed_to_moving_lps"], T, atol=1e-9)
    assert set(doc) >= {"moving_to_fixed_ras", "fixed_to_moving_lps", "method", "runtime_s"}
    capsys.readouterr()
    assert main(["registration", "evaluate", str(out), "--case", str(small_case_dir), "--initial", str(init)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["sre_mm"] == pytest.approx(sre(T, T_true, small_case.surface_fixed))
    assert res["initial_sre_mm"] == pytest.approx(4.0, abs=1e-6)
    assert res["tre_mm"] == pytest.approx(tre(T, T_true, small_case.landmarks_fixed, small_case.landmarks_moving))
    assert _no_partials(tmp_path)


@pytest.mark.parametrize("method", ["attention", "attention+refine"])
def test_register_attention_passes_arguments(tmp_path, small_case_dir, small_case, monkeypatch, method):
    calls = {}

    def fake_report(data, initial=None, checkpoints=None, mode="label", device="auto", guard=True, refine=False,
                    progress=None):
        calls.update(initial=initial, checkpoints=checkpoints, mode=mode, device=device, name=data.name,
                     guard=guard, refine=refine)
        progress(0.5, "half")
        report = {"kept": "stage 2", "stages": [{"stage": "stage 1", "kept": True}], "load_s": 2.5, "runtime_s": 0.25}
        return small_case.truth_fixed_to_moving, report

    fake = types.ModuleType("ultrasound_ai.registration.inference")
    fake.register_attention_report = fake_report
    monkeypatch.setitem(sys.modules, "ultrasound_ai.registration.inference", fake)
    out, js = tmp_path / "A.tfm", tmp_path / "A.json"
    assert main(["registration", "register", "--case", str(small_case_dir), "--method", method, "--mode", "image",
                 "--checkpoints", "s1.pt", "s2.pt", "--device", "cpu", "--out", str(out), "--json", str(js),
                 "--quiet"]) == 0
    assert calls == dict(initial=None, checkpoints=("s1.pt", "s2.pt"), mode="image", device="cpu",
                         name=small_case.name, guard=True, refine=method == "attention+refine")
    assert np.allclose(read_transform_tfm(out), small_case.truth_fixed_to_moving)
    doc = json.loads(js.read_text())
    # runtime_s is the registration alone; loading (imports, models) is reported beside it.
    assert doc["runtime_s"] == 0.25 and doc["load_s"] >= 2.5 and doc["method"] == method
    assert doc["cascade"]["kept"] == "stage 2" and "load_s" not in doc["cascade"]


def test_train_builds_config(monkeypatch, tmp_path):
    seen = {}

    def fake_train(cfg, progress=None, cancel_check=None, *, resume=True, progress_bar=None, **kw):
        seen.update(cfg=cfg, resume=resume)
        return types.SimpleNamespace(steps=cfg.schedule["steps"], output_dir=cfg.output_dir)

    fake = types.ModuleType("ultrasound_ai.registration.training")
    fake.DEFAULT_CONFIG = {"method": "attention_reg", "output_dir": str(tmp_path / "run"), "schedule": {"steps": 50}}
    fake.train_attention_reg = fake_train
    monkeypatch.setitem(sys.modules, "ultrasound_ai.registration.training", fake)
    assert main(["registration", "train", "--steps", "7", "--device", "cpu", "--no-resume", "--quiet"]) == 0
    assert seen["cfg"].schedule["steps"] == 7 and seen["cfg"].device == "cpu" and seen["resume"] is False


@pytest.fixture(scope="module")
def volume_files(tmp_path_factory, small_case):
    d = tmp_path_factory.mktemp("vols")
    c = small_case
    write_volume(c.fixed, d / "mr.nrrd")
    write_volume(c.fixed_label, d / "label.nrrd")
    write_volume(c.moving, d / "us.nrrd")
    write_volume(c.fixed_label.with_array(np.zeros_like(c.fixed_label.array)), d / "empty.nrrd")
    shifted = Volume(c.fixed_label.array, c.fixed_label.spacing_xyz, c.fixed_label.origin_lps + 5, np.eye(3))
    write_volume(shifted, d / "offgrid.nrrd")
    write_volume(Volume(np.zeros((1, 40, 40), np.float32), (1, 1, 1), (0, 0, 0), np.eye(3)), d / "flat.nrrd")
    write_transform_tfm(params_to_matrix([0, 0, 500.0, 0, 0, 0]), d / "far.tfm")
    return d


@pytest.mark.parametrize("case, message", [
    (dict(label="empty.nrrd"), "empty"),
    (dict(label="offgrid.nrrd"), "same grid"),
    (dict(moving="flat.nrrd"), "2D"),
    (dict(initial="far.tfm"), "do not overlap"),
    (dict(label="missing.nrrd"), "not found"),
])
def test_register_bad_inputs_exit_2(volume_files, tmp_path, capsys, case, message):
    d = volume_files
    args = ["registration", "register", "--fixed", str(d / case.get("fixed", "mr.nrrd")),
            "--moving", str(d / case.get("moving", "us.nrrd")), "--fixed-label", str(d / case.get("label", "label.nrrd")),
            "--method", "mi", "--out", str(tmp_path / "T.tfm"), "--quiet"]
    if "initial" in case:
        args += ["--initial", str(d / case["initial"])]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_evaluate_without_reference_is_bad_input(tmp_path, small_case, capsys):
    import dataclasses

    from ultrasound_ai.registration.case import write_case

    bare = dataclasses.replace(small_case, truth_fixed_to_moving=None, landmarks_fixed=None, landmarks_moving=None)
    d = write_case(bare, tmp_path / "bare")
    t = write_transform_tfm(np.eye(4), tmp_path / "I.tfm")
    assert main(["registration", "evaluate", str(t), "--case", str(d)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
