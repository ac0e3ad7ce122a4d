"""Detectron2's ``COCOEvaluator`` with faster-coco-eval's C++ ``COCOeval_faster`` in place of pycocotools' Python one.

Detectron2 uses its own C++ ``COCOeval_opt`` only when its extension is built, which a pip install of Detectron2
on CPU does not do: it logs "Fast COCO eval is not built. Falling back to official COCO eval" and evaluates in
pure Python. :class:`FastCOCOEvaluator` gives the same numbers (tested against pycocotools on the same
detections) from faster-coco-eval, pinned in ``requirements.txt``; ``use_fast_impl=False`` keeps pycocotools.
The speed-up is measured by ``benchmarks/coco_eval.py`` (BENCHMARKS.md).
"""
import itertools
import json
import os

from detectron2.evaluation import COCOEvaluator
from detectron2.evaluation.coco_evaluation import _evaluate_predictions_on_coco
from detectron2.utils.file_io import PathManager
from pycocotools.cocoeval import COCOeval

__all__ = ["FastCOCOEvaluator", "fast_cocoeval_class"]


def fast_cocoeval_class():
    """faster-coco-eval's ``COCOeval_faster`` (a drop-in ``COCOeval``), or pycocotools' ``COCOeval`` without it."""
    try:
        from faster_coco_eval import COCOeval_faster
    except ImportError:  # not installed: the official implementation, as Detectron2 does
        return COCOeval
    return COCOeval_faster


class FastCOCOEvaluator(COCOEvaluator):
    """``COCOEvaluator`` whose COCO API evaluation runs in faster-coco-eval (see the module docstring)."""

    def __init__(self, dataset_name, tasks=None, distributed=True, output_dir=None, *, use_fast_impl=True,
                 **kwargs):
        # Detectron2's own fast implementation is not built here: asking for it would only log the fallback
        super().__init__(dataset_name, tasks, distributed, output_dir, use_fast_impl=False, **kwargs)
        self._cocoeval_fn = fast_cocoeval_class() if use_fast_impl else COCOeval

    def _eval_predictions(self, predictions, img_ids=None):
        # Restates COCOEvaluator._eval_predictions (detectron2 a59f056), which picks its COCOeval class from
        # module globals; only ``cocoeval_fn`` differs (tests/test_upstream_drift.py watches the original).
        coco_results = list(itertools.chain(*[x["instances"] for x in predictions]))
        tasks = self._tasks or self._tasks_from_predictions(coco_results)
        id_map = getattr(self._metadata, "thing_dataset_id_to_contiguous_id", None)
        if id_map:
            reverse = {v: k for k, v in id_map.items()}
            for result in coco_results:
                assert result["category_id"] in reverse, (
                    f"A prediction has class={result['category_id']}, but the dataset only has {len(reverse)} classes")
                result["category_id"] = reverse[result["category_id"]]
        if self._output_dir:
            file_path = os.path.join(self._output_dir, "coco_instances_results.json")
            self._logger.info(f"Saving results to {file_path}")
            with PathManager.open(file_path, "w") as f:
                f.write(json.dumps(coco_results))
        if not self._do_evaluation:
            self._logger.info("Annotations are not available for evaluation.")
            return
        self._logger.info(f"Evaluating predictions with {self._cocoeval_fn.__module__}.{self._cocoeval_fn.__name__}")
        for task in sorted(tasks):
            coco_eval = _evaluate_predictions_on_coco(
                self._coco_api, coco_results, task, kpt_oks_sigmas=self._kpt_oks_sigmas,
                cocoeval_fn=self._cocoeval_fn, img_ids=img_ids, max_dets_per_image=self._max_dets_per_image,
            ) if coco_results else None  # the COCO API does not handle empty results
            self._results[task] = self._derive_coco_results(coco_eval, task,
                                                            class_names=self._metadata.get("thing_classes"))
