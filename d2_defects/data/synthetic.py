"""Deterministic procedural defect dataset, modelled on the industrial inspection competitions.

Two acquisition environments (like the bottle data): small RGB images and larger grayscale images in a
4:1 count ratio, on textured backgrounds (noise, gradients, stripes, vignetting).  About a quarter of the
images are normal (no defect).  Six defect classes with distinct appearance and a skewed frequency:
thin scratches and long cracks (extreme aspect ratios), tiny spots (< 16 px), stains, bubbles and rare
holes; some defects overlap.

Each image is drawn from its own ``numpy`` generator seeded by ``(seed, split, index)``, so the output is
identical for a seed whatever the order or number of images written before it.

Preset ``"large"`` (``datasets/prepare_synthetic_defects.py --preset large``): the same classes on 2048x1536
grayscale and 1600x1200 RGB images, with small defects (about 4-40 px), a quarter of the images normal; the data
of sliced inference (docs/slicing.md).
"""
import math
import os

import cv2
import numpy as np
from tqdm import tqdm

from ..utils.masks import encode_mask
from ..utils.errors import UsageError
from ..utils.fileio import atomic_write_json

# name, relative frequency, competition-style weight (weights sum to 1)
CLASSES = (
    ("scratch", 0.26, 0.15),
    ("crack", 0.13, 0.20),
    ("spot", 0.30, 0.10),
    ("stain", 0.17, 0.10),
    ("bubble", 0.09, 0.20),
    ("hole", 0.05, 0.25),
)
CLASS_NAMES = tuple(c[0] for c in CLASSES)
CLASS_WEIGHTS = tuple(c[2] for c in CLASSES)
# COCO category ids deliberately do not start at 0 or 1 and are not contiguous, like real exports.
CATEGORY_IDS = (1, 2, 3, 5, 7, 9)

# (name, width, height, grayscale, relative count)
ENVIRONMENTS = (("rgb_small", 256, 192, False, 4), ("gray_large", 512, 384, True, 1))
# Presets: "default" (the demo's data: defect sizes scale with the image width / 256) and "large" (large images
# with small defects, about 4-40 px, for sliced inference: defect scale fixed at 0.45 of the default's 256-px sizes).
PRESETS = {
    "default": {"dirname": "synthetic_defects", "environments": ENVIRONMENTS, "defect_scale": None,
                "num_images": 1000, "code": None},
    "large": {"dirname": "synthetic_defects_large",
              "environments": (("gray_xlarge", 2048, 1536, True, 1), ("rgb_large", 1600, 1200, False, 1)),
              "defect_scale": 0.45, "num_images": 400, "code": 1},
}
NORMAL_FRACTION = 0.25
SPLIT_CODES = {"train": 1, "val": 2, "test": 3}


