"""Procedural 2-D vessel trees for the ULM simulator (z depth x lateral, mm).

Each tree starts on the border of a box around the field of view with a large radius and grows
smooth tortuous centre lines (the heading's curvature follows an Ornstein-Uhlenbeck process, so
lines bend smoothly rather than jitter). A segment ends after a length proportional to its radius
and splits in two following Murray's law (R^3 = R1^3 + R2^3) with an asymmetric pair of angles;
branches stop below the minimum radius, at a depth limit, or when they leave the box.

The network is stored flat for vectorised bubble advection: every segment is a polyline sampled at
a fixed arclength step `ds_mm`, concatenated into `points` [P, 2] and `normals` [P, 2], with
`offset[v]` / `n_points[v]` locating segment v, its radius, length and children.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class VesselNetwork:
    points: np.ndarray        # [P, 2] centre-line samples (z, x) mm
    normals: np.ndarray       # [P, 2] unit normals (z, x)
    offset: np.ndarray        # [V] first sample of each segment
    n_points: np.ndarray      # [V] samples per segment (>= 2)
    radius_mm: np.ndarray     # [V]
    length_mm: np.ndarray     # [V] arclength (n_points - 1) * ds
    children: np.ndarray      # [V, 2] child segment ids, -1 for none
    ds_mm: float

    @property
    def n_segments(self) -> int:
        return int(self.radius_mm.shape[0])

    def locate(self, seg: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Centre-line point and unit normal at arclength `s` along segments `seg` (vectorised)."""
        u = np.clip(s / self.ds_mm, 0.0, None)
        i = np.minimum(np.floor(u).astype(np.int64), self.n_points[seg] - 2)
        f = (u - i)[:, None]
        k = self.offset[seg] + i
        centre = self.points[k] * (1.0 - f) + self.points[k + 1] * f
        normal = self.normals[k]
        return centre, normal


def _grow_line(rng, start, heading, length, ds, curvature_sd, corr_mm):
    """Sample a smooth random centre line: heading' = kappa, kappa an OU process (rad/mm)."""
    n = max(int(np.ceil(length / ds)), 1) + 1
    a = np.exp(-ds / corr_mm)
    noise = rng.standard_normal(n) * curvature_sd * np.sqrt(1.0 - a * a)
    kappa = np.empty(n)
    k = rng.standard_normal() * curvature_sd
    for j in range(n):  # short scalar recursion; n is a few hundred at most
        k = a * k + noise[j]
        kappa[j] = k
    theta = heading + np.concatenate([[0.0], np.cumsum(kappa[:-1] * ds)])
    steps = np.stack([np.cos(theta), np.sin(theta)], axis=1) * ds
    pts = start + np.concatenate([np.zeros((1, 2)), np.cumsum(steps[:-1], axis=0)], axis=0)
    return pts, theta


def build_vessel_tree(rng: np.random.Generator, box_mm: tuple[float, float, float, float], *,
                      n_trees: int = 4, root_radius_mm: tuple[float, float] = (0.08, 0.2),
                      min_radius_mm: float = 0.01, max_depth: int = 9, ds_mm: float = 0.01,
                      curvature_sd: float = 0.8, curvature_corr_mm: float = 0.4,
                      length_per_radius: tuple[float, float] = (15.0, 40.0),
                      max_segments: int = 600) -> VesselNetwork:
    """Grow `n_trees` branching trees inside box (z_min, z_max, x_min, x_max) in mm."""
    z_min, z_max, x_min, x_max = box_mm
    centre = np.array([(z_min + z_max) / 2, (x_min + x_max) / 2])
    pts_list, nrm_list, radii, kids = [], [], [], []
    stack = []
    for _ in range(n_trees):
        side = rng.integers(4)
        t = rng.uniform(0.1, 0.9)
        start = [np.array([z_min, x_min + t * (x_max - x_min)]), np.array([z_max, x_min + t * (x_max - x_min)]),
                 np.array([z_min + t * (z_max - z_min), x_min]), np.array([z_min + t * (z_max - z_min), x_max])][side]
        to_c = centre - start
        heading = np.arctan2(to_c[1], to_c[0]) + rng.uniform(-0.5, 0.5)
        stack.append((start, heading, rng.uniform(*root_radius_mm), 0, -1, 0))
    while stack and len(radii) < max_segments:
        # Breadth first, so every tree gets its big branches before the segment budget runs out.
        start, heading, radius, depth, parent, slot = stack.pop(0)
        length = np.clip(radius * rng.uniform(*length_per_radius), 0.4, 8.0)
        pts, theta = _grow_line(rng, start, heading, length, ds_mm, curvature_sd, curvature_corr_mm)
        inside = (pts[:, 0] >= z_min) & (pts[:, 0] <= z_max) & (pts[:, 1] >= x_min) & (pts[:, 1] <= x_max)
        left_box = not inside.all()
        if left_box:
            # Cut the line where it leaves the box (keep the part from the start).
            first_out = int(np.argmin(inside)) if inside[0] else 1
            pts, theta = pts[:max(first_out, 2)], theta[:max(first_out, 2)]
        normals = np.stack([-np.sin(theta), np.cos(theta)], axis=1)
        seg = len(radii)
        pts_list.append(pts)
        nrm_list.append(normals)
        radii.append(radius)
        kids.append([-1, -1])
        if parent >= 0:
            kids[parent][slot] = seg
        if left_box or depth >= max_depth:
            continue
        alpha = rng.uniform(0.55, 1.0)  # radius ratio of the smaller child
        r1 = radius / (1.0 + alpha ** 3) ** (1.0 / 3.0)
        r2 = alpha * r1
        sign = rng.choice([-1.0, 1.0])
        end_heading = theta[-1]
        for k, (r, ang) in enumerate(((r1, sign * rng.uniform(0.15, 0.5)), (r2, -sign * rng.uniform(0.5, 1.1)))):
            if r >= min_radius_mm:
                stack.append((pts[-1], end_heading + ang, r, depth + 1, seg, k))
    n_points = np.array([len(p) for p in pts_list], dtype=np.int64)
    offset = np.concatenate([[0], np.cumsum(n_points)[:-1]]).astype(np.int64)
    return VesselNetwork(
        points=np.concatenate(pts_list), normals=np.concatenate(nrm_list), offset=offset, n_points=n_points,
        radius_mm=np.asarray(radii), length_mm=(n_points - 1) * ds_mm, children=np.asarray(kids, dtype=np.int64),
        ds_mm=ds_mm,
    )
