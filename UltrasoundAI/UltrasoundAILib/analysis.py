"""UltrasoundAI Analysis Logic: segment or classify an ultrasound image with a foundation (USFM) model.

Imports ``slicer`` and the engine, never ``qt``: it runs inside the Slicer application and, for the
tests, with the slicer-core wheel.

    logic = UltrasoundAIAnalysisLogic()
    nodes = logic.run({"analysisInput": volume_node, "analysisTask": "segment"})   # blocking
    launcher = logic.start(parameters)                                             # the panel's Apply

Parameters (a dict or the Widget's parameter node wrapper): analysisInput (a scalar or vector (RGB)
volume node: a 2D image, a multi-frame image (cine) or a reconstructed 3D volume), analysisTask
("segment" | "classify"), analysisFrames ("all" | "current"), analysisFrame (0-based frame index used
with "current"), analysisModel (an installed model name or a .pt; empty = the installed default for the
task), analysisInputKind ("auto" | "cine" | "volume": what the third axis is; auto = time for a
multi-frame DICOM or RGB volume, space otherwise), device.

Pixel size. A node loaded from ultrasound DICOM (attribute ``DICOM.instanceUIDs``) has 1 mm pixels as
ITK reports them; the physical size and the image rectangle come from the file's ultrasound regions
(ultrasound_ai.mrml.foundation_nodes.dicom_image_region, the file found in the DICOM database, or by
`find_dicom_file(uid)` when set). Any other node's spacing is taken as physical. A DICOM node without
regions runs with a warning (the whole image resized to the model's input).

Results, named after the input and the task (a new run replaces them):
  "<input>-segment-Segmentation"  vtkMRMLSegmentationNode, segments named by the model's labels, shown
                                  in the slice views; with a closed surface (3D) for a spatial volume.
                                  A cine with all frames: a sequence of segmentations, one per frame
                                  ("<input>-segment-Segmentation frames" + a browser), never one
                                  surface through time.
  "<input>-<task>-Table"           vtkMRMLTableNode: per frame the class probabilities and the predicted
                                  class (classify) or the fraction of pixels of each label (segment).
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from typing import Any, Callable

import slicer

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.mrml.module_logic import (
    ModuleLogic,
    model_card_line,
    parameters_from,
    remove_with_helpers,
    safe_name,
)

log = logging.getLogger(__name__)

TASKS = ("segment", "classify")
FRAMES = ("all", "current")
INPUT_KINDS = ("auto", "cine", "volume")
OUTPUT_ATTRIBUTE = "UltrasoundAI.AnalysisOutput"
SOURCE_ATTRIBUTE = "UltrasoundAI.AnalysisInput"  # the input node's ID on every result node


@dataclass
class AnalysisParameters:
    """The Analysis section's view of the panel."""

    analysisInput: Any = None
    analysisTask: str = "segment"
    analysisFrames: str = "all"
    analysisFrame: int = 0
    analysisModel: str = ""
    analysisInputKind: str = "auto"
    device: str = "auto"

    @classmethod
    def from_any(cls, parameters) -> "AnalysisParameters":
        if isinstance(parameters, cls):
            return parameters
        out = parameters_from(cls, parameters, "analysisInput")
        out.analysisTask = str(out.analysisTask or "").strip().lower()
        out.analysisFrames = str(out.analysisFrames or "all").strip().lower()
        out.analysisInputKind = str(out.analysisInputKind or "auto").strip().lower()
        out.analysisModel = str(out.analysisModel or "").strip()
        out.device = str(out.device or "auto").strip().lower()
        for name, allowed in (("analysisTask", TASKS), ("analysisFrames", FRAMES), ("analysisInputKind", INPUT_KINDS)):
            if getattr(out, name) not in allowed:
                raise InputError(f"{name}: expected one of {', '.join(allowed)}, got {getattr(out, name)!r}")
        try:
            out.analysisFrame = int(out.analysisFrame)
        except (TypeError, ValueError):
            raise InputError(f"analysisFrame: expected a frame index, got {out.analysisFrame!r}") from None
        if out.analysisInput is None:
            raise InputError("analysisInput: select the image to analyse (a volume node)")
        if not isinstance(out.analysisInput, slicer.vtkMRMLScalarVolumeNode) or isinstance(
                out.analysisInput, slicer.vtkMRMLLabelMapVolumeNode):
            raise InputError(f"analysisInput: expected a scalar or RGB volume node, got "
                             f"{type(out.analysisInput).__name__}")
        return out


