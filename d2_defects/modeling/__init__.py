from . import roi_heads  # noqa: F401  registers DefectStandardROIHeads, DefectCascadeROIHeads
from . import backbone, meta_arch  # noqa: F401  registers backbones and meta-architectures
