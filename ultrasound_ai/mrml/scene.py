"""Scene helpers: find the scene, register the module logics that MRML nodes need, volume rendering.

Works in two settings:

* inside the 3D Slicer application, where ``slicer.mrmlScene`` exists and every module logic is
  already registered with it (``slicer.modules.<name>.logic()``);
* with the ``slicer-core`` wheel (MRML without Qt, used by the tests), where nobody registers the
  logics: ``new_scene()`` makes a scene, sets ``slicer.mrmlScene`` and registers them, and
  ``ensure_logics(scene)`` does the registration for any other scene, once.

``slicer`` is imported inside functions only, so ``import ultrasound_ai.mrml`` works without Slicer.
"""

from __future__ import annotations

from ultrasound_ai.core.errors import InputError

# Module name as in slicer.modules -> logic class name in the slicer namespace. Order matters: the
# sequences logic registers the sequence browser node class, the markups logic its node classes.
LOGIC_CLASSES = {
    "sequences": "vtkSlicerSequencesLogic",
    "markups": "vtkSlicerMarkupsLogic",
    "volumerendering": "vtkSlicerVolumeRenderingLogic",
    "segmentations": "vtkSlicerSegmentationsModuleLogic",
    "volumes": "vtkSlicerVolumesLogic",
    "transforms": "vtkSlicerTransformLogic",
}

# Logics we registered ourselves: id(scene) -> (scene, {module name: logic}). The scene is held too,
# so its id cannot be reused by another scene while the entry exists (close_scene drops it).
_REGISTERED: dict[int, tuple[object, dict[str, object]]] = {}


def import_slicer():
    """The ``slicer`` module, or a clear error when neither Slicer nor slicer-core is installed."""
    try:
        import slicer
    except ImportError as exc:  # pragma: no cover - the test environment has slicer-core
        raise RuntimeError(
            "ultrasound_ai.mrml needs Slicer's Python: run inside 3D Slicer or install the slicer-core wheel"
        ) from exc
    return slicer


def in_slicer_application() -> bool:
    """True inside the 3D Slicer application (slicer-core has no ``slicer.app``)."""
    slicer = import_slicer()
    return getattr(slicer, "app", None) is not None and hasattr(slicer, "modules")


def _is_application_scene(scene) -> bool:
    if not in_slicer_application():
        return False
    import slicer

    return scene is getattr(slicer, "mrmlScene", None)


def _add_singletons(slicer, scene) -> None:
    # The markups logic looks up the selection node when it is given a scene; the Slicer application
    # logic normally creates it (and the interaction node), slicer-core does not.
    if scene.GetNodeByID("vtkMRMLSelectionNodeSingleton") is None:
        scene.AddNode(slicer.vtkMRMLSelectionNode())
    if scene.GetNodeByID("vtkMRMLInteractionNodeSingleton") is None:
        scene.AddNode(slicer.vtkMRMLInteractionNode())


def ensure_logics(scene) -> dict:
    """Make sure the logics our nodes need (sequences, markups, volume rendering, segmentations,
    volumes, transforms) are registered with `scene`; idempotent. Returns {module name: logic}.

    In the Slicer application the application's own logics are returned for its scene.
    """
    slicer = import_slicer()
    if not isinstance(scene, slicer.vtkMRMLScene):
        raise InputError(f"scene: expected a vtkMRMLScene, got {type(scene).__name__}")
    if _is_application_scene(scene):
        logics = {}
        for module in LOGIC_CLASSES:
            mod = getattr(slicer.modules, module, None)
            if mod is not None:
                logics[module] = mod.logic()
        return logics
    entry = _REGISTERED.get(id(scene))
    if entry is not None and entry[0] is scene:
        return entry[1]
    _add_singletons(slicer, scene)
    logics = {}
    for module, class_name in LOGIC_CLASSES.items():
        cls = getattr(slicer, class_name, None)
        if cls is None:  # pragma: no cover - a build without that module
            continue
        logic = cls()
        logic.SetMRMLScene(scene)
        logics[module] = logic
    _REGISTERED[id(scene)] = (scene, logics)
    return logics


