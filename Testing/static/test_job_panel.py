"""The panels' job loop (ultrasound_ai.mrml.job_panel) with a fake launcher and stand-in widgets: Apply
turns into Cancel, progress shows, an error is shown and the button comes back, Cancel restores the
panel, closing the scene during a job cancels it and loads nothing. No Qt needed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ultrasound_ai.core.errors import Cancelled, InputError
from ultrasound_ai.jobs.protocol import JobResult
from ultrasound_ai.mrml.job_panel import PROGRESS_STEPS, JobPanel, ParameterNodePanel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from slicer_standin import StandInTimer, StandInWidget  # noqa: E402 - Testing/ is not a package


class FakeLauncher:
    def __init__(self):
        self.events, self.done, self.result, self.cancelled = [], False, None, False

    def drain(self):
        out, self.events = self.events, []
        return out

    def finish(self, status="succeeded", exit_code=0, error=None, result=None):
        self.result = JobResult(status=status, exit_code=exit_code, error=error, result=result,
                                duration_s=1.5)
        self.done = True


class FakeLogic:
    def __init__(self, fail_start=None):
        self.fail_start, self.launcher, self.loaded, self.cleaned, self.cancels = fail_start, None, [], 0, 0

    def start(self, parameters):
        if self.fail_start:
            raise self.fail_start
        self.launcher = FakeLauncher()
        return self.launcher

    def cancel(self):
        self.cancels += 1
        self.launcher.cancelled = True

    def cleanup_inputs(self):
        self.cleaned += 1

    def load_results(self, result, parameters):
        self.loaded.append(parameters)
        if result.status == "cancelled":
            raise Cancelled("cancelled")
        if not result.ok:
            raise RuntimeError(f"job failed: {result.error}")
        return {"volume": "node"}


class Panel:
    def __init__(self, logic=None, ready=True):
        self.logic = logic or FakeLogic()
        self.timer = StandInTimer()
        self.button, self.bar, self.status, self.model = (StandInWidget() for _ in range(4))
        self.path = StandInWidget(currentPath=".")
        self.errors, self.results, self.updates = [], [], []
        self.jobs = JobPanel(self.logic, self.timer, self.button, self.bar, self.status, title="reconstruction",
                             parameters=lambda: {"method": "imu"}, ready=lambda: ready,
                             on_results=lambda nodes, s: self.results.append((nodes, s)),
                             error_display=self.errors.append, on_update=self.updates.append,
                             model_label=self.model, model_line=lambda: "fima_small: trained on simulated sweeps",
                             path_boxes=(self.path,))
        self.button.connect("clicked(bool)", self.jobs.apply)
        self.jobs.update()


def test_apply_becomes_cancel_progress_shows_and_results_come_back():
    p = Panel()
    assert (p.button.text, p.button.enabled, p.bar.visible) == ("Apply", True, False)
    assert p.timer.slots == [p.jobs.poll] and p.timer.interval == JobPanel.POLL_MS
    p.button.click()
    launcher = p.logic.launcher
    assert (p.button.text, p.button.enabled, p.timer.active, p.bar.visible) == ("Cancel", True, True, True)
    assert p.updates[-1] is True  # the Widget's other buttons are told a job runs
    launcher.events += [{"event": "progress", "fraction": 0.25, "message": "compounding"}]
    p.timer.fire()
    assert p.bar.value == PROGRESS_STEPS // 4 and p.status.text == "compounding" and p.button.text == "Cancel"
    launcher.finish(result={"n_frames": 10})
    p.timer.fire()
    assert p.results == [({"volume": "node"}, 1.5)] and p.logic.loaded == [{"method": "imu"}]
    assert (p.button.text, p.button.enabled, p.timer.active, p.bar.visible) == ("Apply", True, False, False)


def test_error_event_is_shown_and_the_button_comes_back():
    p = Panel()
    p.button.click()
    p.logic.launcher.events.append({"event": "error", "message": "sweep.h5: no frames"})
    p.timer.fire()
    assert p.status.text == "Error: sweep.h5: no frames" and p.button.text == "Cancel"
    p.logic.launcher.finish(status="failed", exit_code=2, error="sweep.h5: no frames")
    p.timer.fire()
    assert p.errors == ["The reconstruction failed: job failed: sweep.h5: no frames"] and p.status.text == "Failed."
    assert (p.button.text, p.button.enabled, p.bar.visible, p.timer.active) == ("Apply", True, False, False)
    assert p.results == []


def test_bad_input_at_start_is_shown_and_no_job_runs():
    p = Panel(FakeLogic(fail_start=InputError("inputBrowser: has no frames")))
    p.button.click()
    assert p.errors == ["Failed to start the reconstruction: inputBrowser: has no frames"]
    assert (p.button.text, p.timer.active, p.bar.visible, p.status.text) == ("Apply", False, False, "")


def test_cancel_restores_the_panel():
    p = Panel()
    p.button.click()
    p.button.click()  # the button reads Cancel
    assert p.logic.cancels == 1 and p.status.text == "Cancelling..." and p.button.enabled is False
    p.logic.launcher.finish(status="cancelled", exit_code=3)
    p.timer.fire()
    assert p.status.text == "Cancelled; nothing was changed." and p.errors == [] and p.results == []
    assert (p.button.text, p.button.enabled, p.bar.visible, p.timer.active) == ("Apply", True, False, False)


@pytest.mark.parametrize("status", ["succeeded", "cancelled"])
def test_closing_the_scene_during_a_job_cancels_it_and_loads_nothing(status):
    p = Panel()
    p.button.click()
    p.jobs.scene_closing()
    assert p.logic.cancels == 1 and "scene" in p.status.text
    # Even a job that finished in the meantime must not put its nodes into the new scene.
    p.logic.launcher.finish(status=status, exit_code=0 if status == "succeeded" else 3)
    p.timer.fire()
    assert p.logic.loaded == [] and p.results == [] and p.logic.cleaned == 1
    assert p.status.text == "Cancelled: the scene was closed." and p.button.text == "Apply"
    p.jobs.scene_closing()  # nothing running: nothing to cancel
    assert p.logic.cancels == 1


def test_module_cleanup_cancels_a_running_job():
    p = Panel()
    p.button.click()
    p.jobs.cleanup()
    assert p.logic.cancels == 1 and p.timer.active is False


def test_not_ready_panel_explains_why_and_shows_the_model_line():
    p = Panel(ready=False)
    assert p.button.enabled is False and p.button.toolTip == "Select the inputs first."
    assert p.model.text == "fima_small: trained on simulated sweeps" == p.model.toolTip
    assert p.path.currentPath == ""  # an empty Path field reads "."; the box shows it empty


def test_parameter_node_panel_runs_its_hook_after_the_binding():
    """connectGui refills Choice comboboxes (Slicer's connector clears them): whatever the Widget sets on
    them (ULM's method tooltips) must be set after it, by onParameterNodeSet."""

    class Wrapper:
        def __init__(self, log):
            self.log = log

        def connectGui(self, ui):
            self.log.append("connectGui")
            return "tag"

        def disconnectGui(self, tag):
            self.log.append(f"disconnectGui {tag}")

    class Widget(ParameterNodePanel):
        def __init__(self):
            self.log, self.observed = [], []
            self.ui = StandInWidget()
            self.jobs = Panel().jobs

        def addObserver(self, obj, event, callback):
            self.observed.append(callback)

        def removeObserver(self, obj, event, callback):
            self.observed.remove(callback)

        def onParameterNodeSet(self):
            self.log.append("onParameterNodeSet")

    w = Widget()
    w.setParameterNode(Wrapper(w.log))
    assert w.log == ["connectGui", "onParameterNodeSet"] and w.observed == [w.jobs.update]
    w.exit()
    assert w.log[-1] == "disconnectGui tag" and w.observed == []
