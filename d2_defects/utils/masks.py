"""COCO masks (``segmentation``: polygons or RLE) as pycocotools' RLE and back, for the readers, validation,
copy-paste, prediction files and drawings."""
import numpy as np

__all__ = ["decode_segmentation", "encode_mask", "segmentation_to_rle"]


def encode_mask(mask):
    """A bool HxW mask as COCO's compressed RLE (``{"size": [h, w], "counts": str}``), json-serialisable."""
    from pycocotools import mask as mask_util

    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def segmentation_to_rle(segm, h, w):
    """A COCO ``segmentation`` (polygons, or RLE with list or string counts) as one compressed RLE of an
    ``h`` x ``w`` image (pycocotools' form)."""
    from pycocotools import mask as mask_util

    if isinstance(segm, list):
        return mask_util.merge(mask_util.frPyObjects(segm, h, w))
    if isinstance(segm.get("counts"), list):
        return mask_util.frPyObjects(segm, h, w)
    return segm


def decode_segmentation(segm, h, w):
    """A COCO ``segmentation`` as a bool ``h`` x ``w`` array (polygons rasterised as pycocotools does)."""
    from pycocotools import mask as mask_util

    return mask_util.decode(segmentation_to_rle(segm, h, w)) > 0
