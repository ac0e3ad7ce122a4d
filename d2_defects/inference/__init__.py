"""Inference for users: batched prediction on image folders, result files, merging of detections."""
from ..modeling.merge import MERGE_METHODS, merge_detections
from .predictor import BatchPredictor, ImageReadError, list_images
from .io import ResultsWriter

__all__ = ["BatchPredictor", "ImageReadError", "list_images", "ResultsWriter", "merge_detections",
           "MERGE_METHODS"]
