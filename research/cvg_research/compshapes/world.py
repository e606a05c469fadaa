"""The CompShapes world: a plain background and a few coloured shapes that may move, rendered to frames.

Everything is in pixel units of the rendered clip; rendering is deterministic (no randomness here: scenes
are sampled by `grammar.py` from a seed). Edges are anti-aliased by 4x supersampling.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# CompShapes v2: eight colours around the hue circle, each at least 90 RGB units from every other and from
# the background, so the judge's nearest-colour detection stays unambiguous.
COLOURS = {
    "red": (220, 40, 40),
    "orange": (245, 130, 20),
    "yellow": (230, 220, 40),
    "green": (40, 170, 60),
    "cyan": (30, 190, 200),
    "blue": (40, 80, 220),
    "purple": (140, 50, 190),
    "pink": (235, 90, 180),
}
# Words a prompt may use for each colour and shape; the first is the canonical one. The others are
# paraphrases the text encoder has to generalise over (each also appears in training with other shapes).
COLOUR_WORDS = {
    "red": ("red", "crimson", "scarlet"),
    "orange": ("orange", "tangerine", "amber"),
    "yellow": ("yellow", "golden", "lemon"),
    "green": ("green", "emerald", "lime"),
    "cyan": ("cyan", "turquoise", "teal"),
    "blue": ("blue", "azure", "cobalt"),
    "purple": ("purple", "violet", "plum"),
    "pink": ("pink", "magenta", "rose"),
}
BACKGROUND = (205, 205, 205)
SHAPES = ("square", "circle", "triangle", "diamond", "cross")
SHAPE_WORDS = {
    "square": ("cube", "square", "block", "box"),
    "circle": ("ball", "sphere", "circle", "disc"),
    "triangle": ("triangle", "pyramid", "cone"),
    "diamond": ("diamond", "rhombus", "lozenge"),
    "cross": ("cross", "plus"),
}
PLURALS = {
    "cube": "cubes",
    "square": "squares",
    "block": "blocks",
    "box": "boxes",
    "ball": "balls",
    "sphere": "spheres",
    "circle": "circles",
    "disc": "discs",
    "triangle": "triangles",
    "pyramid": "pyramids",
    "cone": "cones",
    "diamond": "diamonds",
    "rhombus": "rhombuses",
    "lozenge": "lozenges",
    "cross": "crosses",
    "plus": "pluses",
}
WORD_TO_COLOUR = {w: c for c, words in COLOUR_WORDS.items() for w in words}
WORD_TO_SHAPE = {w: s for s, words in SHAPE_WORDS.items() for w in words} | {
    PLURALS[w]: s for s, words in SHAPE_WORDS.items() for w in words
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
    inside = shape_mask(thing.shape, dx, dy, thing.size)
    return inside.reshape(height, s, width, s).mean(axis=(1, 3))


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Whether each offset (dx, dy) from a shape's centre lies inside it. Every shape fills the box of
    half-width `r` around its centre edge to edge, so a detection's box gives its centre and size."""
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "square":
        return (ax <= r) & (ay <= r)
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "triangle":  # apex up, base 2r wide at y = cy + r, height 2r
        return (dy <= r) & (dy >= -r) & (ax <= (dy + r) / 2)
    if shape == "diamond":
        return ax + ay <= r
    if shape == "cross":  # arms 2r long and 2r/3 wide
        arm = r / 3
        return ((ax <= arm) & (ay <= r)) | ((ay <= arm) & (ax <= r))
    raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")


def render(scene: Scene, frames: range | None = None) -> np.ndarray:
    """The clip as uint8 frames `[frames, height, width, 3]` (only those in `frames` if given, e.g. a
    training window); later things are drawn over earlier ones."""
    frames = range(scene.frames) if frames is None else frames
    out = np.empty((len(frames), scene.height, scene.width, 3), dtype=np.float32)
    for i, f in enumerate(frames):
        t = f / max(scene.frames - 1, 1)
        frame = np.broadcast_to(np.asarray(scene.background, np.float32), (scene.height, scene.width, 3)).copy()
        for thing in scene.things:
            if thing.colour not in COLOURS:
                raise ValueError(f"unknown colour {thing.colour!r}; expected one of {', '.join(COLOURS)}")
            alpha = _coverage(thing, *thing.centre(t), scene.height, scene.width)[..., None]
            frame = frame * (1 - alpha) + np.asarray(COLOURS[thing.colour], np.float32) * alpha
        out[i] = frame
    return (out + 0.5).astype(np.uint8)
