"""Classical baseline: SimpleITK rigid registration with Mattes mutual information.

Euler3DTransform rotating about the fixed gland centroid (or the fixed image centre), started from the
initial transform (or the volumes' physical positions, optionally re-centred by CenteredTransformInitializer),
multi-resolution shrink 4/2/1 with smoothing 2/1/0 mm, regular-step gradient descent with physical-shift
scales, random metric sampling with a fixed seed (same inputs, same samples; ITK's multi-threaded sums can
still differ in the last bits between runs). An optional fixed mask (the
dilated gland label) restricts the metric to the prostate region; the TRUS zeros outside the fan are masked
out of the moving image. Returns the fixed->moving LPS 4x4 (ITK convention, docs/DATA_FORMATS.md).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ultrasound_ai.core.errors import Cancelled, InputError
from ultrasound_ai.io.volume import Volume
from ultrasound_ai.registration.case import binary_label, check_3d, check_rigid_matrix, sitk_transform_to_matrix
from ultrasound_ai.registration.preprocessing import check_overlap, label_centroid


def _euler_from_matrix(T: np.ndarray, center: np.ndarray):
    """Euler3DTransform equal to T (p -> R p + t) with its rotation centre at `center`."""
    import SimpleITK as sitk

    tx = sitk.Euler3DTransform()
    tx.SetCenter(center.tolist())
    tx.SetMatrix(T[:3, :3].reshape(-1).tolist(), 1e-6)
    # ITK: T(p) = R (p - c) + c + translation, so translation = t - c + R c.
    tx.SetTranslation((T[:3, 3] - center + T[:3, :3] @ center).tolist())
    return tx


def register_mi(
    fixed: Volume,
    moving: Volume,
    initial=None,
    fixed_label: Volume | None = None,
    use_mask: bool = True,
    mask_dilation_mm: float = 8.0,
    initializer: str | None = None,
    shrink=(4, 2, 1),
    smoothing_mm=(2.0, 1.0, 0.0),
    iterations: int = 200,
    bins: int = 32,
    sampling: float = 0.25,
    learning_rate: float = 1.0,
    seed: int = 12345,
    mask_moving_zeros: bool = True,
    progress: Callable[[float, str], None] | None = None,
    cancel_check: Callable[[], bool] | None = None,
) -> np.ndarray:
    """Rigid Mattes-MI registration; returns the fixed->moving LPS 4x4.

    initial: 4x4 fixed->moving start (None = physical positions). initializer: None, "geometry" or
    "moments" (CenteredTransformInitializer; only without `initial`). fixed_label: rotation centre at its
    centroid and, with use_mask, the metric restricted to it dilated by mask_dilation_mm.
    """
    import SimpleITK as sitk

    check_3d(fixed, "fixed")
    check_3d(moving, "moving")
    if initializer not in (None, "none", "geometry", "moments"):
        raise InputError(f"initializer: expected None, 'geometry' or 'moments', got {initializer!r}")
    if len(shrink) != len(smoothing_mm) or not shrink:
        raise InputError("shrink and smoothing_mm: expected one value per resolution level each")
    f_img = sitk.Cast(fixed.to_sitk(), sitk.sitkFloat32)
    m_img = sitk.Cast(moving.to_sitk(), sitk.sitkFloat32)
    label = None
    if fixed_label is not None:
        label = binary_label(fixed_label, "fixed_label", reference=fixed)
        center = label_centroid(label)
    else:
        center = fixed.index_to_physical((np.array(fixed.shape_ijk) - 1) / 2.0)
    if initial is not None:
        T0 = check_rigid_matrix(initial, "initial transform")
        init_tx = _euler_from_matrix(T0, center)
    elif initializer in ("geometry", "moments"):
        mode = (sitk.CenteredTransformInitializerFilter.GEOMETRY if initializer == "geometry"
                else sitk.CenteredTransformInitializerFilter.MOMENTS)
        init_tx = sitk.CenteredTransformInitializer(f_img, m_img, sitk.Euler3DTransform(), mode)
        T0 = sitk_transform_to_matrix(init_tx)
        init_tx = _euler_from_matrix(T0, center)
    else:
        T0 = np.eye(4)
        init_tx = _euler_from_matrix(T0, center)
    if label is not None:
        check_overlap(label, moving, T0)

    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=int(bins))
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(float(sampling), int(seed))
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=float(learning_rate), minStep=1e-4, numberOfIterations=int(iterations),
        relaxationFactor=0.6, gradientMagnitudeTolerance=1e-8,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([int(s) for s in shrink])
    reg.SetSmoothingSigmasPerLevel([float(s) for s in smoothing_mm])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    if label is not None and use_mask:
        mask = sitk.Cast(label.to_sitk(), sitk.sitkUInt8)
        if mask_dilation_mm > 0:
            radius = [max(1, int(round(mask_dilation_mm / s))) for s in fixed.spacing_xyz]
            mask = sitk.BinaryDilate(mask, radius, sitk.sitkBall)
        reg.SetMetricFixedMask(mask)
    if mask_moving_zeros:
        # The TRUS is exactly 0 outside the fan: those voxels are no evidence about the anatomy.
        mmask = sitk.BinaryThreshold(m_img, 1e-6, 1e30, 1, 0)
        if sitk.GetArrayViewFromImage(mmask).any():
            reg.SetMetricMovingMask(mmask)
    reg.SetInitialTransform(init_tx, inPlace=False)

    n_levels = len(shrink)
    state = {"level": 0, "cancelled": False}

    def on_iteration():
        if cancel_check is not None and cancel_check():
            state["cancelled"] = True  # SimpleITK wraps the exception below in a RuntimeError
            raise Cancelled("MI registration cancelled")
        if progress is not None:
            it = reg.GetOptimizerIteration()
            frac = (state["level"] + min(it / max(iterations, 1), 1.0)) / n_levels
            progress(min(frac, 1.0), f"MI level {state['level'] + 1}/{n_levels}, iteration {it}")

    def on_level():
        state["level"] = reg.GetCurrentLevel()

    reg.AddCommand(sitk.sitkIterationEvent, on_iteration)
    reg.AddCommand(sitk.sitkMultiResolutionIterationEvent, on_level)
    try:
        out = reg.Execute(f_img, m_img)
    except RuntimeError as exc:
        if state["cancelled"]:
            raise Cancelled("MI registration cancelled") from exc
        raise InputError(f"MI registration failed (too little overlap between the volumes?): "
                         f"{str(exc).strip().splitlines()[-1]}") from exc
    if progress is not None:
        progress(1.0, "MI done")
    return sitk_transform_to_matrix(out)
