from . import roi_heads  # noqa: F401  registers DefectStandardROIHeads, DefectCascadeROIHeads
