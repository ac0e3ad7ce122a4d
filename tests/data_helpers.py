"""Small hand-written fixtures in every annotation format (used by the dataset tests)."""
import json
import logging
import os

import numpy as np
from PIL import Image

CLASSES = ["瓶盖破损", "scratch", "背景"]
# image name -> (width, height, [(class, x0, y0, x1, y1)]) in continuous pixel coordinates
GT = {
    "img_a": (64, 48, [("瓶盖破损", 4, 5, 20, 17), ("scratch", 30, 2, 34, 40)]),
    "img_b": (80, 60, [("背景", 0, 0, 80, 60), ("瓶盖破损", 50, 30, 70, 52)]),
    "img_c": (64, 48, []),  # normal image
    "img_d": (80, 60, [("scratch", 10, 10, 22, 13), ("背景", 1, 1, 9, 9), ("瓶盖破损", 60, 5, 79, 21)]),
    "img_e": (64, 48, [("背景", 2, 2, 60, 40)]),  # only background: becomes a normal image
}


def write_images(folder, ext=".png", seed=0):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.RandomState(seed)
    for name, (w, h, _) in GT.items():
        arr = rng.randint(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(os.path.join(folder, name + ext))


def write_voc_by_hand(folder, ext=".png", with_extension=True):
    """NEU-DET-like XMLs (1-based corners), written as text so that the reader is tested on real XML."""
    os.makedirs(folder, exist_ok=True)
    for name, (w, h, boxes) in GT.items():
        objs = "".join(
            f"<object><name>{c}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult>"
            f"<bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
            for c, x0, y0, x1, y1 in boxes
        )
        fname = name + ext if with_extension else name
        xml = (f"<annotation><folder>IMAGES</folder><filename>{fname}</filename><source><database>x</database>"
               f"</source><size><width>{w}</width><height>{h}</height><depth>3</depth></size>"
               f"<segmented>0</segmented>{objs}</annotation>")
        with open(os.path.join(folder, name + ".xml"), "w", encoding="utf-8") as f:
            f.write(xml)


def write_yolo_by_hand(folder):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "classes.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(CLASSES) + "\n")
    for name, (w, h, boxes) in GT.items():
        if not boxes:
            continue  # normal image: no label file
        with open(os.path.join(folder, name + ".txt"), "w", encoding="utf-8") as f:
            for c, x0, y0, x1, y1 in boxes:
                f.write(f"{CLASSES.index(c)} {(x0 + x1) / 2 / w} {(y0 + y1) / 2 / h} {(x1 - x0) / w} {(y1 - y0) / h}\n")


def write_labelme_by_hand(folder, image_dir, ext=".png"):
    os.makedirs(folder, exist_ok=True)
    for name, (w, h, boxes) in GT.items():
        shapes = []
        for k, (c, x0, y0, x1, y1) in enumerate(boxes):
            if k % 2:  # polygons too
                pts = [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]
                shapes.append({"label": c, "points": pts, "shape_type": "polygon"})
            else:
                shapes.append({"label": c, "points": [[x1, y1], [x0, y0]], "shape_type": "rectangle"})
        d = {"version": "5.0.1", "shapes": shapes, "imageData": None, "imageWidth": w, "imageHeight": h,
             "imagePath": os.path.relpath(os.path.join(image_dir, name + ext), folder)}
        with open(os.path.join(folder, name + ".json"), "w", encoding="utf-8") as f:
            json.dump(d, f, ensure_ascii=False)


def write_coco_by_hand(path, ext=".png"):
    """COCO json with non-contiguous category ids."""
    ids = {"瓶盖破损": 3, "scratch": 7, "背景": 10}
    images, anns = [], []
    for i, (name, (w, h, boxes)) in enumerate(GT.items()):
        images.append({"id": 100 + i, "file_name": name + ext, "width": w, "height": h})
        for c, x0, y0, x1, y1 in boxes:
            anns.append({"id": len(anns) + 1, "image_id": 100 + i, "category_id": ids[c],
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    coco = {"images": images, "annotations": anns, "categories": [{"id": v, "name": k} for k, v in ids.items()]}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(coco, f, ensure_ascii=False)
    return coco


def boxes_by_image(coco, drop=()):
    """{image stem: sorted [(class, x0, y0, x1, y1)]} of a COCO dict, for comparisons."""
    names = {c["id"]: c["name"] for c in coco["categories"]}
    stems = {img["id"]: os.path.splitext(os.path.basename(img["file_name"]))[0] for img in coco["images"]}
    out = {s: [] for s in stems.values()}
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        name = names.get(a["category_id"], a["category_id"])
        if name in drop:
            continue
        out[stems[a["image_id"]]].append((name, round(x, 3), round(y, 3), round(x + w, 3), round(y + h, 3)))
    return {k: sorted(v) for k, v in out.items()}


def expected(drop=()):
    return {k: sorted((c, float(x0), float(y0), float(x1), float(y1)) for c, x0, y0, x1, y1 in b if c not in drop)
            for k, (_, _, b) in GT.items()}


class capture_logs:
    """``with capture_logs("d2_defects.data.validation") as msgs:`` collects the INFO+ messages of that logger,
    whatever Detectron2's ``setup_logger`` did to propagation in this process."""

    def __init__(self, name, level=logging.INFO):
        self.logger, self.level, self.messages = logging.getLogger(name), level, []
        self.handler = logging.Handler(level)
        self.handler.emit = lambda record: self.messages.append(record.getMessage())

    def __enter__(self):
        self.old_level = self.logger.level
        self.logger.setLevel(min(self.level, self.logger.getEffectiveLevel()))
        self.logger.addHandler(self.handler)
        return self.messages

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.old_level)
