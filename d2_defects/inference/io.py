"""Result files of ``tools/predict.py``: COCO results json, image list, CSV, drawings."""
import csv
import os

import cv2
import numpy as np
from detectron2.structures import BoxMode

from ..utils.masks import encode_mask
from ..utils.errors import ConfigError
from ..utils.fileio import atomic_write_json, check_can_write

__all__ = ["ResultsWriter", "OUTPUT_FILES", "check_can_write"]

# files written into the output folder
OUTPUT_FILES = ("results.json", "images.json", "results.csv", "skipped.txt")


class ResultsWriter:
    """
    Collects the detections of a prediction run and writes, in ``output_dir``:

    - ``results.json``: COCO results (``image_id``, ``category_id``, ``bbox`` XYWH, ``score``; for mask models
      also ``segmentation``, the mask as compressed RLE);
    - ``images.json``: ``{"images": [{"id", "file_name", "height", "width"}], "categories": [...]}``, the
      image ids of ``results.json`` mapped to the files (with ``results.json``, a COCO-style pair); for
      models with an image-level score (DefectRCNN) each image also has its ``defect_score``;
    - ``results.csv``: one row per detection (file name, class name, score, XYXY box);
    - ``skipped.txt``: files that could not be read, with the reason;
    - with ``draw=True``, ``vis/<image name>.png`` with the detections above ``draw_threshold``.
    """

    def __init__(self, output_dir, metadata=None, num_classes=None, overwrite=False, draw=False,
                 draw_threshold=0.3):
        self.output_dir = output_dir
        self.metadata = metadata
        classes = list(getattr(metadata, "thing_classes", None) or [])
        if not classes:
            classes = [f"class_{i}" for i in range(num_classes or 0)]
        self.class_names = classes
        id_map = getattr(metadata, "thing_dataset_id_to_contiguous_id", None)
        # contiguous id -> category id written to results.json (the dataset's ids when known, else the same)
        self.category_ids = {v: k for k, v in id_map.items()} if id_map else None
        self.draw, self.draw_threshold = draw, draw_threshold
        self.vis_dir = os.path.join(output_dir, "vis")
        check_can_write([os.path.join(output_dir, f) for f in OUTPUT_FILES]
                        + ([self.vis_dir] if draw else []), overwrite)
        os.makedirs(output_dir, exist_ok=True)
        if draw:
            os.makedirs(self.vis_dir, exist_ok=True)
        self.images, self.detections, self.skipped = [], [], []
        self._vis_names = set()

    def _class_name(self, c):
        return self.class_names[c] if 0 <= c < len(self.class_names) else f"class_{c}"

    def add(self, image_id, file_name, instances, image=None, rgb=None, defect_score=None):
        """
        Record the detections of one image.

        Args:
            instances (Instances): with ``pred_boxes`` (XYXY absolute), ``scores``, ``pred_classes`` and, for
                mask models, ``pred_masks`` (N x H x W, image size).
            rgb (ndarray or None): HxWx3 uint8 RGB image, needed when drawing.
            defect_score (float or None): the model's image-level defect probability, if it has one.
        """
        h, w = instances.image_size
        info = {"id": image_id, "file_name": file_name, "height": int(h), "width": int(w)}
        if defect_score is not None:
            info["defect_score"] = round(float(defect_score), 6)
        self.images.append(info)
        boxes = instances.pred_boxes.tensor.numpy().astype(np.float64)
        scores = instances.scores.numpy().tolist()
        classes = instances.pred_classes.numpy().tolist()
        masks = instances.pred_masks.numpy() > 0 if instances.has("pred_masks") else None
        for k, (box, score, c) in enumerate(zip(boxes, scores, classes)):
            if self.category_ids is not None and c not in self.category_ids:
                raise ConfigError(f"{file_name}: predicted class {c}, but the dataset metadata has only "
                                 f"{len(self.class_names)} classes (does the model match the dataset?)")
            self.detections.append({
                "image_id": image_id, "category_id": int(self.category_ids[c] if self.category_ids else c),
                "bbox": [round(float(v), 3) for v in BoxMode.convert(box.tolist(), BoxMode.XYXY_ABS,
                                                                      BoxMode.XYWH_ABS)],
                "score": round(float(score), 5), "_xyxy": box.tolist(), "_class": c, "_file": file_name,
            })
            if masks is not None:
                self.detections[-1]["segmentation"] = encode_mask(masks[k])
        if self.draw and rgb is not None:
            self._draw(file_name, rgb, boxes, scores, classes, masks)

    def _draw(self, file_name, rgb, boxes, scores, classes, masks=None):
        from ..utils.visualize import draw_boxes

        keep = [i for i, s in enumerate(scores) if s >= self.draw_threshold]
        labels = [f"{self._class_name(classes[i])} {scores[i]:.2f}" for i in keep]
        vis = draw_boxes(rgb, boxes[keep].reshape(-1, 4), labels, self.metadata, [classes[i] for i in keep],
                         masks=None if masks is None else [masks[i] for i in keep])
        stem = os.path.splitext(os.path.basename(file_name))[0]
        name, k = stem, 1
        while name in self._vis_names:  # same stem in several sub-folders
            name, k = f"{stem}_{k}", k + 1
        self._vis_names.add(name)
        cv2.imwrite(os.path.join(self.vis_dir, name + ".png"), vis[:, :, ::-1])

    def skip(self, file_name, reason):
        self.skipped.append((file_name, reason))

    def close(self):
        """Write the result files; return the path of ``results.json``."""
        results = [{k: v for k, v in d.items() if not k.startswith("_")} for d in self.detections]
        if self.category_ids is not None:
            cats = [{"id": int(self.category_ids[i]), "name": n} for i, n in enumerate(self.class_names)
                    if i in self.category_ids]
        else:
            seen = sorted({d["_class"] for d in self.detections} | set(range(len(self.class_names))))
            cats = [{"id": c, "name": self._class_name(c)} for c in seen]
        atomic_write_json(os.path.join(self.output_dir, "images.json"), {"images": self.images, "categories": cats})
        with open(os.path.join(self.output_dir, "results.csv"), "w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(["file_name", "image_id", "class", "category_id", "score", "x1", "y1", "x2", "y2"])
            for d in self.detections:
                wr.writerow([d["_file"], d["image_id"], self._class_name(d["_class"]), d["category_id"],
                             d["score"]] + [round(v, 2) for v in d["_xyxy"]])
        with open(os.path.join(self.output_dir, "skipped.txt"), "w") as f:
            for name, reason in self.skipped:
                f.write(f"{name}\t{reason}\n")
        path = os.path.join(self.output_dir, "results.json")
        atomic_write_json(path, results)
        return path
