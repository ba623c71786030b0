"""The training harness: config files, CSV log, card, resume equivalence, cancellation, DDP on CPU."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from toy_training_task import ToyRegressionTask, mean_predictor_mse

from ultrasound_ai.core.atomic import is_partial
from ultrasound_ai.core.errors import Cancelled, InputError
from ultrasound_ai.core.training import (
    TrainConfig,
    add_training_arguments,
    config_from_args,
    load_config,
    lr_factor,
    step_generator,
    torchrun_command,
    train,
)
from ultrasound_ai.models.checkpoint import load_checkpoint, sha256_file

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def toy_config(output_dir, **schedule) -> TrainConfig:
    sched = {
        "steps": 20,
        "batch_size": 16,
        "optimizer": "adam",
        "lr": 0.05,
        "log_every": 5,
        "validate_every": 10,
        "checkpoint_every": 5,
    }
    sched.update(schedule)
    return load_config({"method": "toy", "name": "toy-linear", "output_dir": str(output_dir), "seed": 3, "device": "cpu", "schedule": sched})


def read_log(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def final_weights(folder) -> dict:
    return torch.load(Path(folder) / "final.pt", weights_only=True)


def assert_same_weights(a: dict, b: dict, atol=1e-7):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=atol), (k, (a[k] - b[k]).abs().max())


# ------------------------------------------------------------------------------------------- config

RAW = {
    "method": "toy",
    "output_dir": "runs/toy",
    "seed": 7,
    "data": {"source": "simulate", "frames": 4},
    "model": {"hidden": 8},
    "schedule": {"steps": 30, "lr": 0.01, "lr_schedule": "cosine", "warmup_steps": 5},
}


def test_yaml_and_json_configs_load_alike(tmp_path):
    import yaml

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(RAW))
    (tmp_path / "c.json").write_text(json.dumps(RAW))
    a, b = load_config(tmp_path / "c.yaml"), load_config(str(tmp_path / "c.json"))
    assert a == b
    assert a.seed == 7 and a.model == {"hidden": 8} and a.data["source"] == "simulate"
    assert a.schedule["steps"] == 30 and a.schedule["lr_schedule"] == "cosine"
    assert a.schedule["batch_size"] == 8  # default filled in
    assert a.model_name == "toy"
    # the resolved dict loads back to the same config
    assert load_config(a.to_dict()) == a
    # dotted and nested overrides
    c = load_config(tmp_path / "c.yaml", {"schedule.steps": 50, "seed": 1, "model": {"dropout": 0.1}})
    assert c.schedule["steps"] == 50 and c.schedule["lr"] == 0.01 and c.seed == 1
    assert c.model == {"hidden": 8, "dropout": 0.1}


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(InputError, match="unknown top-level key.*'epochs'"):
        load_config({**RAW, "epochs": 3})
    with pytest.raises(InputError, match=r"schedule.*unknown key.*'lr_shedule'"):
        load_config({**RAW, "schedule": {"lr_shedule": "cosine"}})
    with pytest.raises(InputError, match="not_there.yaml.*not found"):
        load_config(tmp_path / "not_there.yaml")
    with pytest.raises(InputError, match="missing required key 'output_dir'"):
        load_config({"method": "toy"})
    with pytest.raises(InputError, match="schedule.steps"):
        load_config({**RAW, "schedule": {"steps": 0}})
    with pytest.raises(InputError, match="schedule.optimizer"):
        load_config({**RAW, "schedule": {"optimizer": "lion"}})
    with pytest.raises(InputError, match="schedule.lr"):
        load_config({**RAW, "schedule": {"lr": float("nan")}})
    (tmp_path / "bad.yaml").write_text("method: [unclosed\n")
    with pytest.raises(InputError, match="bad.yaml.*cannot parse"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="mapping"):
        load_config(tmp_path / "list.json")
    (tmp_path / "c.toml").write_text("x = 1")
    with pytest.raises(InputError, match="unsupported extension"):
        load_config(tmp_path / "c.toml")


def test_cli_arguments_override_defaults_and_file(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"schedule": {"lr": 0.5}, "model": {"hidden": 4}}))
    parser = argparse.ArgumentParser()
    add_training_arguments(parser)
    defaults = {"method": "toy", "output_dir": "default-out", "schedule": {"steps": 100, "lr": 0.1}}
    args = parser.parse_args(["--config", str(tmp_path / "c.json"), "--output", "o", "--steps", "9", "--seed", "4", "--no-resume"])
    cfg = config_from_args(args, defaults)
    assert (cfg.output_dir, cfg.schedule["steps"], cfg.schedule["lr"], cfg.seed) == ("o", 9, 0.5, 4)
    assert cfg.model == {"hidden": 4} and args.resume is False
    args = parser.parse_args([])
    cfg = config_from_args(args, defaults)
    assert (cfg.output_dir, cfg.schedule["steps"], cfg.device) == ("default-out", 100, "auto") and args.resume is True


def test_lr_schedules_known_values():
    s = load_config({**RAW, "schedule": {"steps": 10, "lr_schedule": "step", "step_size": 4, "gamma": 0.5}}).schedule
    assert [lr_factor(s, i) for i in (0, 3, 4, 8, 9)] == [1.0, 1.0, 0.5, 0.25, 0.25]
    s = load_config({**RAW, "schedule": {"steps": 12, "lr_schedule": "cosine", "warmup_steps": 2, "min_lr_ratio": 0.1}}).schedule
    assert lr_factor(s, 0) == pytest.approx(0.5) and lr_factor(s, 1) == pytest.approx(1.0)
    assert lr_factor(s, 2) == pytest.approx(1.0)  # first step after the warm-up: top of the cosine
    assert lr_factor(s, 7) == pytest.approx(0.1 + 0.9 * 0.5)  # half way
    assert lr_factor(s, 12) == pytest.approx(0.1)


def test_step_generator_depends_on_seed_rank_step_only():
    draw = lambda *a: torch.randn(3, generator=step_generator(*a))  # noqa: E731
    assert torch.equal(draw(1, 0, 5), draw(1, 0, 5))
    assert not torch.equal(draw(1, 0, 5), draw(1, 1, 5))
    assert not torch.equal(draw(1, 0, 5), draw(1, 0, 6))
    assert not torch.equal(draw(1, 0, 5), draw(2, 0, 5))


# -------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def fresh_run(tmp_path_factory):
    """An uninterrupted 20-step run; the reference for resume, cancel and DDP comparisons."""
    out = tmp_path_factory.mktemp("fresh")
    progress = []
    result = train(toy_config(out), ToyRegressionTask(), progress=lambda f, m: progress.append((f, m)))
    return out, result, progress


def test_run_writes_log_config_and_card(fresh_run):
    out, result, progress = fresh_run
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["best.card.json", "best.pt", "config.json", "final.card.json", "final.pt", "last.pt", "log.csv"]
    )
    rows = read_log(out / "log.csv")
    assert list(rows[0]) == ["step", "elapsed_s", "lr", "loss", "mae", "val_mse", "val_mae"]
    assert [int(r["step"]) for r in rows] == [0, 5, 10, 15, 20]
    assert rows[0]["loss"] == "" and rows[5 // 5]["val_mse"] == ""  # baseline has no loss; step 5 no validation
    assert float(rows[-1]["loss"]) < 0.5 * float(rows[1]["loss"])
    assert float(rows[-1]["val_mse"]) < float(rows[0]["val_mse"])
    assert float(rows[1]["lr"]) == 0.05
    # the model learnt something a constant predictor cannot reach
    assert result.metrics["mse"] < 0.5 * mean_predictor_mse()
    assert result.metrics["mse"] == pytest.approx(float(rows[-1]["val_mse"]))

    assert json.loads((out / "config.json").read_text()) == toy_config(out).to_dict()
    card = json.loads((out / "final.card.json").read_text())
    assert card == result.card
    assert card["sha256"] == sha256_file(out / "final.pt")
    assert card["name"] == "toy-linear" and card["method"] == "toy"
    assert card["input"] == {"features": 4, "normalisation": "none"}
    t = card["training"]
    assert (t["seed"], t["steps"], t["world_size"], t["best_metric"]) == (3, 20, 1, "mse")
    assert t["final_metrics"] == result.metrics and t["config"]["schedule"]["steps"] == 20
    assert t["validation_seed"] == 12345  # the task's own training facts are kept
    assert t["wall_time_s"] > 0
    state, loaded_card = load_checkpoint(out / "final.pt")
    assert loaded_card["sha256"] == card["sha256"]
    assert_same_weights(state, final_weights(out), atol=0)
    assert result.best_path == out / "best.pt" and result.best_step == 20
    assert json.loads((out / "best.card.json").read_text())["metrics"]["mse"] == result.best_metrics["mse"]

    last = torch.load(out / "last.pt", weights_only=True)
    assert last["step"] == 20 and "optimizer" in last and "torch" in last["rng"]
    assert progress[-1] == (1.0, "step 20/20") and progress[0][0] == 0.0
    assert not any(is_partial(p) for p in out.iterdir())


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    # MLP with dropout and a step lr schedule: RNG use inside steps and lr state must survive the resume.
    def cfg(steps):
        c = toy_config(tmp_path / "r", steps=steps, lr_schedule="step", step_size=6, gamma=0.5, validate_every=4)
        c.model = {"hidden": 8, "dropout": 0.2}
        return c

    a = cfg(20)
    a.output_dir = str(tmp_path / "a")
    train(a, ToyRegressionTask())
    first = train(cfg(10), ToyRegressionTask())
    assert first.steps == 10
    task = ToyRegressionTask()
    second = train(cfg(20), task)
    assert second.steps == 20
    assert task.steps_drawn == list(range(10, 20))  # it really continued from step 10
    assert_same_weights(final_weights(tmp_path / "r"), final_weights(tmp_path / "a"))
    ra, rb = read_log(tmp_path / "a" / "log.csv"), read_log(tmp_path / "r" / "log.csv")
    assert [r["step"] for r in rb] == [r["step"] for r in ra]  # each step once, header once
    assert [r["loss"] for r in rb] == [r["loss"] for r in ra]

    # a different config cannot resume into this folder; fewer steps than done neither
    bad = cfg(20)
    bad.schedule["lr"] = 0.01
    with pytest.raises(InputError, match=r"schedule\.lr: 0\.05 -> 0\.01"):
        train(bad, ToyRegressionTask())
    with pytest.raises(InputError, match="already done 20 steps"):
        train(cfg(15), ToyRegressionTask())
    # --no-resume starts afresh in the same folder
    with pytest.raises(Cancelled):
        train(cfg(5), ToyRegressionTask(), resume=False, cancel_check=lambda: (_ for _ in ()).throw(Cancelled()))
    assert not (tmp_path / "r" / "final.pt").exists()  # the old run's weights are gone with it
    assert torch.load(tmp_path / "r" / "last.pt", weights_only=True)["step"] == 0
    again = train(cfg(5), ToyRegressionTask(), resume=False)
    assert again.steps == 5
    assert [int(r["step"]) for r in read_log(tmp_path / "r" / "log.csv")] == [0, 4, 5]


def test_cancel_leaves_a_resumable_state(tmp_path, fresh_run):
    out = tmp_path / "c"
    calls = {"n": 0}

    def cancel_at_7():
        calls["n"] += 1
        if calls["n"] == 8:  # called before each step: the 8th call comes after 7 steps
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        train(toy_config(out), ToyRegressionTask(), cancel_check=cancel_at_7)
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["step"] == 7
    assert not (out / "final.pt").exists()
    assert not any(is_partial(p) for p in out.iterdir())
    assert [int(r["step"]) for r in read_log(out / "log.csv")] == [0, 5]
    task = ToyRegressionTask()
    train(toy_config(out), task)
    assert task.steps_drawn == list(range(7, 20))
    assert_same_weights(final_weights(out), final_weights(fresh_run[0]))
    assert [int(r["step"]) for r in read_log(out / "log.csv")] == [0, 5, 10, 15, 20]


def test_cosine_resume_after_cancel_and_crash_between_checkpoints(tmp_path):
    # Cosine depends on the total steps, so resume by cancelling (same total); checkpoint_every=4 and a
    # cancel after step 6 means the log has rows past the last periodic checkpoint... which the cancel
    # checkpoint covers; a truncated log row from a crash is dropped on resume.
    kw = dict(steps=12, lr_schedule="cosine", warmup_steps=3, optimizer="adamw", weight_decay=0.01, grad_clip=0.5,
              log_every=2, checkpoint_every=4)
    ref = train(toy_config(tmp_path / "ref", **kw), ToyRegressionTask())
    out = tmp_path / "x"
    n = {"calls": 0}

    def cancel():
        n["calls"] += 1
        if n["calls"] == 7:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        train(toy_config(out, **kw), ToyRegressionTask(), cancel_check=cancel)
    # simulate a crash: rows beyond the saved step (as if logged after the last checkpoint)
    with open(out / "log.csv", "a", newline="") as fh:
        fh.write("8,0.1,0.05,9.9,9.9,,\n")
    task = ToyRegressionTask()
    train(toy_config(out, **kw), task)
    assert task.steps_drawn[0] == 6
    assert_same_weights(final_weights(out), final_weights(ref.output_dir))
    steps = [int(r["step"]) for r in read_log(out / "log.csv")]
    assert steps == [0, 2, 4, 6, 8, 10, 12]
    assert float(read_log(out / "log.csv")[4]["loss"]) != 9.9


# ------------------------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_on_cpu_match_single_process(tmp_path):
    # SGD on the toy task whose ranks take the halves of one global batch: averaged gradients equal
    # the full-batch gradient, so the DDP weights must equal the single-process weights.
    kw = dict(optimizer="sgd", lr=0.1, momentum=0.5, steps=12, log_every=3, validate_every=6, checkpoint_every=6)
    single = train(toy_config(tmp_path / "single", **kw), ToyRegressionTask())
    cfg = toy_config(tmp_path / "ddp", **kw)
    cfg_path = tmp_path / "ddp.json"
    cfg_path.write_text(json.dumps(cfg.to_dict()))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE), str(REPO)]))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = torchrun_command(cfg_path, "toy_training_task:ToyRegressionTask", 2, master_port=_free_port())
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_log(tmp_path / "ddp" / "log.csv")
    assert [int(r["step"]) for r in rows] == [0, 3, 6, 9, 12]  # each step once: only rank 0 writes
    assert float(rows[-1]["loss"]) < 0.5 * float(rows[1]["loss"])
    card = json.loads((tmp_path / "ddp" / "final.card.json").read_text())
    assert card["training"]["world_size"] == 2
    assert_same_weights(final_weights(tmp_path / "ddp"), final_weights(single.output_dir), atol=1e-6)
    # and it is not trivially equal: one process on half the batch ends elsewhere
    half = toy_config(tmp_path / "half", **kw)
    half.schedule["batch_size"] = 8
    train(half, ToyRegressionTask())
    w_half, w_ddp = final_weights(tmp_path / "half"), final_weights(tmp_path / "ddp")
    assert not torch.allclose(w_half["weight"], w_ddp["weight"], atol=1e-4)
    assert math.isfinite(float(rows[-1]["val_mse"]))


def test_entry_point_reports_bad_task_with_exit_code_2(tmp_path):
    from ultrasound_ai.core.training import main

    cfg_path = tmp_path / "c.json"
    cfg_path.write_text(json.dumps({"method": "toy", "output_dir": str(tmp_path / "o")}))
    assert main([str(cfg_path), "--task", "no_such_module_xyz:Task"]) == 2
    assert main([str(cfg_path), "--task", "toy_training_task"]) == 2
    assert main([str(tmp_path / "missing.json"), "--task", "toy_training_task:ToyRegressionTask"]) == 2
    assert not (tmp_path / "o").exists()


@pytest.mark.gpu
def test_cuda_training_matches_cpu(tmp_path, fresh_run):
    cfg = toy_config(tmp_path / "cuda")
    cfg.device = "cuda"
    result = train(cfg, ToyRegressionTask())
    assert result.card["training"]["device"].startswith("cuda")
    # same data and initial weights; only the kernels' rounding differs
    assert_same_weights(final_weights(tmp_path / "cuda"), final_weights(fresh_run[0]), atol=1e-3)
