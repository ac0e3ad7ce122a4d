from .defect_rcnn import DefectRCNN, ImageDefectHead  # noqa: F401
from .fcos import DefectFCOS  # noqa: F401
from .solo import DefectSOLO  # noqa: F401
