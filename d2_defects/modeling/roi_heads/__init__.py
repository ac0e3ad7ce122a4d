from .cascade import DefectCascadeROIHeads  # noqa: F401  registers the ROI heads
from .standard import DefectStandardROIHeads  # noqa: F401
