"""The project's dataset mapper: Detectron2's ``DatasetMapper`` plus the defect augmentations, copy-paste and
images of more than 8 bits (used for training, evaluation and test-time augmentation)."""
import copy
import logging

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetMapper, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from .augment import check_prob, build_defect_augmentations
from .copy_paste import CopyPaste
from ..utils.errors import ConfigError
from ..utils.image_io import check_window, read_image

logger = logging.getLogger(__name__)

__all__ = ["DefectDatasetMapper", "build_defect_train_mapper", "build_defect_test_mapper", "high_bit_window",
           "defect_augmentations_enabled"]


def high_bit_window(cfg):
    """``INPUT.HIGH_BIT_DEPTH.WINDOW`` as None (full range) or ``(low, high)``; ConfigError if malformed."""
    try:
        return check_window(cfg.INPUT.HIGH_BIT_DEPTH.WINDOW)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def defect_augmentations_enabled(cfg):
    """Whether any of the project's augmentations (vflip, rot90, photometric, copy-paste) is on in ``cfg``."""
    i = cfg.INPUT
    return i.VFLIP.ENABLED or i.ROT90.ENABLED or i.PHOTOMETRIC.ENABLED or i.COPY_PASTE.ENABLED


class DefectDatasetMapper(DatasetMapper):
    """
    ``DatasetMapper`` that reads images with :func:`d2_defects.utils.image_io.read_image` (16-bit images
    scaled by ``INPUT.HIGH_BIT_DEPTH.WINDOW`` instead of saturated), with an optional :class:`CopyPaste` step
    on the decoded image before the augmentations (so pasted boxes are resized/flipped/rotated with the rest).

    Args:
        copy_paste (CopyPaste or None): None: the same output as ``DatasetMapper`` for 8-bit images.
        high_bit_window (tuple or None): ``INPUT.HIGH_BIT_DEPTH.WINDOW``.
    """

    @configurable
    def __init__(self, is_train, *, copy_paste=None, high_bit_window=None, **kwargs):
        super().__init__(is_train, **kwargs)
        self.copy_paste = copy_paste
        self.high_bit_window = high_bit_window

    @classmethod
    def from_config(cls, cfg, is_train=True, dataset_dicts=None, augmentations=None):
        ret = super().from_config(cfg, is_train)
        ret["high_bit_window"] = high_bit_window(cfg)
        if augmentations is not None:  # e.g. [] for test-time augmentation (full-resolution inputs)
            ret["augmentations"] = augmentations
        else:
            ret["augmentations"] = build_defect_augmentations(cfg, is_train)
        cp = cfg.INPUT.COPY_PASTE
        if is_train and cp.ENABLED:
            if dataset_dicts is None:
                raise ConfigError("INPUT.COPY_PASTE needs the training records (dataset_dicts)")
            if int(cp.MAX_OBJECTS) < 1:
                raise ConfigError(f"INPUT.COPY_PASTE.MAX_OBJECTS must be >= 1, got {cp.MAX_OBJECTS}")
            class_ids = None
            if cp.CLASSES:
                classes = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).thing_classes
                unknown = [c for c in cp.CLASSES if c not in classes]
                if unknown:
                    raise ConfigError(f"INPUT.COPY_PASTE.CLASSES: unknown class(es) {unknown}; known: {classes}")
                class_ids = {classes.index(c) for c in cp.CLASSES}
            ret["copy_paste"] = CopyPaste(
                dataset_dicts, image_format=cfg.INPUT.FORMAT,
                prob_normal=check_prob("INPUT.COPY_PASTE.PROB_NORMAL", cp.PROB_NORMAL),
                prob=check_prob("INPUT.COPY_PASTE.PROB", cp.PROB), max_objects=int(cp.MAX_OBJECTS),
                class_ids=class_ids, high_bit_window=ret["high_bit_window"], use_masks=cfg.MODEL.MASK_ON,
            )
        return ret

    def __call__(self, dataset_dict):
        # Restates DatasetMapper.__call__ (detectron2 a59f056): the image is read by the project's reader (and cut
        # to its tile in sliced training), and the paste is inserted between reading and the augmentations.
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_image(dataset_dict["file_name"], format=self.image_format, window=self.high_bit_window)
        if "slice" in dataset_dict:  # a tile of sliced training (data/slicing.py): its boxes are in tile pixels
            x0, y0, x1, y1 = dataset_dict["slice"]
            image = image[y0:y1, x0:x1]
        utils.check_image_size(dataset_dict, image)
        if "sem_seg_file_name" in dataset_dict:
            sem_seg_gt = utils.read_image(dataset_dict.pop("sem_seg_file_name"), "L").squeeze(2)
        else:
            sem_seg_gt = None
        if self.copy_paste is not None and self.is_train:
            image = np.array(image)  # writable copy
            self.copy_paste(image, dataset_dict)
        aug_input = T.AugInput(image, sem_seg=sem_seg_gt)
        transforms = self.augmentations(aug_input)
        image, sem_seg_gt = aug_input.image, aug_input.sem_seg
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if sem_seg_gt is not None:
            dataset_dict["sem_seg"] = torch.as_tensor(sem_seg_gt.astype("long"))
        if self.proposal_topk is not None:
            utils.transform_proposals(dataset_dict, image_shape, transforms, proposal_topk=self.proposal_topk)
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            dataset_dict.pop("sem_seg_file_name", None)
            return dataset_dict
        if "annotations" in dataset_dict:
            self._transform_annotations(dataset_dict, transforms, image_shape)
        return dataset_dict


def build_defect_test_mapper(cfg, augmentations=None):
    """The evaluation mapper: ``DatasetMapper(cfg, False)`` (or with ``augmentations``, e.g. ``[]`` for TTA)
    reading images through the project's reader (16-bit images, ``INPUT.HIGH_BIT_DEPTH.WINDOW``)."""
    return DefectDatasetMapper(cfg, False, augmentations=augmentations)


def build_defect_train_mapper(cfg, dataset_dicts=None):
    """
    The training mapper for ``cfg``, a :class:`DefectDatasetMapper`: with every ``INPUT.VFLIP`` / ``ROT90`` /
    ``PHOTOMETRIC`` / ``COPY_PASTE`` key off, its output equals ``DatasetMapper(cfg, True)``'s for 8-bit images.
    """
    if not defect_augmentations_enabled(cfg):
        return DefectDatasetMapper(cfg, True)
    if cfg.INPUT.COPY_PASTE.ENABLED and cfg.MODEL.KEYPOINT_ON:
        raise ConfigError("INPUT.COPY_PASTE supports box and mask models (MODEL.KEYPOINT_ON is on)")
    mapper = DefectDatasetMapper(cfg, True, dataset_dicts=dataset_dicts)
    logger.info(f"[DefectDatasetMapper] augmentations: {mapper.augmentations}; copy-paste: "
                f"{'on' if mapper.copy_paste is not None else 'off'}")
    return mapper