def frame_count(node) -> int:
    image = node.GetImageData()
    return int(image.GetDimensions()[2]) if image is not None else 0


def third_axis_is_time(node, kind: str) -> bool:
    """Whether a multi-frame node is a cine (frames in time) rather than a spatial volume."""
    if kind != "auto":
        return kind == "cine"
    from ultrasound_ai.mrml.foundation_nodes import DICOM_UIDS_ATTRIBUTE

    return bool(node.GetAttribute(DICOM_UIDS_ATTRIBUTE)) or isinstance(node, slicer.vtkMRMLVectorVolumeNode)


class UltrasoundAIAnalysisLogic(ModuleLogic):
    """Processing behind the UltrasoundAI panel's Analysis section."""

    TASK_NAME = "foundation.segment"  # make_job picks foundation.segment or foundation.classify
    TITLE = "analysis"
    Parameters = AnalysisParameters
    OUTPUT_ATTRIBUTE = OUTPUT_ATTRIBUTE

    def __init__(self, *args, find_dicom_file: Callable[[str], str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        # uid -> DICOM file; None = Slicer's DICOM database.
        self.find_dicom_file = find_dicom_file
        self.last_notes: list[str] = []

    # -- the panel -----------------------------------------------------------------------------------
    @staticmethod
    def installed_models(task: str) -> list[str]:
        """Names of the installed foundation models that do `task`, the default first."""
        from ultrasound_ai.models.registry import list_models

        entries = [e for e in list_models("usfm") if (e.card.get("configuration") or {}).get("task") == task]
        return [e.name for e in sorted(entries, key=lambda e: not e.is_default)]

    def analysis_model_line(self, task: str, model: str = "") -> str:
        """The selected model's "trained on ..." line, shown beside the model selector."""
        if not model:
            names = self.installed_models(task)
            if not names:
                return f"No installed foundation model does {task}."
            model = names[0]
        return model_card_line(None, model)

    # -- inputs --------------------------------------------------------------------------------------
    def pixel_facts(self, node) -> dict:
        """{"pixel_spacing_mm", "region"} of the job for `node` (see the module docstring)."""
        from ultrasound_ai.mrml.foundation_nodes import DICOM_UIDS_ATTRIBUTE, dicom_image_region

        if not node.GetAttribute(DICOM_UIDS_ATTRIBUTE):
            return {"pixel_spacing_mm": "file", "region": None}
        region = dicom_image_region(node, self.find_dicom_file)
        if region is None:
            return {"pixel_spacing_mm": None, "region": None}
        return {"pixel_spacing_mm": list(region.pixel_spacing_mm), "region": list(region.bounds)}

    def make_job(self, params: AnalysisParameters) -> dict:
        from ultrasound_ai.io.volume import write_volume
        from ultrasound_ai.mrml.volumes import node_to_volume

        node = params.analysisInput
        n = frame_count(node)
        if n < 1:
            raise InputError(f"analysisInput {node.GetName()!r}: the volume node has no image data")
        frame = None
        if params.analysisFrames == "current" and n > 1:
            if not 0 <= params.analysisFrame < n:
                raise InputError(f"analysisFrame: {params.analysisFrame} is not a frame of {node.GetName()!r} "
                                 f"(0..{n - 1})")
            frame = params.analysisFrame
        model = params.analysisModel
        if not model:
            names = self.installed_models(params.analysisTask)
            if not names:
                raise InputError(f"analysisModel: no installed foundation model does {params.analysisTask}")
            model = names[0]
        facts = self.pixel_facts(node)
        stem = safe_name(node.GetName(), "Image")
        folder = self.new_inputs_folder()
        image_path = write_volume(node_to_volume(node), folder / f"{stem}.nrrd")
        out = self.workdir / f"{stem}-{params.analysisTask}"
        outputs = {"table": str(out) + "-table.csv"}
        if params.analysisTask == "segment":
            outputs["labels"] = str(out) + "-labels.nrrd"
        return {"task": f"foundation.{params.analysisTask}", "inputs": {"image": str(image_path)}, "outputs": outputs,
                "parameters": {"model": model, "frame": frame, **facts}, "device": params.device}

    # -- results -------------------------------------------------------------------------------------
    def _replace(self, scene, name: str, kind: str) -> None:
        for class_name in ("vtkMRMLSegmentationNode", "vtkMRMLTableNode", "vtkMRMLSequenceNode",
                           "vtkMRMLSequenceBrowserNode"):
            for old in list(scene.GetNodesByClass(class_name)):
                if old.GetAttribute(OUTPUT_ATTRIBUTE) == kind and old.GetName().startswith(name):
                    if class_name == "vtkMRMLSequenceBrowserNode":
                        proxies = [old.GetProxyNode(old.GetNthSynchronizedSequenceNode(k))
                                   for k in range(old.GetNumberOfSynchronizedSequenceNodes())]
                        proxies.append(old.GetProxyNode(old.GetMasterSequenceNode()))
                        scene.RemoveNode(old)
                        for proxy in proxies:
                            remove_with_helpers(scene, proxy)
                    else:
                        remove_with_helpers(scene, old)

    def load_results(self, result, parameters) -> dict:
        """Turn a finished job into nodes (see the module docstring); returns {"segmentation",
        "browser", "table", "result"} (None where a task makes no such node). A failed job raises
        InputError / RuntimeError, a cancelled one Cancelled; nothing is created then."""
        from ultrasound_ai.mrml.foundation_nodes import (
            labels_to_segmentation,
            labels_to_segmentation_sequence,
            rows_to_table,
        )

        if hasattr(result, "wait") and hasattr(result, "drain"):
            result = result.wait()
        params = AnalysisParameters.from_any(parameters)
        payload = self.finished_payload(result)
        self.last_notes = list(payload.get("warnings") or [])
        node = params.analysisInput
        scene = node.GetScene()
        task = params.analysisTask
        base = f"{node.GetName()}-{task}"
        kind = f"{task}:{node.GetID()}"
        self._replace(scene, base, kind)
        segmentation = browser = None
        if task == "segment":
            labels = result.outputs["labels"]
            names = payload.get("label_names") or ["background", "structure"]
            frames = payload.get("frame_indices") or [0]
            multi = frame_count(node) > 1
            if multi and len(frames) > 1 and third_axis_is_time(node, params.analysisInputKind):
                browser, sequence = labels_to_segmentation_sequence(labels, names, frames, name=f"{base}-Segmentation",
                                                                    scene=scene)
                segmentation = browser.GetProxyNode(sequence)
                for n in (browser, sequence, segmentation):
                    n.SetAttribute(OUTPUT_ATTRIBUTE, kind)
            else:
                spatial = multi and len(frames) > 1  # a reconstructed 3D volume: a surface too
                segmentation = labels_to_segmentation(labels, names, name=f"{base}-Segmentation",
                                                      reference=node if len(frames) == frame_count(node) else None,
                                                      scene=scene, surface=spatial)
                segmentation.SetAttribute(OUTPUT_ATTRIBUTE, kind)
            segmentation.SetAttribute(SOURCE_ATTRIBUTE, node.GetID())
        with open(result.outputs["table"], newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
        header, body = rows[0], [[_number(v) for v in r] for r in rows[1:]]
        table = rows_to_table(header, body, name=f"{base}-Table", scene=scene)
        table.SetAttribute(OUTPUT_ATTRIBUTE, kind)
        table.SetAttribute(SOURCE_ATTRIBUTE, node.GetID())
        return {"segmentation": segmentation, "browser": browser, "table": table, "result": payload}


def _number(text: str):
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def summary_text(payload: dict) -> str:
    """One line for the panel: the model, and per frame the predicted class (classify) or the labelled
    fraction (segment), plus any warning."""
    model = payload.get("model", "model")
    if "probabilities" in payload:
        names = payload.get("class_names") or []
        parts = []
        for f, p, c in list(zip(payload["frame_indices"], payload["probabilities"], payload["predicted"]))[:3]:
            parts.append(f"frame {f}: {c} (" + ", ".join(f"{n} {v:.2f}" for n, v in zip(names, p)) + ")")
        more = len(payload["frame_indices"]) - len(parts)
        text = f"{model}: " + "; ".join(parts) + (f"; {more} more frames in the table" if more > 0 else "")
    else:
        fractions = payload.get("label_fraction_per_frame") or []
        names = payload.get("label_names") or []
        covered = [1.0 - fr[0] for fr in fractions]
        text = (f"{model}: {len(fractions)} frame(s) segmented; "
                f"{', '.join(names[1:]) or 'structure'} covers {100 * max(covered or [0]):.1f} % of a frame at most")
    for note in payload.get("warnings") or []:
        text += f"  Warning: {note}"
    return text


__all__ = ["AnalysisParameters", "UltrasoundAIAnalysisLogic", "summary_text", "third_axis_is_time", "frame_count"]