def get_logic(module: str, scene=None):
    """The logic of `module` ("sequences", "markups", "volumerendering", ...) for `scene`, or None."""
    if module not in LOGIC_CLASSES:
        raise InputError(f"module: expected one of {', '.join(LOGIC_CLASSES)}, got {module!r}")
    return ensure_logics(resolve_scene(scene)).get(module)


def resolve_scene(scene=None):
    """`scene`, or ``slicer.mrmlScene`` when None; its logics registered."""
    slicer = import_slicer()
    if scene is None:
        scene = getattr(slicer, "mrmlScene", None)
        if scene is None:
            raise InputError(
                "scene: none given and slicer.mrmlScene is not set (outside Slicer, call "
                "ultrasound_ai.mrml.new_scene() first)"
            )
    ensure_logics(scene)
    return scene


def node_scene(node, what: str = "node"):
    """The scene a node belongs to, or a clear error when it is in none."""
    if node is None or not hasattr(node, "GetScene"):
        raise InputError(f"{what}: expected an MRML node, got {type(node).__name__}")
    scene = node.GetScene()
    if scene is None:
        raise InputError(f"{what} {node.GetName()!r}: expected a node that is in a scene")
    ensure_logics(scene)
    return scene


def new_scene():
    """A scene ready for our nodes, set as ``slicer.mrmlScene``.

    With slicer-core: a new ``vtkMRMLScene`` with the logics registered. Inside the Slicer application
    (where the scene belongs to the application): ``slicer.mrmlScene``, cleared, as a module test's
    setUp does — so the same test scenario runs in both settings.
    """
    slicer = import_slicer()
    if in_slicer_application():
        slicer.mrmlScene.Clear(0)
        return slicer.mrmlScene
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    ensure_logics(scene)
    return scene


def close_scene(scene) -> None:
    """Forget the logics registered for `scene` by `ensure_logics` and clear it (tests' teardown)."""
    if not _is_application_scene(scene):
        scene.Clear(1)
    # Dropping our references deletes the logics (detaching them one by one makes the segmentations
    # logic warn about the missing scene).
    _REGISTERED.pop(id(scene), None)
    slicer = import_slicer()
    if getattr(slicer, "mrmlScene", None) is scene and not in_slicer_application():
        slicer.mrmlScene = None


def show_volume_rendering(volume_node, preset: str | None = None, visible: bool = True):
    """Turn volume rendering of `volume_node` on through the volume rendering logic.

    `preset` names one of Slicer's presets (e.g. "US-Fetal", "MR-Default"); it is applied when the
    presets are available (not in slicer-core, whose logic has no share directory). Returns the volume
    rendering display node, or None when no volume rendering logic is available.
    """
    slicer = import_slicer()
    if not isinstance(volume_node, slicer.vtkMRMLVolumeNode):
        raise InputError(f"volume_node: expected a volume node, got {type(volume_node).__name__}")
    scene = node_scene(volume_node, "volume_node")
    logic = ensure_logics(scene).get("volumerendering")
    if logic is None:
        return None
    display = logic.GetFirstVolumeRenderingDisplayNode(volume_node)
    if display is None:
        display = logic.CreateDefaultVolumeRenderingNodes(volume_node)
    if display is None:
        return None
    if preset:
        preset_node = _volume_rendering_preset(logic, preset)
        if preset_node is not None and display.GetVolumePropertyNode() is not None:
            display.GetVolumePropertyNode().Copy(preset_node)
    display.SetVisibility(bool(visible))
    return display


def _volume_rendering_preset(logic, name: str):
    # Without a share directory the logic logs an error and returns None; ask only when it has one.
    share = logic.GetModuleShareDirectory() if hasattr(logic, "GetModuleShareDirectory") else ""
    if not share:
        return None
    return logic.GetPresetByName(name)
