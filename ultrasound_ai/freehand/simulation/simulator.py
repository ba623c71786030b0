"""Freehand sweep simulator: phantom + trajectory + frame formation + IMUs -> a `Sweep` (the file contract).

`simulate_sweep(seed)` is deterministic: the same arguments give identical arrays (and file bytes).
The phantom it scans is `make_phantom(seed)` (or pass `return_phantom=True`), so tests can render
noise-free reference planes with `Phantom.render_plane` on any grid.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.freehand.simulation.imu_model import EARTH_FROM_WORLD, ImuNoise, default_imu_positions, simulate_imus
from ultrasound_ai.freehand.simulation.phantom import Phantom, Psf, make_phantom, to_uint8
from ultrasound_ai.freehand.simulation.trajectories import MOTIONS, TACTICS, generate_trajectory
from ultrasound_ai.io.sweep import Sweep

SIMULATOR_VERSION = "freehand-sim-1"
DEFAULT_FRAME_SHAPE = (248, 260)  # [H, W], the FiMA paper's frames
DEFAULT_PIXEL_SPACING = 0.15
PRESETS = {
    # TUS-REC-like frames: 480 x 640 pixels, coarser pixels and a lower-frequency probe.
    "tusrec": {"frame_shape": (480, 640), "pixel_spacing": 0.229, "center_frequency_mhz": (4.0, 5.0),
               "axial_fwhm_mm": (0.45, 0.6), "lateral_fwhm_mm": (0.7, 0.9), "sigma_e_mm": (0.8, 1.1)},
}
_DEFAULT_RANGES = {"center_frequency_mhz": (6.0, 9.0), "axial_fwhm_mm": (0.28, 0.4),
                   "lateral_fwhm_mm": (0.4, 0.6), "sigma_e_mm": (0.5, 0.8)}
APPEARANCES = ("nominal", "randomised")
# Per-sweep appearance of appearance="randomised" (training data that makes the images matter, issue 15):
# what differs between scanners, presets, patients and users, drawn per sweep. The elevational beam stays in
# the nominal probe's band (sigma_e 0.5-0.8 mm, recorded in the model cards): images alone cannot tell an
# out-of-plane distance from a different beam width.
RANDOMISED_RANGES = {
    "scatterers_per_mm3": (2.0, 80.0),  # log-uniform; below ~10/mm3 speckle is not fully developed
    "echo_gamma": (0.6, 1.6),  # echogenicity contrast: structure amplitudes raised to this power
    "homogeneous_fraction": 0.15,  # sweeps over uniform tissue (no structures at all)
    "gain_db": (-9.0, 9.0),
    "tgc_compensation": (0.55, 1.0),
    "dynamic_range_db": (30.0, 60.0),
    "noise_floor": (0.03, 0.3),  # log-compression knee relative to reference tissue
    "noise_sigma": (0.0, 0.04),
    "axial_fwhm_mm": (0.2, 0.55),
    "lateral_fwhm_mm": (0.3, 0.85),
    "center_frequency_mhz": (4.5, 11.0),
    "depth_fraction": (0.55, 1.0),  # frame depth / width relative to the network grid (half the sweeps)
    "width_fraction": (0.7, 1.0),
    "spacing_jitter": 0.25,  # pixel size x (1 +- this)
}


def random_psf(rng: np.random.Generator, preset: str | None = None) -> Psf:
    """Imaging parameters drawn within realistic ranges (linear probe by default)."""
    r = dict(_DEFAULT_RANGES)
    if preset is not None:
        r.update({k: v for k, v in PRESETS[preset].items() if k in r})
    return Psf(
        axial_fwhm_mm=rng.uniform(*r["axial_fwhm_mm"]),
        lateral_fwhm_mm=rng.uniform(*r["lateral_fwhm_mm"]),
        sigma_e_mm=rng.uniform(*r["sigma_e_mm"]),
        center_frequency_mhz=rng.uniform(*r["center_frequency_mhz"]),
        attenuation_db_cm_mhz=rng.uniform(0.4, 0.7),
        tgc_compensation=rng.uniform(0.85, 1.0),
    )


def random_appearance(seed: int) -> dict:
    """The per-sweep appearance of appearance="randomised" (RANDOMISED_RANGES), from its own random stream
    (the nominal draws of `simulate_sweep` are unchanged): psf, gain_db, noise_sigma, phantom keywords."""
    r = RANDOMISED_RANGES
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xA99E]))
    lo, hi = np.log(r["scatterers_per_mm3"])
    psf = Psf(axial_fwhm_mm=rng.uniform(*r["axial_fwhm_mm"]), lateral_fwhm_mm=rng.uniform(*r["lateral_fwhm_mm"]),
              sigma_e_mm=rng.uniform(*_DEFAULT_RANGES["sigma_e_mm"]),
              center_frequency_mhz=rng.uniform(*r["center_frequency_mhz"]),
              attenuation_db_cm_mhz=rng.uniform(0.3, 0.8), tgc_compensation=rng.uniform(*r["tgc_compensation"]),
              dynamic_range_db=rng.uniform(*r["dynamic_range_db"]), noise_floor=rng.uniform(*r["noise_floor"]))
    phantom = {"scatterer_density_per_mm3": float(np.exp(rng.uniform(lo, hi))),
               "echo_gamma": float(rng.uniform(*r["echo_gamma"]))}
    if rng.random() < r["homogeneous_fraction"]:
        phantom["kind"] = "homogeneous"
        phantom["homogeneous_echo"] = float(rng.uniform(0.5, 1.5))
    return {"psf": psf, "gain_db": float(rng.uniform(*r["gain_db"])), "noise_sigma": float(rng.uniform(*r["noise_sigma"])),
            "phantom": phantom}


def simulate_sweep(
    seed: int,
    n_frames: int = 200,
    tactic: str | None = None,
    frame_shape: tuple[int, int] | None = None,
    pixel_spacing: float | tuple[float, float] | None = None,
    n_imus: int = 4,
    preset: str | None = None,
    reverse: bool | None = None,
    *,
    frame_rate_hz: float = 20.0,
    psf: Psf | None = None,
    phantom: Phantom | None = None,
    speed_mm_s: float | None = None,
    rotation_deg_s: float | None = None,
    image_noise: bool = True,
    imu_noise: ImuNoise | None = ImuNoise(),
    tremor: bool = True,
    motion: str = "smooth",
    appearance: str = "nominal",
    return_phantom: bool = False,
    progress: Callable[[int, int], None] | None = None,
):
    """Simulate one freehand sweep; returns a `Sweep` (or `(sweep, phantom)` with return_phantom).

    frame_shape [H, W] and pixel_spacing (mm; a number or (sx, sy)) default to 248 x 260 at 0.15 mm
    with a small random jitter (±5 % size, ±10 % spacing); given explicitly they are used as they are.
    psf, gain and image noise are randomised unless given. appearance="randomised" draws them (and the
    phantom's scatterer density, echogenicity contrast and kind) from the wider `RANDOMISED_RANGES` instead;
    an explicit psf or phantom still wins. `progress(done, total)` is called per frame.
    """
    if appearance not in APPEARANCES:
        raise InputError(f"simulate_sweep: appearance must be one of {APPEARANCES}, got {appearance!r}")
    if preset is not None and preset not in PRESETS:
        raise InputError(f"simulate_sweep: unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    if tactic is not None and tactic not in TACTICS:
        raise InputError(f"simulate_sweep: tactic must be one of {TACTICS}, got {tactic!r}")
    if int(n_frames) < 2:
        raise InputError(f"simulate_sweep: n_frames must be at least 2, got {n_frames}")
    if int(n_imus) < 0:
        raise InputError(f"simulate_sweep: n_imus must be ≥ 0, got {n_imus}")
    seed = int(seed)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x51D]))
    base_shape = PRESETS[preset]["frame_shape"] if preset else DEFAULT_FRAME_SHAPE
    base_spacing = PRESETS[preset]["pixel_spacing"] if preset else DEFAULT_PIXEL_SPACING
    size_jitter, spacing_jitter = rng.uniform(0.95, 1.05, 2), rng.uniform(0.9, 1.1)
    if frame_shape is None:
        h, w = (int(round(b * j)) for b, j in zip(base_shape, size_jitter))
    else:
        h, w = (int(v) for v in frame_shape)
    if h < 2 or w < 2:
        raise InputError(f"simulate_sweep: frame_shape must be at least 2 x 2, got {frame_shape}")
    if pixel_spacing is None:
        sx = sy = float(base_spacing * spacing_jitter)
    else:
        sp = np.broadcast_to(np.asarray(pixel_spacing, dtype=np.float64), (2,))
        sx, sy = float(sp[0]), float(sp[1])
    if not (sx > 0 and sy > 0):
        raise InputError(f"simulate_sweep: pixel_spacing must be positive, got {pixel_spacing}")
    given_psf = psf
    drawn_psf = random_psf(rng, preset)
    psf = psf or drawn_psf
    gain_db = rng.uniform(-3.0, 3.0)
    noise_sigma = rng.uniform(0.004, 0.015) if image_noise else 0.0
    if appearance == "randomised":
        look = random_appearance(seed)
        drawn_psf, gain_db = look["psf"], look["gain_db"]
        noise_sigma = look["noise_sigma"] if image_noise else 0.0
        psf = given_psf or drawn_psf
        if phantom is None:
            kw = dict(look["phantom"])
            phantom = (Phantom.homogeneous(seed, kw.pop("homogeneous_echo"), **{k: v for k, v in kw.items() if k != "kind"})
                       if kw.get("kind") == "homogeneous" else make_phantom(seed, **kw))
    phantom = phantom if phantom is not None else make_phantom(seed)

    face = ((w - 1) * sx / 2.0, 0.0, 0.0)
    traj = generate_trajectory(
        np.random.default_rng(np.random.SeedSequence([seed, 0x7247])), n_frames=int(n_frames), tactic=tactic,
        frame_rate_hz=frame_rate_hz, reverse=reverse, face_center_image_mm=face, speed_mm_s=speed_mm_s,
        rotation_deg_s=rotation_deg_s, tremor=tremor, motion=motion,
    )
    noise_rng = np.random.default_rng(np.random.SeedSequence([seed, 0xF4A]))
    frames = np.empty((n_frames, h, w), dtype=np.uint8)
    for i, pose in enumerate(traj.poses):
        img = phantom.render_plane(pose, (h, w), (sx, sy), psf)
        img = img + np.float32(gain_db / psf.dynamic_range_db)
        if noise_sigma > 0:
            img = img + noise_rng.normal(0.0, noise_sigma, img.shape).astype(np.float32)
        frames[i] = to_uint8(img)
        if progress is not None:
            progress(i + 1, n_frames)

    attrs = {
        "simulator_version": SIMULATOR_VERSION,
        "seed": seed,
        "tactic": traj.tactic,
        "reversed": bool(traj.reversed),
        "motion": motion,
        "preset": preset or "default",
        "sigma_e_mm": float(psf.sigma_e_mm),
        "gain_db": float(gain_db),
        "image_noise_sigma": float(noise_sigma),
        "earth_from_world": EARTH_FROM_WORLD,
        **psf.as_attrs(),
        **phantom.describe(),
        **{f"trajectory_{k}": float(v) for k, v in traj.params.items()},
    }
    if appearance != "nominal":  # only then: the nominal sweeps' attributes stay as they were
        attrs["appearance"] = appearance
    imu_acc = imu_euler = imu_pos = None
    if n_imus > 0:
        imu_pos = default_imu_positions(int(n_imus), face[0])
        imu_acc, imu_euler, info = simulate_imus(
            traj.fine_poses, traj.fine_dt_s, traj.oversample, imu_pos, noise=imu_noise,
            seed=np.random.default_rng(np.random.SeedSequence([seed, 0x1A0])),
        )
        attrs["imu_noise"] = imu_noise is not None
        attrs.update({k: np.asarray(v, dtype=np.float64) for k, v in info.items()})
    sweep = Sweep(
        frames=frames,
        pixel_spacing_xy=(sx, sy),
        tforms=traj.poses,
        timestamps_s=traj.timestamps_s,
        frame_rate_hz=frame_rate_hz,
        imu_acc=imu_acc,
        imu_euler_deg=imu_euler,
        imu_position_mm=imu_pos,
        attrs=attrs,
    ).validate(name="simulated sweep")
    return (sweep, phantom) if return_phantom else sweep


def simulate_sweep_for_grid(seed: int, n_frames: int, grid_shape_hw, grid_spacing_mm: float,
                            acquisition_spacing_mm: float | None, spacing_jitter: float = 0.0, **kwargs):
    """A training sweep for a network grid of `grid_shape_hw` at `grid_spacing_mm`.

    With `acquisition_spacing_mm` the frames are simulated at that spacing (times a per-seed factor in
    1 ± spacing_jitter) over the grid's field of view, and the training pool resamples them onto the grid
    exactly as inference resamples a user's sweep: speckle formed at a scanner's pixel size and then
    resampled looks unlike speckle formed at the coarse grid spacing, and a model trained only on the
    latter did not carry over (measured on freehand-v1). None simulates on the grid itself.
    """
    h, w = (int(v) for v in grid_shape_hw)
    if acquisition_spacing_mm is None:
        return simulate_sweep(seed, n_frames=n_frames, frame_shape=(h, w), pixel_spacing=float(grid_spacing_mm),
                              **kwargs)
    if not (acquisition_spacing_mm > 0) or not (0.0 <= spacing_jitter < 1.0):
        raise InputError(f"simulate_sweep_for_grid: acquisition spacing {acquisition_spacing_mm!r} must be positive "
                         f"and spacing_jitter {spacing_jitter!r} in [0, 1)")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x6121D]))
    randomised = kwargs.get("appearance") == "randomised"
    if randomised:  # a wider band of scanner pixel sizes
        spacing_jitter = max(spacing_jitter, RANDOMISED_RANGES["spacing_jitter"])
    sp = float(acquisition_spacing_mm) * float(rng.uniform(1.0 - spacing_jitter, 1.0 + spacing_jitter))
    # the grid's extent (pixel centres) in acquisition pixels, +1 so the grid lies inside the frame
    shape = tuple(int(np.ceil((n - 1) * grid_spacing_mm / sp)) + 1 for n in (h, w))
    if randomised and rng.random() < 0.5:
        # a shallower or narrower frame than the grid (the grid is 0 outside it, as at inference)
        fr = (rng.uniform(*RANDOMISED_RANGES["depth_fraction"]), rng.uniform(*RANDOMISED_RANGES["width_fraction"]))
        shape = tuple(max(8, int(round(n * f))) for n, f in zip(shape, fr))
    return simulate_sweep(seed, n_frames=n_frames, frame_shape=shape, pixel_spacing=sp, **kwargs)


def check_acquisition_options(d: dict) -> None:
    """Check a training config's data.sim_pixel_spacing_mm (positive or null), data.sim_spacing_jitter,
    data.motion and data.appearance."""
    sp, jit = d["sim_pixel_spacing_mm"], d["sim_spacing_jitter"]
    if sp is not None and (isinstance(sp, bool) or not isinstance(sp, (int, float)) or not np.isfinite(sp) or sp <= 0):
        raise InputError(f"data.sim_pixel_spacing_mm: expected a positive number of mm or null, got {sp!r}")
    if isinstance(jit, bool) or not isinstance(jit, (int, float)) or not 0 <= jit < 1:
        raise InputError(f"data.sim_spacing_jitter: expected a number in [0, 1), got {jit!r}")
    if d.get("motion", "smooth") not in MOTIONS:
        raise InputError(f"data.motion: expected one of {list(MOTIONS)}, got {d['motion']!r}")
    if d.get("appearance", "nominal") not in APPEARANCES:
        raise InputError(f"data.appearance: expected one of {list(APPEARANCES)}, got {d['appearance']!r}")
