"""Reading saved detections: one reader for COCO results files and the evaluator's ``defect_detections.json``."""
import json
import math
import os

from ..utils.errors import DatasetError

__all__ = ["ResultsFileError", "check_detection", "load_results", "read_results_json"]


class ResultsFileError(DatasetError):
    """A results file that is missing, not json, or has a malformed record (the message names file and record)."""


def read_results_json(path):
    """The parsed json of a results file; :class:`ResultsFileError` naming it when missing or not json."""
    if not os.path.isfile(path):
        raise ResultsFileError(f"results file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResultsFileError(f"{path}: not a valid json file ({e})") from None


def check_detection(d, where):
    """
    One COCO-results detection ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` (finite numbers);
    returns it, or raises :class:`ResultsFileError` with ``where`` (file and record) and the record itself.
    ``image_id`` may be missing inside a per-image entry that carries it.
    """
    ok = (isinstance(d, dict) and {"category_id", "bbox", "score"} <= d.keys()
          and isinstance(d["bbox"], (list, tuple)) and len(d["bbox"]) == 4
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                  for v in list(d["bbox"]) + [d["score"]]))
    if not ok:
        raise ResultsFileError(f"{where} is not {{image_id, category_id, bbox: [x, y, w, h], score}} with finite "
                               f"numbers: {str(d)[:200]}")
    return d


def load_results(path):
    """
    Read and check a COCO results json (a list of ``{"image_id", "category_id", "bbox": XYWH, "score"}``).

    Returns:
        list[dict]: the detections.
    Raises:
        ResultsFileError: naming the file and the first bad record.
    """
    dets = read_results_json(path)
    if not isinstance(dets, list):
        raise ResultsFileError(f"{path}: expected a list of detections (COCO results format), got {type(dets).__name__}")
    for i, d in enumerate(dets):
        check_detection(d, f"{path}: detection {i}")
        if "image_id" not in d:
            raise ResultsFileError(f"{path}: detection {i} has no image_id: {str(d)[:200]}")
    return dets
