"""The CompShapes world: a plain background and a few coloured shapes that may move, rendered to frames.

Everything is in pixel units of the rendered clip; rendering is deterministic (no randomness here: scenes
are sampled by `grammar.py` from a seed). Edges are anti-aliased by 4x supersampling.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
}
BACKGROUND = (205, 205, 205)
SHAPES = ("square", "circle", "triangle")
# Words a prompt may use for each shape; the first is the canonical one.
SHAPE_WORDS = {
    "square": ("cube", "square", "block"),
    "circle": ("ball", "sphere", "circle"),
    "triangle": ("triangle", "pyramid"),
}
PLURALS = {
    "cube": "cubes",
    "square": "squares",
    "block": "blocks",
    "ball": "balls",
    "sphere": "spheres",
    "circle": "circles",
    "triangle": "triangles",
    "pyramid": "pyramids",
}
MOTIONS = {"static": (0.0, 0.0), "left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str
    x: float  # centre at the first frame, pixels
    y: float
    size: float  # half-width, pixels
    motion: str = "static"
    distance: float = 0.0  # pixels travelled over the clip

    def centre(self, t: float) -> tuple[float, float]:
        """Centre at clip time t in [0, 1]."""
        dx, dy = MOTIONS[self.motion]
        return self.x + dx * self.distance * t, self.y + dy * self.distance * t


@dataclass(frozen=True)
class Scene:
    things: tuple[Thing, ...]
    frames: int = 17
    height: int = 64
    width: int = 64
    background: tuple[int, int, int] = BACKGROUND

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        things = tuple(Thing(**t) for t in data["things"])
        return cls(things, data["frames"], data["height"], data["width"], tuple(data["background"]))


def _coverage(thing: Thing, cx: float, cy: float, height: int, width: int) -> np.ndarray:
    """Fraction of each pixel covered by the shape centred at (cx, cy): [height, width] in [0, 1]."""
    s = _SUPERSAMPLE
    ys = (np.arange(height * s) + 0.5) / s
    xs = (np.arange(width * s) + 0.5) / s
    dx, dy = xs[None, :] - cx, ys[:, None] - cy
    r = thing.size
    if thing.shape == "square":
        inside = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    elif thing.shape == "circle":
        inside = dx**2 + dy**2 <= r**2
    elif thing.shape == "triangle":  # apex up, base 2r wide at y = cy + r, height 2r
        inside = (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)
    else:
        raise ValueError(f"unknown shape {thing.shape!r}; expected one of {', '.join(SHAPES)}")
    return inside.reshape(height, s, width, s).mean(axis=(1, 3))


def render(scene: Scene) -> np.ndarray:
    """The clip as uint8 frames `[frames, height, width, 3]`; later things are drawn over earlier ones."""
    out = np.empty((scene.frames, scene.height, scene.width, 3), dtype=np.float32)
    for f in range(scene.frames):
        t = f / max(scene.frames - 1, 1)
        frame = np.broadcast_to(np.asarray(scene.background, np.float32), (scene.height, scene.width, 3)).copy()
        for thing in scene.things:
            if thing.colour not in COLOURS:
                raise ValueError(f"unknown colour {thing.colour!r}; expected one of {', '.join(COLOURS)}")
            alpha = _coverage(thing, *thing.centre(t), scene.height, scene.width)[..., None]
            frame = frame * (1 - alpha) + np.asarray(COLOURS[thing.colour], np.float32) * alpha
        out[f] = frame
    return (out + 0.5).astype(np.uint8)
