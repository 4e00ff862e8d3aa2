"""The demo model's world: procedural shapes, their captions, and a pixel classifier.

Training, evaluation and the server's tests all read images through this one module, so the
palette, the drawing and the judging of an image cannot drift apart.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from itertools import combinations

import numpy as np
from PIL import Image, ImageDraw

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZE = 64
# Shapes span 20-48 px: below that an 8x-downscaling VAE has too few latents to draw corners.
MIN_SHAPE, MAX_SHAPE = 20, 48

_COLOURS = np.array(list(PALETTE.values()), dtype=np.float32)
_NAMES = list(PALETTE)
# A pixel belongs to the shape when it is nearer the shape's side than half the closest pair of
# palette colours (orange/yellow, 71 apart): the widest margin that still separates every pair.
_SHAPE_DISTANCE = min(float(np.linalg.norm(a - b)) for a, b in combinations(_COLOURS, 2)) / 2


@dataclass(frozen=True)
class Scene:
    """One drawable prompt: what the model is asked for and what a judge expects back."""

    shape: str
    colour: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"


# A word the demo model's tokenizer does not know: the filler of long-prompt training and evaluation.
FILLER = "plain"


def random_scene(rng: np.random.Generator) -> Scene:
    """Draws a scene whose shape and background colours differ."""
    colour, background = rng.choice(len(_NAMES), size=2, replace=False)
    return Scene(SHAPES[rng.integers(len(SHAPES))], _NAMES[colour], _NAMES[background])


# The demo LoRA's style: the shape in the top-left corner, at most this big.
CORNER_SHAPE, CORNER_OFFSET = 36, 4
CORNER_CENTRE = 24  # a judge's bound: a corner drawing's centre is at most 20.5 px from each edge


def draw(scene: Scene, rng: np.random.Generator, corner: bool = False, scale: int = 1) -> np.ndarray:
    """Renders a scene at a random size and position as a 64x64 RGB uint8 array; `corner`: in the
    top-left corner (the demo LoRA's style); `scale`: the same drawing `scale` times as big (the
    demo upscaler's truth), from the same draws of `rng`."""
    return draw_both(scene, rng, corner, scale)[0]


def draw_both(
    scene: Scene, rng: np.random.Generator, corner: bool = False, scale: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """`draw`'s drawing and the shape's outline at the same place, 2 px of white on black (the demo
    ControlNet's control image), from the same draws of `rng`."""
    size = int(rng.integers(MIN_SHAPE, (CORNER_SHAPE if corner else MAX_SHAPE) + 1))
    room = CORNER_OFFSET if corner else SIZE - size + 1
    x0, y0 = (int(v) * scale for v in rng.integers(0, room, size=2))
    x1, y1 = x0 + size * scale - 1, y0 + size * scale - 1
    made = []
    for background, style in ((PALETTE[scene.background], {"fill": PALETTE[scene.colour]}), ("black", OUTLINE)):
        image = Image.new("RGB", (SIZE * scale, SIZE * scale), background)
        pen = ImageDraw.Draw(image)
        if scene.shape == "circle":
            pen.ellipse((x0, y0, x1, y1), **style)
        elif scene.shape == "square":
            pen.rectangle((x0, y0, x1, y1), **style)
        else:
            pen.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], **style)
        made.append(np.asarray(image))
    return made[0], made[1]


OUTLINE = {"outline": "white", "width": 2}  # the demo ControlNet's control image: the shape's outline


def largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (stray specks and halos fall away)."""
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    height, width = mask.shape
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        region, queue = [], deque([start])
        seen[start] = True
        while queue:
            y, x = queue.popleft()
            region.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(region) > len(best):
            best = region
    largest = np.zeros_like(mask)
    if best:
        largest[tuple(np.array(best).T)] = True
    return largest


def _shape(pixels: np.ndarray) -> tuple[np.ndarray, int, int] | None:
    """The shape's pixels (the largest region of its colour), its colour and the background's
    (palette indices), as `classify` finds them; None when there is no shape."""
    rgb = np.asarray(pixels, dtype=np.float32)[..., :3]
    labels = np.argmin(np.linalg.norm(rgb[:, :, None, :] - _COLOURS[None, None], axis=3), axis=2)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    background = int(np.bincount(border, minlength=len(_NAMES)).argmax())
    background_rgb = _COLOURS[background]
    far = np.linalg.norm(rgb - background_rgb, axis=2) > _SHAPE_DISTANCE
    candidates = labels[far & (labels != background)]
    if candidates.size < 16:
        return None
    colour = int(np.bincount(candidates, minlength=len(_NAMES)).argmax())
    return largest_region(labels == colour), colour, background


def classify(pixels: np.ndarray) -> Scene | None:
    """Judges an RGB image: the shape's colour, the background's, and the shape; None if no shape.

    Each pixel takes its nearest palette colour. The background is the border's most common
    colour; the shape's colour is the most common other colour among pixels far from the background,
    and the shape is the largest connected region of that colour. A triangle is much narrower in
    the top quarter of its bounding box than in the bottom quarter; of the rest, a square fills its
    box (1.0) and a circle pi/4 of it, so the midpoint 0.89 splits them.
    """
    found = _shape(pixels)
    if found is None:
        return None
    region, colour, background = found
    rows, cols = np.nonzero(region)
    box = region[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    quarter = max(1, box.shape[0] // 4)
    top, bottom = box[:quarter].sum(axis=1).mean(), box[-quarter:].sum(axis=1).mean()
    shape = "triangle" if top < 0.6 * bottom else "square" if box.mean() > 0.89 else "circle"
    return Scene(shape, _NAMES[colour], _NAMES[background])


def centre(pixels: np.ndarray) -> tuple[float, float] | None:
    """The shape's centre (x, y) in pixels, as `classify` finds the shape; None if there is none.

    The middle of its bounding box, where the drawing placed it: a triangle's mass sits two thirds
    of the way down, so its centre of mass put the demo LoRA's own largest corner triangles outside
    the corner (3 % of its training drawings)."""
    found = _shape(pixels)
    if found is None:
        return None
    rows, cols = np.nonzero(found[0])
    return float(cols.min() + cols.max()) / 2, float(rows.min() + rows.max()) / 2


def in_corner(pixels: np.ndarray) -> bool:
    """Whether an image shows the demo LoRA's style: the shape's centre at most CORNER_CENTRE px
    from the top and the left edge (every corner drawing's is; 7 % of the base world's are)."""
    found = centre(pixels)
    return found is not None and max(found) <= CORNER_CENTRE
