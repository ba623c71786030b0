"""Draw the extension icon, Resources/Icons/UltrasoundAI.png (128x128 RGBA).

A linear probe emits a sector-shaped ultrasound fan (with scan lines and a few speckle echoes)
that sweeps into a wire-frame 3D volume: freehand 3D ultrasound in one picture. Drawn at 4x and
downsampled so the edges are anti-aliased.

    python Resources/Icons/make_icon.py [OUT.png]
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 128
SCALE = 4  # supersampling factor

NAVY = (20, 42, 82, 255)
TEAL = (0, 168, 176, 255)
FAN_IN = (120, 230, 235)
FAN_OUT = (10, 70, 110)
PROBE = (235, 240, 245, 255)
PROBE_EDGE = (40, 60, 90, 255)
CUBE = (255, 190, 60, 255)


def _s(v: float) -> int:
    return int(round(v * SCALE))


def _pt(x: float, y: float) -> tuple[int, int]:
    return (_s(x), _s(y))


def draw_icon() -> Image.Image:
    n = SIZE * SCALE
    img = Image.new("RGBA", (n, n), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)

    # Rounded dark tile so the icon reads on light and dark Slicer themes alike.
    d.rounded_rectangle([_s(2), _s(2), _s(126), _s(126)], radius=_s(22), fill=NAVY)

    # 3D volume behind the fan: an oblique-projection wire cube.
    ox, oy, side, depth = 44.0, 52.0, 58.0, 20.0
    front = [(ox, oy), (ox + side, oy), (ox + side, oy + side), (ox, oy + side)]
    back = [(x + depth, y - depth) for x, y in front]
    for a, b in zip(back, back[1:] + back[:1]):
        d.line([_pt(*a), _pt(*b)], fill=CUBE, width=_s(2.2))
    for a, b in zip(front, back):
        d.line([_pt(*a), _pt(*b)], fill=CUBE, width=_s(2.2))

    # Sector fan: radial gradient, brighter near the probe, as a B-mode image fades with depth.
    apex = (40.0, 30.0)
    r_max = 88.0
    a0, a1 = math.radians(25.0), math.radians(85.0)  # fan points down-right, into the volume
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / SCALE
    dx, dy = xx - apex[0], yy - apex[1]
    r = np.hypot(dx, dy)
    ang = np.arctan2(dy, dx)
    inside = (r >= 10.0) & (r <= r_max) & (ang >= a0) & (ang <= a1)
    t = np.clip((r - 10.0) / (r_max - 10.0), 0.0, 1.0)[..., None]
    colour = (1.0 - t) * np.array(FAN_IN, np.float32) + t * np.array(FAN_OUT, np.float32)
    # A few bright echoes (a vessel wall), deterministic so the icon is reproducible.
    rng = np.random.default_rng(7)
    speckle = rng.random((n, n)).astype(np.float32)
    colour *= (0.85 + 0.3 * speckle)[..., None]
    echo = np.abs(r - 58.0) < 2.2
    colour[echo & inside] = (255.0, 255.0, 255.0)
    fan = np.zeros((n, n, 4), np.float32)
    fan[..., :3] = np.clip(colour, 0, 255)
    fan[..., 3] = np.where(inside, 235.0, 0.0)
    img = Image.alpha_composite(img, Image.fromarray(fan.astype(np.uint8), "RGBA"))
    d = ImageDraw.Draw(img)

    # The volume's front face passes in front of the fan, half transparent, so the fan sits inside it.
    for a, b in zip(front, front[1:] + front[:1]):
        d.line([_pt(*a), _pt(*b)], fill=CUBE[:3] + (200,), width=_s(2.2))

    # Scan lines across the fan.
    for k in range(7):
        a = a0 + (a1 - a0) * k / 6
        p0 = (apex[0] + 12 * math.cos(a), apex[1] + 12 * math.sin(a))
        p1 = (apex[0] + r_max * math.cos(a), apex[1] + r_max * math.sin(a))
        d.line([_pt(*p0), _pt(*p1)], fill=(255, 255, 255, 70), width=_s(0.8))
    # Fan outline.
    d.arc(
        [_s(apex[0] - r_max), _s(apex[1] - r_max), _s(apex[0] + r_max), _s(apex[1] + r_max)],
        start=math.degrees(a0), end=math.degrees(a1), fill=TEAL, width=_s(2.5),
    )
    for a in (a0, a1):
        d.line([_pt(apex[0] + 10 * math.cos(a), apex[1] + 10 * math.sin(a)),
                _pt(apex[0] + r_max * math.cos(a), apex[1] + r_max * math.sin(a))], fill=TEAL, width=_s(2.5))

    # The probe: a rounded handle whose face sits on the fan's apex, tilted along the fan axis.
    axis = (a0 + a1) / 2
    ux, uy = math.cos(axis), math.sin(axis)  # along the beam
    vx, vy = -uy, ux  # across the probe face
    def probe_point(along: float, across: float) -> tuple[int, int]:
        return _pt(apex[0] + along * ux + across * vx, apex[1] + along * uy + across * vy)
    body = [probe_point(10, -11), probe_point(10, 11), probe_point(-8, 9), probe_point(-26, 5),
            probe_point(-26, -5), probe_point(-8, -9)]
    d.polygon(body, fill=PROBE, outline=PROBE_EDGE, width=_s(1.5))
    d.line([probe_point(10, -11), probe_point(10, 11)], fill=TEAL, width=_s(3))  # the transducer face
    d.line([probe_point(-22, 0), probe_point(-31, 0)], fill=PROBE_EDGE, width=_s(3))  # the cable

    return img.resize((SIZE, SIZE), Image.LANCZOS)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else Path(__file__).with_name("UltrasoundAI.png")
    # Imported here so the drawing code has no dependency on the engine package.
    from ultrasound_ai.core.atomic import atomic_output

    with atomic_output(out) as tmp:
        draw_icon().save(tmp, format="PNG", optimize=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
