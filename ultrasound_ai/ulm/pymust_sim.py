"""Physically realistic ULM frames with pymust: SIMUS RF + I/Q demodulation + delay-and-sum (`ulm simulate --pymust`).

The bubbles come from the same `FlowSimulator` as the fast path (same vessel tree, bubble ids and
ground truth for a given `UlmSimConfig`); only the image formation differs:

- Probe: an L22-14v-like linear array (PALA's): 128 elements, pitch 0.1 mm, 15.625 MHz, ~67 %
  bandwidth, RF sampled at 4 fc. It starts from pymust's 'L11-5v' preset and overrides those fields.
- Transmit: three plane waves (tilts -5, 0, +5 degrees), one SIMUS run each (2-D, no elevation).
- Receive: `rf2iq`, then one delay-and-sum matrix per tilt (`dasmtx`, linear interpolation, f-number
  1) onto exactly the fast simulator's pixel grid (lambda pixels, 84 x 143, same origin), coherent
  compounding (mean over tilts). The three DAS matrices are built once and reused for every frame.
- Amplitudes: bubble reflectivity = |amplitude| of the fast simulator (log-normal, mean 1). Frames are
  divided by the peak |IQ| of a unit scatterer at the centre of the field of view, so "1" is the mean
  bubble peak amplitude, the 0 dB reference of `clutter_db` and `noise_db` as in the fast path.
- Tissue (`clutter_db`, None = off): random point scatterers over the FOV plus a margin, following
  the fast path's tissue model (`simulator.TissueModel`): slow rigid sinusoidal motion and a smooth,
  low-rank decorrelation. SIMUS is linear in the reflectivities, so the tissue is two fixed
  reflectivity patterns R1, R2 mixed as cos(phi) R1 + sin(phi) R2 with phi(t) the model's smooth
  mixing angle; and because the tissue moves by far less than a wavelength per frame, its beamformed
  images are simulated at key frames (every `tissue_keyframe_every` frames) and interpolated linearly
  in between. Its rms amplitude over the FOV is set to `clutter_db` from the first key frame.
- Noise (`noise_db`, None = off): white Gaussian noise on every RF channel of every transmission
  (so it is beamformed like real thermal noise), scaled so that its rms in the compounded image is
  `noise_db` relative to the mean bubble peak amplitude.

Cost: SIMUS dominates, ~proportional to the number of scatterers x elements x frequency samples.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.ulm.simulator import ULM_SIM_VERSION, FlowSimulator, TissueModel, UlmSimConfig

PYMUST_MODE = "pymust"
# Frames per write to the acquisition file.
_WRITE_BLOCK = 16


@dataclass
class PymustProbe:
    """Linear array and imaging sequence (defaults: L22-14v-like, PALA's three compounded plane waves)."""

    n_elements: int = 128
    pitch_mm: float = 0.1
    kerf_mm: float = 0.02
    bandwidth_percent: float = 67.0
    sampling_factor: float = 4.0  # fs = sampling_factor * fc (SIMUS needs >= 4)
    tilts_deg: tuple[float, ...] = (-5.0, 0.0, 5.0)
    f_number: float = 1.0
    attenuation_db_cm_mhz: float = 0.0
    tx_cycles: float = 1.0
    # Tissue model (used when UlmSimConfig.clutter_db is not None).
    tissue_scatterers_per_mm2: float = 8.0
    tissue_margin_mm: float = 0.5
    tissue_keyframe_every: int = 20
    # SIMUS spectral threshold (dB): frequency samples below it are skipped (pymust's pfield default).
    db_threshold: float = -60.0
    workers: int = 2

    def validate(self) -> "PymustProbe":
        def bad(what):
            raise InputError(f"pymust probe: {what}")

        if int(self.n_elements) < 2:
            bad(f"n_elements must be >= 2, got {self.n_elements}")
        if not (self.pitch_mm > 0 and 0 <= self.kerf_mm < self.pitch_mm):
            bad(f"need pitch_mm > 0 and 0 <= kerf_mm < pitch_mm, got {self.pitch_mm}, {self.kerf_mm}")
        if not (0 < self.bandwidth_percent < 200):
            bad(f"bandwidth_percent must be in (0, 200), got {self.bandwidth_percent}")
        if self.sampling_factor < 4:
            bad(f"sampling_factor must be >= 4 (SIMUS), got {self.sampling_factor}")
        if len(self.tilts_deg) < 1 or any(abs(t) >= 45 for t in self.tilts_deg):
            bad(f"tilts_deg must hold at least one angle in (-45, 45), got {self.tilts_deg}")
        if self.f_number < 0 or self.attenuation_db_cm_mhz < 0 or self.tx_cycles <= 0:
            bad("f_number and attenuation must be >= 0, tx_cycles > 0")
        if self.tissue_scatterers_per_mm2 <= 0 or self.tissue_margin_mm < 0 or int(self.tissue_keyframe_every) < 1:
            bad("tissue density must be > 0, margin >= 0, keyframe interval >= 1")
        if not self.db_threshold < 0:
            bad(f"db_threshold must be negative, got {self.db_threshold}")
        if int(self.workers) < 1:
            bad(f"workers must be >= 1, got {self.workers}")
        return self

    def as_attrs(self) -> dict:
        d = dataclasses.asdict(self)
        d["tilts_deg"] = [float(t) for t in self.tilts_deg]
        return d


def _import_pymust():
    try:
        import pymust
        from pymust import utils
    except ModuleNotFoundError as exc:
        raise InputError("pymust frame formation needs the 'pymust' package (pip install 'ultrasound-ai[pymust]')") from exc
    return pymust, utils


def _blas_single_thread():
    """Context limiting BLAS to one thread: pfield does ~1000 tiny matrix products per call, which
    multi-threaded OpenBLAS makes ~20x slower on a busy machine (threads spin and fight)."""
    try:
        from threadpoolctl import threadpool_limits
    except ModuleNotFoundError:
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


class PymustFrameSimulator:
    """Frame-by-frame pymust image formation for the bubbles of a `FlowSimulator`.

    `frames(progress)` yields (frame index, iq [Z, X] complex64, gt rows [K, 4]).
    """

    def __init__(self, config: UlmSimConfig, probe: PymustProbe | None = None):
        self.cfg = cfg = config.validate()
        self.probe = probe = (probe or PymustProbe()).validate()
        self._pm, self._utils = _import_pymust()
        # Bubble motion and ground truth: the fast simulator's own streams (its clutter and noise
        # streams are independent of the bubble stream, so turning them off changes no bubble).
        self.flow = FlowSimulator(dataclasses.replace(cfg, clutter_db=None, noise_db=None))
        fl = self.flow
        self.Z, self.X = fl.Z, fl.X
        seeds = np.random.SeedSequence([int(cfg.seed), 0x9A57]).spawn(2)
        self._rng_tissue, self._rng_noise = (np.random.default_rng(s) for s in seeds)

        # -- probe parameters (SI units, as pymust wants) ------------------------------------------
        p = self._pm.getparam("L11-5v")
        p.fc = float(cfg.center_frequency_hz)
        p.c = float(cfg.speed_of_sound_m_s)
        p.Nelements = int(probe.n_elements)
        p.pitch = probe.pitch_mm * 1e-3
        p.kerf = probe.kerf_mm * 1e-3
        p.width = p.pitch - p.kerf
        p.bandwidth = float(probe.bandwidth_percent)
        p.fs = float(probe.sampling_factor) * p.fc
        p.fnumber = float(probe.f_number)
        p.TXnow = float(probe.tx_cycles)
        if probe.attenuation_db_cm_mhz > 0:
            p.attenuation = float(probe.attenuation_db_cm_mhz)
        self.param = p
        self.tilts = np.deg2rad(np.asarray(probe.tilts_deg, dtype=np.float64))
        self.delays = [self._pm.txdelay(p.copy(), float(t)) for t in self.tilts]
        self._options = self._utils.Options()
        self._options.dBThresh = float(probe.db_threshold)
        self._options.WaitBar = False

        # -- geometry: pixel grid (metres) and the scatterer box -----------------------------------
        zz = (fl.z0 + fl.dz * np.arange(self.Z)) * 1e-3
        xx = (fl.x0 + fl.dx * np.arange(self.X)) * 1e-3
        self._z_pix = np.repeat(zz, self.X)  # C order of [Z, X]
        self._x_pix = np.tile(xx, self.Z)
        # Box holding every scatterer (vessel box of the flow simulator + 0.5 mm): a zero-reflectivity
        # sentinel at its far corner fixes SIMUS' maximum distance, hence its RF length and frequency
        # grid, so every frame has the same RF size and the DAS matrices fit all of them.
        m = cfg.margin_mm + 0.5
        self._box_mm = (max(fl.fov[0] - m, 0.1), fl.fov[1] + m, fl.fov[2] - m, fl.fov[3] + m)
        zb0, zb1, xb0, xb1 = self._box_mm
        self._sentinel = (xb0 * 1e-3, zb1 * 1e-3)

        # -- reference point scatterer: RF length, normalisation ------------------------------------
        zc = fl.z0 + fl.dz * (self.Z - 1) / 2.0
        xc = fl.x0 + fl.dx * (self.X - 1) / 2.0
        rf_ref = [self._simus(np.array([zc]), np.array([xc]), np.array([1.0]), k, n_t=None) for k in range(len(self.tilts))]
        # Tilted waves have longer delays, hence slightly longer RF: use the longest, zero-pad the rest.
        self.n_t = int(max(rf.shape[0] for rf in rf_ref))
        rf_ref = [self._fit_length(rf) for rf in rf_ref]
        self._das = self._build_das()
        ref = self._beamform(rf_ref)
        self.ref_peak = float(np.abs(ref).max())
        self.ref_peak_index = tuple(int(i) for i in np.unravel_index(int(np.argmax(np.abs(ref))), ref.shape))

        # -- noise: rms of unit channel noise after demodulation + DAS + compounding ------------------
        self._noise_std = None
        if cfg.noise_db is not None:
            cal_rng = np.random.default_rng(np.random.SeedSequence([int(cfg.seed), 0x0015E]))
            noise_img = self._beamform([cal_rng.standard_normal((self.n_t, p.Nelements)) for _ in self.tilts])
            # Unit-std channel noise gives rms g (in bubble-peak units) in the final frame.
            g = float(np.sqrt(np.mean(np.abs(noise_img) ** 2))) / self.ref_peak
            self._noise_std = 10.0 ** (cfg.noise_db / 20.0) / g  # RF channel noise std

        # -- tissue ----------------------------------------------------------------------------------
        self._tissue_on = cfg.clutter_db is not None
        if self._tissue_on:
            rng = self._rng_tissue
            tm = probe.tissue_margin_mm
            tz0, tz1 = max(fl.fov[0] - tm, 0.1), fl.fov[1] + tm
            tx0, tx1 = fl.fov[2] - tm, fl.fov[3] + tm
            n_tissue = max(1, int(round(probe.tissue_scatterers_per_mm2 * (tz1 - tz0) * (tx1 - tx0))))
            self._tissue_z = rng.uniform(tz0, tz1, n_tissue)
            self._tissue_x = rng.uniform(tx0, tx1, n_tissue)
            self._tissue_rc = rng.standard_normal((2, n_tissue))
            self.tissue = TissueModel(cfg, rng)  # the fast path's slow motion and mixing angle
            self._keys: dict[int, np.ndarray] = {}
            self._tissue_scale = None  # set from the first key frame
            self.n_tissue = n_tissue
        else:
            self.n_tissue = 0

    # -- pymust calls ----------------------------------------------------------------------------
    def _simus(self, z_mm: np.ndarray, x_mm: np.ndarray, rc: np.ndarray, tilt_index: int, n_t: int | None):
        """RF [n_t, Nelements] float64 of point scatterers (z, x in mm) for one plane wave."""
        zb0, zb1, xb0, xb1 = self._box_mm
        keep = (z_mm >= zb0) & (z_mm <= zb1) & (x_mm >= xb0) & (x_mm <= xb1) & (rc != 0)
        n_el = int(self.param.Nelements)
        if not keep.any():
            if n_t is None:
                raise InputError("pymust simulation: the reference scatterer lies outside the simulation box")
            return np.zeros((n_t, n_el))
        x = np.concatenate([x_mm[keep] * 1e-3, [self._sentinel[0]]])[None, :]
        z = np.concatenate([z_mm[keep] * 1e-3, [self._sentinel[1]]])[None, :]
        r = np.concatenate([rc[keep], [0.0]])[None, :]
        opt = self._options.copy()
        workers = int(self.probe.workers)
        # pymust splits the scatterers into `workers` chunks (threads); it cannot split fewer.
        if workers > 1 and x.shape[1] >= 4 * workers:
            opt.ParPool = True
            opt.setParPool(workers, "thread")
        else:
            opt.ParPool = False
        with _blas_single_thread():
            rf, _ = self._pm.simus(x, z, r, self.delays[tilt_index].copy(), self.param.copy(), opt)
        rf = np.asarray(rf, dtype=np.float64)
        return rf if n_t is None else self._fit_length(rf)

    def _fit_length(self, rf: np.ndarray) -> np.ndarray:
        """Zero-pad (or crop) RF to n_t samples: the signal beyond SIMUS' own length is zero."""
        if rf.shape[0] == self.n_t:
            return rf
        out = np.zeros((self.n_t, rf.shape[1]))
        k = min(self.n_t, rf.shape[0])
        out[:k] = rf[:k]
        return out

    def _build_das(self):
        """One DAS matrix [pixels, n_t * Nelements] per tilt, stacked side by side and divided by the
        number of tilts, so that compounding is a single sparse product with the stacked I/Q."""
        import scipy.sparse

        mats = []
        for k in range(len(self.tilts)):
            m = self._pm.dasmtx(1j * np.array([self.n_t, int(self.param.Nelements)]), self._x_pix, self._z_pix,
                                self.delays[k].copy(), self.param.copy(), "linear")
            mats.append(scipy.sparse.csr_matrix(m, dtype=np.complex64))
        return (scipy.sparse.hstack(mats, format="csr") * np.complex64(1.0 / len(mats))).astype(np.complex64)

    def _beamform(self, rfs: list[np.ndarray]) -> np.ndarray:
        """RF per tilt -> compounded IQ image [Z, X] complex128 (unnormalised)."""
        p = self.param
        cols = []
        for rf in rfs:
            iq = self._pm.rf2iq(np.ascontiguousarray(rf), p.fs, p.fc, p.bandwidth)
            cols.append(np.asarray(iq).reshape(-1, order="F"))  # fast time first, then element (dasmtx order)
        return (self._das @ np.concatenate(cols).astype(np.complex64)).reshape(self.Z, self.X).astype(np.complex128)

    # -- tissue ----------------------------------------------------------------------------------
    def _tissue_offset_mm(self, frame: int) -> tuple[float, float]:
        dz, dx = self.tissue.displacement_mm([frame])
        return float(dz[0]), float(dx[0])

    def _tissue_key(self, frame: int) -> np.ndarray:
        """Normalised tissue images [2, Z, X] (patterns R1, R2) at a key frame."""
        if frame not in self._keys:
            dz, dx = self._tissue_offset_mm(frame)
            z, x = self._tissue_z + dz, self._tissue_x + dx
            imgs = np.stack([self._beamform([self._simus(z, x, self._tissue_rc[j], k, self.n_t)
                                             for k in range(len(self.tilts))]) for j in range(2)]) / self.ref_peak
            if self._tissue_scale is None:
                rms = float(np.sqrt(np.mean(np.abs(imgs) ** 2)))
                self._tissue_scale = 10.0 ** (self.cfg.clutter_db / 20.0) / max(rms, 1e-300)
            self._keys = {k: v for k, v in self._keys.items() if k >= frame - int(self.probe.tissue_keyframe_every)}
            self._keys[frame] = imgs * self._tissue_scale
        return self._keys[frame]

    def _tissue_frame(self, frame: int) -> np.ndarray:
        phi = float(self.tissue.angle([frame])[0])
        n = int(self.probe.tissue_keyframe_every)
        a = (frame // n) * n
        w = (frame - a) / n
        imgs = self._tissue_key(a)
        if w > 0:
            imgs = (1.0 - w) * imgs + w * self._tissue_key(a + n)
        return math.cos(phi) * imgs[0] + math.sin(phi) * imgs[1]

    # -- frames ----------------------------------------------------------------------------------
    def _bubble_states(self):
        """Per frame: (positions [B, 2] mm, reflectivities [B], gt rows [K, 4]); the same stepping
        sequence as `FlowSimulator.blocks`, so the ground truth equals the fast simulator's."""
        fl = self.flow
        for _ in range(int(self.cfg.n_frames)):
            st = fl.step()
            yield st.positions, np.abs(st.amplitudes).astype(np.float64), st.gt

    def frames(self, progress: Callable[[int, int], None] | None = None):
        T = int(self.cfg.n_frames)
        for f, (pos, rc, gt) in enumerate(self._bubble_states()):
            rfs = [self._simus(pos[:, 0], pos[:, 1], rc, k, self.n_t) for k in range(len(self.tilts))]
            if self._noise_std is not None:
                for rf in rfs:
                    rf += self._rng_noise.standard_normal(rf.shape) * self._noise_std
            img = self._beamform(rfs) / self.ref_peak
            if self._tissue_on:
                img += self._tissue_frame(f)
            if progress is not None:
                progress(f + 1, T)
            yield f, img.astype(np.complex64), gt

    def attrs(self) -> dict:
        cfg = self.cfg
        p = self.param
        return {
            "simulator": "ultrasound_ai.ulm.pymust_sim (pymust SIMUS + rf2iq + delay-and-sum, compounded plane waves)",
            "ulm_sim_version": ULM_SIM_VERSION,
            "sim_mode": PYMUST_MODE,
            "sim_seed": int(cfg.seed),
            "sim_bubbles_per_frame": float(cfg.bubbles_per_frame),
            "sim_clutter_db": "off" if cfg.clutter_db is None else float(cfg.clutter_db),
            "sim_noise_db": "off" if cfg.noise_db is None else float(cfg.noise_db),
            "sim_config": cfg.as_attrs(),
            "sim_db_reference": "mean bubble peak amplitude (0 dB) = peak |IQ| of a unit scatterer at the FOV centre; "
                                "clutter and noise are rms amplitudes over the FOV",
            "sim_n_vessel_segments": int(self.flow.network.n_segments),
            "pymust_version": _pymust_version(),
            "pymust_probe": self.probe.as_attrs(),
            "pymust_param": {"fc_hz": float(p.fc), "c_m_s": float(p.c), "Nelements": int(p.Nelements),
                             "pitch_m": float(p.pitch), "width_m": float(p.width), "kerf_m": float(p.kerf),
                             "bandwidth_percent": float(p.bandwidth), "fs_hz": float(p.fs),
                             "fnumber": float(p.fnumber), "TXnow": float(p.TXnow),
                             "tilts_rad": [float(t) for t in self.tilts], "rf_samples": int(self.n_t)},
            "pymust_n_tissue_scatterers": int(self.n_tissue),
        }


def _pymust_version() -> str:
    try:
        from importlib.metadata import version

        return version("pymust")
    except Exception:  # version lookup is informative only
        return "unknown"


def simulate_pymust_acquisition(config: UlmSimConfig | None = None, progress=None, probe: PymustProbe | None = None,
                                **overrides):
    """Simulate a (short) acquisition in memory with pymust; returns an `Acquisition`."""
    from ultrasound_ai.io.ulm_files import Acquisition

    cfg = dataclasses.replace(config or UlmSimConfig(), **overrides)
    sim = PymustFrameSimulator(cfg, probe)
    frames = np.empty((int(cfg.n_frames), sim.Z, sim.X), np.complex64)
    gts = []
    for f, img, gt in sim.frames(progress):
        frames[f] = img
        gts.append(gt)
    return Acquisition(iq=frames, pixel_size_mm=cfg.pixel_size_mm, origin_mm=cfg.origin_mm,
                       frame_rate_hz=cfg.frame_rate_hz, wavelength_mm=cfg.wavelength_mm,
                       gt_positions=np.concatenate(gts), attrs=sim.attrs(), source="pymust simulated acquisition")


def simulate_pymust_to_file(path, config: UlmSimConfig | None = None, progress=None, probe: PymustProbe | None = None,
                            **overrides):
    """Simulate straight to an acquisition file with pymust, streaming blocks of frames."""
    from ultrasound_ai.io.ulm_files import AcquisitionWriter

    cfg = dataclasses.replace(config or UlmSimConfig(), **overrides)
    sim = PymustFrameSimulator(cfg, probe)
    T = int(cfg.n_frames)
    with AcquisitionWriter(path, (T, sim.Z, sim.X), "iq", pixel_size_mm=cfg.pixel_size_mm, origin_mm=cfg.origin_mm,
                           frame_rate_hz=cfg.frame_rate_hz, wavelength_mm=cfg.wavelength_mm, attrs=sim.attrs()) as w:
        buf, gts, start = [], [], 0
        for f, img, gt in sim.frames(progress):
            buf.append(img)
            gts.append(gt)
            if len(buf) == _WRITE_BLOCK or f == T - 1:
                w.write(start, np.stack(buf))
                w.add_gt_positions(np.concatenate(gts))
                start += len(buf)
                buf, gts = [], []
    return path
