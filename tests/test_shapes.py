"""The demo model's judge: exact on the drawings it was trained on, and robust to specks."""

from __future__ import annotations

import numpy as np

from tools.shapes import PALETTE, Scene, centre, classify, draw, draw_both, random_scene


def test_classifier_reads_every_drawing_right():
    rng = np.random.default_rng(7)
    scenes = [random_scene(rng) for _ in range(300)]
    assert all(classify(draw(scene, rng)) == scene for scene in scenes)


def test_plain_image_has_no_shape():
    assert classify(np.full((64, 64, 3), PALETTE["blue"], dtype=np.uint8)) is None


def test_a_stray_speck_does_not_change_the_shape():
    rng = np.random.default_rng(3)
    scene = Scene("square", "red", "white")
    pixels = draw(scene, rng).copy()
    pixels[1, 30] = PALETTE["red"]  # one speck of the shape's colour far above it
    assert classify(pixels) == scene


def test_an_outline_sits_where_its_drawing_is():
    """The demo ControlNet's control image: the outline of the very shape `draw` makes."""
    for seed in range(50):
        scene = random_scene(np.random.default_rng(seed))
        drawing, outline = draw_both(scene, np.random.default_rng(seed + 1))
        assert (drawing == draw(scene, np.random.default_rng(seed + 1))).all(), "the same draws, the same drawing"
        (x, y), (ox, oy) = centre(drawing), centre(outline)
        assert abs(x - ox) <= 1 and abs(y - oy) <= 1, (scene, (x, y), (ox, oy))
