"""The training mapper: Detectron2's ``DatasetMapper`` plus the defect augmentations and copy-paste."""
import copy
import logging

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetMapper, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from .augment import _check_prob, build_defect_augmentations
from .copy_paste import CopyPaste

logger = logging.getLogger(__name__)

__all__ = ["DefectDatasetMapper", "build_defect_train_mapper", "defect_augmentations_enabled"]


def defect_augmentations_enabled(cfg):
    i = cfg.INPUT
    return i.VFLIP.ENABLED or i.ROT90.ENABLED or i.PHOTOMETRIC.ENABLED or i.COPY_PASTE.ENABLED


class DefectDatasetMapper(DatasetMapper):
    """
    ``DatasetMapper`` with an optional :class:`CopyPaste` step on the decoded image before the
    augmentations (so pasted boxes are resized/flipped/rotated with the rest).

    Args:
        copy_paste (CopyPaste or None): None behaves exactly like ``DatasetMapper``.
    """

    @configurable
    def __init__(self, is_train, *, copy_paste=None, **kwargs):
        super().__init__(is_train, **kwargs)
        self.copy_paste = copy_paste

    @classmethod
    def from_config(cls, cfg, is_train=True, dataset_dicts=None):
        ret = super().from_config(cfg, is_train)
        ret["augmentations"] = build_defect_augmentations(cfg, is_train)
        cp = cfg.INPUT.COPY_PASTE
        if is_train and cp.ENABLED:
            if dataset_dicts is None:
                raise ValueError("INPUT.COPY_PASTE needs the training records (dataset_dicts)")
            if int(cp.MAX_OBJECTS) < 1:
                raise ValueError(f"INPUT.COPY_PASTE.MAX_OBJECTS must be >= 1, got {cp.MAX_OBJECTS}")
            class_ids = None
            if cp.CLASSES:
                classes = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).thing_classes
                unknown = [c for c in cp.CLASSES if c not in classes]
                if unknown:
                    raise ValueError(f"INPUT.COPY_PASTE.CLASSES: unknown class(es) {unknown}; known: {classes}")
                class_ids = {classes.index(c) for c in cp.CLASSES}
            ret["copy_paste"] = CopyPaste(
                dataset_dicts, image_format=cfg.INPUT.FORMAT,
                prob_normal=_check_prob("INPUT.COPY_PASTE.PROB_NORMAL", cp.PROB_NORMAL),
                prob=_check_prob("INPUT.COPY_PASTE.PROB", cp.PROB), max_objects=int(cp.MAX_OBJECTS),
                class_ids=class_ids,
            )
        return ret

    def __call__(self, dataset_dict):
        if self.copy_paste is None or not self.is_train:
            return super().__call__(dataset_dict)
        # Restates DatasetMapper.__call__ (detectron2 a59f056) for detection with boxes only, with the
        # paste inserted between reading the image and the augmentations.
        dataset_dict = copy.deepcopy(dataset_dict)
        image = utils.read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)
        image = np.array(image)  # writable copy
        self.copy_paste(image, dataset_dict)
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if self.proposal_topk is not None:
            utils.transform_proposals(dataset_dict, image_shape, transforms, proposal_topk=self.proposal_topk)
        self._transform_annotations(dataset_dict, transforms, image_shape)
        return dataset_dict


def build_defect_train_mapper(cfg, dataset_dicts=None):
    """
    The training mapper for ``cfg``: exactly ``DatasetMapper(cfg, True)`` when every ``INPUT.VFLIP`` /
    ``ROT90`` / ``PHOTOMETRIC`` / ``COPY_PASTE`` key is off, else a :class:`DefectDatasetMapper`.
    """
    if not defect_augmentations_enabled(cfg):
        return DatasetMapper(cfg, True)
    if cfg.INPUT.COPY_PASTE.ENABLED and (cfg.MODEL.MASK_ON or cfg.MODEL.KEYPOINT_ON):
        raise ValueError("INPUT.COPY_PASTE supports box-only models (MODEL.MASK_ON / KEYPOINT_ON are on)")
    mapper = DefectDatasetMapper(cfg, True, dataset_dicts=dataset_dicts)
    logger.info(f"[DefectDatasetMapper] augmentations: {mapper.augmentations}; copy-paste: "
                f"{'on' if mapper.copy_paste is not None else 'off'}")
    return mapper
