"""The network preprocessors: depth and pose maps made by transformers models from PREPROCESSOR_DIR,
drawn as the ControlNets trained on them read them (preprocessors.py has the model-free ones).

Why transformers and not controlnet_aux (the annotators A1111's extension and diffusers' examples
use): controlnet_aux imports torchvision and timm when it is imported, and PyPI's torchvision does
not load against the CPU torch this server pins. transformers runs the same networks (Depth
Anything, DPT; ViTPose for pose) from folders `save_pretrained` writes. The OpenPose drawing is
written here: it is a fixed table of limbs and colours (the one every OpenPose ControlNet was
trained on), which only controlnet_aux ships.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import transformers
from PIL import Image

# OpenPose's 18 body points, in its order, as COCO's 17 keypoints (ViTPose's) give them; the neck,
# which COCO lacks, is between the shoulders.
NECK = -1
OPENPOSE_FROM_COCO = (0, NECK, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
# OpenPose's limbs (pairs of its points) and its colours, point by point and limb by limb.
LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)  # fmt: skip
COLOURS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip
# A keypoint less sure than this is left out of the drawing (OpenPose draws only what it found).
KEYPOINT_SCORE = 0.3
STICK_WIDTH = 4

Annotator = Callable[[Image.Image], Image.Image]


def draw_pose(size: tuple[int, int], points: np.ndarray, scores: np.ndarray) -> Image.Image:
    """COCO keypoints (x, y in pixels) drawn as OpenPose draws a body on black: each limb an
    ellipse in its colour at 60 %, each point a dot in its own."""
    openpose = np.zeros((18, 2), np.float32)
    found = np.zeros(18, bool)
    for index, coco in enumerate(OPENPOSE_FROM_COCO):
        if coco == NECK:
            found[index] = bool(scores[5] >= KEYPOINT_SCORE and scores[6] >= KEYPOINT_SCORE)
            openpose[index] = (points[5] + points[6]) / 2
        else:
            found[index] = bool(scores[coco] >= KEYPOINT_SCORE)
            openpose[index] = points[coco]
    canvas = np.zeros((size[1], size[0], 3), np.uint8)
    for (first, second), colour in zip(LIMBS, COLOURS, strict=False):
        if not (found[first] and found[second]):
            continue
        limb = canvas.copy()
        (x1, y1), (x2, y2) = openpose[first], openpose[second]
        length = float(np.hypot(x1 - x2, y1 - y2))
        angle = float(np.degrees(np.arctan2(y1 - y2, x1 - x2)))
        centre = (int((x1 + x2) / 2), int((y1 + y2) / 2))
        polygon = cv2.ellipse2Poly(centre, (int(length / 2), STICK_WIDTH), int(angle), 0, 360, 1)
        cv2.fillConvexPoly(limb, polygon, colour)
        canvas = cv2.addWeighted(canvas, 0.4, limb, 0.6, 0)
    for index, colour in enumerate(COLOURS):
        if found[index]:
            cv2.circle(canvas, (int(openpose[index][0]), int(openpose[index][1])), 4, colour, thickness=-1)
    return Image.fromarray(canvas)


class Depth:
    """A depth-estimation model (Depth Anything, DPT, ...): its relative depth, scaled so the
    nearest point is white and the farthest black, as depth ControlNets read it."""

    def __init__(self, path: Path, device: str, dtype: torch.dtype) -> None:
        self.processor = transformers.AutoImageProcessor.from_pretrained(path, backend="pil")
        self.model = transformers.AutoModelForDepthEstimation.from_pretrained(path, dtype=dtype).to(device).eval()

    @torch.inference_mode()
    def __call__(self, image: Image.Image) -> Image.Image:
        inputs = self.processor(images=image, return_tensors="pt").to(self.model.device, self.model.dtype)
        outputs = self.model(**inputs)
        sized = self.processor.post_process_depth_estimation(outputs, target_sizes=[(image.height, image.width)])
        depth = sized[0]["predicted_depth"].float()
        low, high = depth.min(), depth.max()
        scaled = (depth - low) / (high - low) if high > low else torch.zeros_like(depth)
        return Image.fromarray((scaled * 255).round().byte().cpu().numpy()).convert("RGB")


class Pose:
    """A ViTPose model: the body of the one person the image shows (ViTPose finds a person's
    keypoints inside a box; the box is the whole image), drawn as OpenPose's skeleton."""

    def __init__(self, path: Path, device: str, dtype: torch.dtype) -> None:
        self.processor = transformers.AutoImageProcessor.from_pretrained(path, backend="pil")
        self.model = transformers.VitPoseForPoseEstimation.from_pretrained(path, dtype=dtype).to(device).eval()

    @torch.inference_mode()
    def __call__(self, image: Image.Image) -> Image.Image:
        boxes = [[[0.0, 0.0, float(image.width), float(image.height)]]]  # COCO's x, y, width, height
        inputs = self.processor(image, boxes=boxes, return_tensors="pt").to(self.model.device, self.model.dtype)
        extra: dict[str, Any] = {}
        if getattr(self.model.config.backbone_config, "num_experts", 1) > 1:  # ViTPose+: COCO's expert
            extra["dataset_index"] = torch.zeros(1, dtype=torch.long, device=self.model.device)
        outputs = self.model(**inputs, **extra)
        person = self.processor.post_process_pose_estimation(outputs, boxes=boxes)[0][0]
        return draw_pose(image.size, person["keypoints"].float().cpu().numpy(), person["scores"].float().cpu().numpy())


# Each network preprocessor's loader, by name (preprocessors.NETWORKS says what its folder holds).
LOADERS: dict[str, Callable[[Path, str, torch.dtype], Annotator]] = {"depth": Depth, "pose": Pose}


def load(name: str, path: Path, device: str, dtype: torch.dtype) -> Annotator:
    """The preprocessor's network from its folder, on the device, in the dtype."""
    return LOADERS[name](path, device, dtype)