def _background(rng, w, h, gray):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(90, 170)
    img = np.full((h, w), base, np.float32)
    # linear gradient in a random direction
    ang = rng.uniform(0, 2 * math.pi)
    img += rng.uniform(0, 40) * ((xx / w - 0.5) * math.cos(ang) + (yy / h - 0.5) * math.sin(ang))
    # faint stripes (fabric / brushed metal)
    if rng.random() < 0.6:
        period = rng.uniform(4, 14)
        sang = rng.uniform(0, math.pi)
        img += rng.uniform(2, 8) * np.sin(2 * math.pi * (xx * math.cos(sang) + yy * math.sin(sang)) / period)
    # vignetting
    if rng.random() < 0.5:
        r2 = ((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2
        img *= 1.0 - rng.uniform(0.1, 0.35) * r2 / 2
    img += rng.normal(0, rng.uniform(2, 6), img.shape)
    if gray:
        return img[..., None]
    tint = rng.uniform(0.85, 1.15, size=3).astype(np.float32)
    return img[..., None] * tint[None, None, :]


def _color(gray, rgb, rng):
    c = np.asarray(rgb, np.float32) + rng.normal(0, 8, 3)
    return (float(c.mean()),) if gray else tuple(float(v) for v in c)


def _draw_defect(rng, img, cls, w, h, gray, scale=None, canvas=None):
    """Draw one defect of class ``cls`` on ``img`` (float32 HxWxC, in place); return its XYXY box. ``scale``
    multiplies the defect sizes (default: the image width / 256). ``canvas`` (float32 HxW zeros, or None): the same
    shapes are drawn on it with value 1 (its coverage of each pixel); it draws nothing random, so the image and
    the box do not depend on it."""
    scale = w / 256.0 if scale is None else scale
    if canvas is None:
        canvas = np.zeros((1, 1), np.float32)  # drawing off the canvas is a no-op
    if cls == "scratch":  # thin bright straight line, extreme aspect ratio
        length = rng.uniform(30, 90) * scale
        ang = rng.choice([rng.uniform(-0.25, 0.25), rng.uniform(math.pi / 2 - 0.25, math.pi / 2 + 0.25)])
        cx, cy = rng.uniform(0.1 * w, 0.9 * w), rng.uniform(0.1 * h, 0.9 * h)
        dx, dy = math.cos(ang) * length / 2, math.sin(ang) * length / 2
        p0 = (cx - dx, cy - dy)
        p1 = (cx + dx, cy + dy)
        pts = np.array([p0, p1])
        thickness = max(1, int(round(scale)))
        cv2.line(img, _pt(p0), _pt(p1), _color(gray, (235, 235, 245), rng), thickness, cv2.LINE_AA)
        cv2.line(canvas, _pt(p0), _pt(p1), 1.0, thickness, cv2.LINE_AA)
        pad = 1.5
    elif cls == "crack":  # long dark jagged polyline
        n = rng.integers(5, 9)
        length = rng.uniform(50, 110) * scale
        ang = rng.uniform(0, math.pi)
        cx, cy = rng.uniform(0.15 * w, 0.85 * w), rng.uniform(0.15 * h, 0.85 * h)
        t = np.linspace(-0.5, 0.5, n) * length
        jitter = rng.normal(0, 3 * scale, n)
        xs = cx + t * math.cos(ang) - jitter * math.sin(ang)
        ys = cy + t * math.sin(ang) + jitter * math.cos(ang)
        pts = np.stack([xs, ys], 1)
        thickness = max(2, int(round(2 * scale)))
        line = [np.round(pts * 4).astype(np.int32)]
        cv2.polylines(img, line, False, _color(gray, (25, 20, 20), rng), thickness, cv2.LINE_AA, shift=2)
        cv2.polylines(canvas, line, False, 1.0, thickness, cv2.LINE_AA, shift=2)
        pad = 2.0
    elif cls == "spot":  # tiny dark dot, often < 16 px
        r = rng.uniform(2, 5) * scale
        cx, cy = rng.uniform(r + 2, w - r - 2), rng.uniform(r + 2, h - r - 2)
        cv2.circle(img, _pt((cx, cy), 4), int(round(r * 4)), _color(gray, (30, 30, 60), rng), -1, cv2.LINE_AA, shift=2)
        cv2.circle(canvas, _pt((cx, cy), 4), int(round(r * 4)), 1.0, -1, cv2.LINE_AA, shift=2)
        pts = np.array([[cx - r, cy - r], [cx + r, cy + r]])
        pad = 0.5
    elif cls == "stain":  # larger soft coloured blob
        rx, ry = rng.uniform(8, 22) * scale, rng.uniform(6, 16) * scale
        cx, cy = rng.uniform(rx, w - rx), rng.uniform(ry, h - ry)
        mask = np.zeros(img.shape[:2], np.float32)
        cv2.ellipse(mask, _pt((cx, cy)), (int(rx), int(ry)), rng.uniform(0, 180), 0, 360, 1.0, -1)
        mask = cv2.GaussianBlur(mask, (0, 0), max(1.0, rx / 4))
        col = np.array(_color(gray, (140, 90, 40), rng), np.float32)
        a = 0.75 * mask[..., None]
        img[:] = img * (1 - a) + col[None, None, :] * a
        if canvas.shape == mask.shape:
            canvas[mask > 0.15] = 1.0  # the pixels the box is drawn around
        ys, xs = np.nonzero(mask > 0.15)
        pts = np.stack([xs, ys], 1) if len(xs) else np.array([[cx, cy], [cx + 1, cy + 1]])
        pad = 0.5
    elif cls == "bubble":  # bright ring with dark centre
        r = rng.uniform(6, 14) * scale
        cx, cy = rng.uniform(r + 2, w - r - 2), rng.uniform(r + 2, h - r - 2)
        thickness = max(2, int(round(2 * scale)))
        cv2.circle(img, _pt((cx, cy), 4), int(round(r * 4)), _color(gray, (250, 250, 250), rng), thickness,
                   cv2.LINE_AA, shift=2)
        cv2.circle(img, _pt((cx, cy), 4), int(round(r * 0.3 * 4)), _color(gray, (200, 220, 250), rng), -1,
                   cv2.LINE_AA, shift=2)
        cv2.circle(canvas, _pt((cx, cy), 4), int(round(r * 4)), 1.0, thickness, cv2.LINE_AA, shift=2)
        cv2.circle(canvas, _pt((cx, cy), 4), int(round(r * 0.3 * 4)), 1.0, -1, cv2.LINE_AA, shift=2)
        pts = np.array([[cx - r, cy - r], [cx + r, cy + r]])
        pad = 1.5
    elif cls == "hole":  # black disc with a bright rim, rare
        r = rng.uniform(5, 11) * scale
        cx, cy = rng.uniform(r + 3, w - r - 3), rng.uniform(r + 3, h - r - 3)
        cv2.circle(img, _pt((cx, cy), 4), int(round((r + 2) * 4)), _color(gray, (225, 225, 200), rng), -1,
                   cv2.LINE_AA, shift=2)
        cv2.circle(img, _pt((cx, cy), 4), int(round(r * 4)), (5.0,) * img.shape[2], -1, cv2.LINE_AA, shift=2)
        cv2.circle(canvas, _pt((cx, cy), 4), int(round((r + 2) * 4)), 1.0, -1, cv2.LINE_AA, shift=2)
        r = r + 2
        pts = np.array([[cx - r, cy - r], [cx + r, cy + r]])
        pad = 0.5
    else:  # pragma: no cover - CLASSES is fixed
        raise ValueError(cls)
    x0, y0 = pts.min(0) - pad
    x1, y1 = pts.max(0) + pad
    return [float(np.clip(x0, 0, w)), float(np.clip(y0, 0, h)), float(np.clip(x1, 0, w)), float(np.clip(y1, 0, h))]


def _pt(p, mult=1):
    return (int(round(p[0] * mult)), int(round(p[1] * mult)))


def render_image(seed, split, index, preset="default", masks=False):
    """
    Render one image of a preset (:data:`PRESETS`).

    Args:
        masks (bool): also return each defect's mask. The image and the boxes are the same either way.

    Returns:
        image (ndarray): uint8, HxWx3 (RGB environment, BGR order) or HxW (grayscale environment)
        env (str): environment name
        anns (list[(class_index, [x0, y0, x1, y1])]): boxes in absolute XYXY pixels; with ``masks``,
            ``(class_index, box, mask)`` where ``mask`` (bool HxW) holds the pixels the defect's shapes cover by
            at least half (the stain: its blended area, the pixels its box is drawn around), cut to the
            pixels whose centre lies in the box. Masks of overlapping defects overlap (each is the whole shape).
    """
    p = _preset(preset)
    key = [seed, SPLIT_CODES.get(split, 0), index] + ([p["code"]] if p["code"] is not None else [])
    rng = np.random.default_rng(key)
    envs = p["environments"]
    counts = np.array([e[4] for e in envs], np.float64)
    env = envs[rng.choice(len(envs), p=counts / counts.sum())]
    name, w, h, gray, _ = env
    img = _background(rng, w, h, gray)
    anns = []
    if rng.random() >= NORMAL_FRACTION:
        freqs = np.array([c[1] for c in CLASSES])
        n = int(rng.choice([1, 1, 1, 2, 2, 3, 4]))
        for _ in range(n):
            c = int(rng.choice(len(CLASSES), p=freqs / freqs.sum()))
            canvas = np.zeros((h, w), np.float32) if masks else None
            box = _draw_defect(rng, img, CLASS_NAMES[c], w, h, gray, p["defect_scale"], canvas)
            if box[2] - box[0] >= 1 and box[3] - box[1] >= 1:
                anns.append((c, box, _cut_to_box(canvas >= 0.5, box)) if masks else (c, box))
    img = np.clip(img, 0, 255).astype(np.uint8)
    if gray:
        img = img[..., 0]
    return img, name, anns


def _cut_to_box(mask, box):
    """``mask`` with the pixels whose centre lies outside the XYXY ``box`` cleared (the mask stays in its box)."""
    x0, y0, x1, y1 = box
    cols = (np.arange(mask.shape[1]) + 0.5 >= x0) & (np.arange(mask.shape[1]) + 0.5 <= x1)
    rows = (np.arange(mask.shape[0]) + 0.5 >= y0) & (np.arange(mask.shape[0]) + 0.5 <= y1)
    return mask & rows[:, None] & cols[None, :]


def _preset(name):
    if name not in PRESETS:
        raise UsageError(f"unknown synthetic preset {name!r}; use one of {sorted(PRESETS)}")
    return PRESETS[name]


def generate_split(out_dir, split, num_images, seed=0, progress=True, preset="default", masks=True):
    """
    Write ``num_images`` images to ``out_dir/<split>/`` and the COCO json
    ``out_dir/annotations/instances_<split>.json``; with ``masks``, every annotation has its defect's mask
    (``segmentation``, compressed RLE; see :func:`render_image`). ``area`` is the box's area either way, so that
    box AP's size ranges do not depend on the masks.

    Returns:
        str: path of the COCO json.
    """
    img_dir = os.path.join(out_dir, split)
    ann_dir = os.path.join(out_dir, "annotations")
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(ann_dir, exist_ok=True)
    images, annotations = [], []
    ann_id = 1
    for i in tqdm(range(num_images), desc=f"synthetic {split}", disable=not progress):
        img, env, anns = render_image(seed, split, i, preset, masks=masks)
        file_name = f"{split}_{i:06d}.png"
        cv2.imwrite(os.path.join(img_dir, file_name), img)
        images.append(
            {"id": i + 1, "file_name": file_name, "width": img.shape[1], "height": img.shape[0], "environment": env}
        )
        for c, (x0, y0, x1, y1), *mask in anns:
            bw, bh = x1 - x0, y1 - y0
            ann = {
                "id": ann_id,
                "image_id": i + 1,
                "category_id": CATEGORY_IDS[c],
                "bbox": [round(x0, 2), round(y0, 2), round(bw, 2), round(bh, 2)],
                "area": round(bw * bh, 2),
                "iscrowd": 0,
            }
            if mask:
                ann["segmentation"] = encode_mask(mask[0])
            annotations.append(ann)
            ann_id += 1
    coco = {
        "info": {"description": "d2_defects synthetic defects", "seed": seed, "split": split, "preset": preset},
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": cid, "name": name, "weight": weight}
            for cid, name, weight in zip(CATEGORY_IDS, CLASS_NAMES, CLASS_WEIGHTS)
        ],
    }
    json_file = os.path.join(ann_dir, f"instances_{split}.json")
    atomic_write_json(json_file, coco)
    return json_file


def generate_dataset(out_dir, num_images=1000, seed=0, val_fraction=0.2, progress=True, preset="default",
                     masks=True):
    """
    Generate the train and val splits (``num_images`` in total) of a preset (:data:`PRESETS`) under ``out_dir``
    (``masks``: see :func:`generate_split`).

    Returns:
        dict: split name -> path of its COCO json
    """
    num_val = int(round(num_images * val_fraction))
    return {
        "train": generate_split(out_dir, "train", num_images - num_val, seed, progress, preset, masks),
        "val": generate_split(out_dir, "val", num_val, seed, progress, preset, masks),
    }
