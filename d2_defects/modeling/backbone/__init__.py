from .resnet_dcn import (  # noqa: F401
    ResNetDeformConv,
    add_deformable_convs,
    build_resnet_dcn_backbone,
    build_resnet_dcn_fpn_backbone,
    build_retinanet_resnet_dcn_fpn_backbone,
)
from .timm_backbone import (  # noqa: F401
    TimmBackbone,
    build_retinanet_timm_fpn_backbone,
    build_timm_backbone,
    build_timm_fpn_backbone,
)
