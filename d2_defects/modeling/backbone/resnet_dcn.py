"""Deformable convolutions in Detectron2's ResNet stages, on ``torchvision.ops.deform_conv2d``.

Detectron2's own ``DeformBottleneckBlock`` needs the compiled ``_C`` extension (and its CPU backward was never
implemented). Here the stock ResNet is built first (Detectron2's ``build_resnet_backbone``), then the 3x3
``conv2`` of every block in the stages selected by ``MODEL.RESNETS.DEFORM_ON_PER_STAGE`` is wrapped in
:class:`ResNetDeformConv`, which keeps the conv's weight and norm (same parameter names, so plain ResNet
checkpoints load) and adds a zero-initialised offset (and mask) predictor. A freshly built block therefore
computes exactly the plain convolution. Works for Bottleneck (R50+) and Basic (R18/R34) blocks, on CPU and CUDA.
"""
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone, build_retinanet_resnet_fpn_backbone
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from torch import nn
from torchvision.ops import deform_conv2d
from ...utils.errors import ConfigError

__all__ = [
    "ResNetDeformConv",
    "add_deformable_convs",
    "build_resnet_dcn_backbone",
    "build_resnet_dcn_fpn_backbone",
    "build_retinanet_resnet_dcn_fpn_backbone",
]


class ResNetDeformConv(nn.Module):
    """
    A deformable version of an existing Detectron2 ``Conv2d`` (DCNv1, or DCNv2 when ``modulated``).

    Offsets are predicted by a conv with the same kernel/stride/padding/dilation as the wrapped conv, initialised
    to zero. The DCNv2 mask is ``2 * sigmoid(m)``, so it starts at exactly 1 (a plain ``sigmoid`` would start at
    0.5 and halve the pretrained response).
    """

    def __init__(self, conv: nn.Conv2d, *, modulated: bool = False, offset_groups: int = 1):
        super().__init__()
        in_channels = conv.in_channels
        if offset_groups < 1 or in_channels % offset_groups != 0:
            raise ConfigError(
                f"MODEL.RESNETS.DEFORM_NUM_GROUPS={offset_groups} must divide the input channels ({in_channels})"
            )
        self.weight = conv.weight
        self.bias = conv.bias
        self.norm = getattr(conv, "norm", None)
        self.activation = getattr(conv, "activation", None)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.modulated = modulated
        kh, kw = conv.kernel_size
        self.conv_offset = nn.Conv2d(
            in_channels,
            offset_groups * kh * kw * (3 if modulated else 2),
            kernel_size=conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
        ).to(device=conv.weight.device, dtype=conv.weight.dtype)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)
        # a frozen stage stays frozen (FREEZE_AT)
        self.conv_offset.requires_grad_(conv.weight.requires_grad)

    def forward(self, x):
        """x: (N, C_in, H, W) -> (N, C_out, H', W'), like the wrapped conv (norm and activation included)."""
        out = self.conv_offset(x)
        mask = None
        if self.modulated:
            o1, o2, m = torch.chunk(out, 3, dim=1)
            out = torch.cat((o1, o2), dim=1)
            mask = 2.0 * torch.sigmoid(m)
        x = deform_conv2d(
            x, out, self.weight, self.bias, stride=self.stride, padding=self.padding, dilation=self.dilation,
            mask=mask,
        )
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def extra_repr(self):
        return f"modulated={self.modulated}, offset_channels={self.conv_offset.out_channels}"


def _deform_settings(cfg):
    stages = list(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE)
    if len(stages) != 4 or not all(isinstance(s, bool) for s in stages):
        raise ConfigError(
            f"MODEL.RESNETS.DEFORM_ON_PER_STAGE must be 4 booleans (res2..res5), got {cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE}"
        )
    return stages, bool(cfg.MODEL.RESNETS.DEFORM_MODULATED), int(cfg.MODEL.RESNETS.DEFORM_NUM_GROUPS)


def add_deformable_convs(resnet, deform_on_per_stage, modulated=False, offset_groups=1):
    """
    Replace (in place) ``conv2`` of every block in the selected stages of a Detectron2 ``ResNet`` by a
    :class:`ResNetDeformConv`. Returns ``resnet``.

    Args:
        resnet (detectron2.modeling.ResNet)
        deform_on_per_stage (list[bool]): 4 flags for res2..res5 (stages not built are ignored).
    """
    for idx, on in enumerate(deform_on_per_stage):
        stage = getattr(resnet, f"res{idx + 2}", None)
        if not on or stage is None:
            continue
        for block in stage:
            block.conv2 = ResNetDeformConv(block.conv2, modulated=modulated, offset_groups=offset_groups)
    return resnet


def _plain_cfg(cfg):
    # Detectron2's builder would pick its _C-based DeformBottleneckBlock (or refuse R18/R34) when a flag is on.
    plain = cfg.clone()
    plain.defrost()
    plain.MODEL.RESNETS.DEFORM_ON_PER_STAGE = [False] * 4
    return plain


@BACKBONE_REGISTRY.register()
def build_resnet_dcn_backbone(cfg, input_shape: ShapeSpec):
    """``build_resnet_backbone`` with torchvision deformable convs in the stages of ``DEFORM_ON_PER_STAGE``."""
    stages, modulated, groups = _deform_settings(cfg)
    return add_deformable_convs(build_resnet_backbone(_plain_cfg(cfg), input_shape), stages, modulated, groups)


@BACKBONE_REGISTRY.register()
def build_resnet_dcn_fpn_backbone(cfg, input_shape: ShapeSpec):
    """``build_resnet_fpn_backbone`` (P2-P6) on a ResNet with deformable convs."""
    stages, modulated, groups = _deform_settings(cfg)
    backbone = build_resnet_fpn_backbone(_plain_cfg(cfg), input_shape)
    add_deformable_convs(backbone.bottom_up, stages, modulated, groups)
    return backbone


@BACKBONE_REGISTRY.register()
def build_retinanet_resnet_dcn_fpn_backbone(cfg, input_shape: ShapeSpec):
    """``build_retinanet_resnet_fpn_backbone`` (P3-P7, for FCOS/RetinaNet) on a ResNet with deformable convs."""
    stages, modulated, groups = _deform_settings(cfg)
    backbone = build_retinanet_resnet_fpn_backbone(_plain_cfg(cfg), input_shape)
    add_deformable_convs(backbone.bottom_up, stages, modulated, groups)
    return backbone
