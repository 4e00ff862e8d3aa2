"""The demo model's judge: exact on the drawings it was trained on, and robust to specks."""

from __future__ import annotations

import numpy as np

from tools.shapes import PALETTE, Scene, classify, draw, random_scene


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
