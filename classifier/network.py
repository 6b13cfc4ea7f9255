"""MedicalNet's 3D ResNet-34 with a classification head, written to export cleanly to ONNX.

The layout and the state_dict key names follow Tencent MedicalNet's models/resnet.py exactly, so
the research team's checkpoints (fine-tuned from MedicalNet) load without renaming: stem conv 7
stride 2, BasicBlocks [3, 4, 6, 3], layer3/layer4 at stride 1 with dilation 2/4, shortcut type A.
The segmentation head is replaced by global average pooling and a 2-class FC layer.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from settings import NAMES

BLOCKS_PER_LAYER = (3, 4, 6, 3)  # ResNet-34
CHANNELS = (64, 128, 256, 512)
STRIDES = (1, 2, 1, 1)
DILATIONS = (1, 1, 2, 4)
NUM_CLASSES = len(NAMES.labels)


def _conv3x3x3(in_planes: int, out_planes: int, stride: int = 1, dilation: int = 1) -> nn.Conv3d:
    return nn.Conv3d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class ShortcutA(nn.Module):
    """MedicalNet's shortcut A: subsample by stride, then zero-pad the extra channels.

    It has no weights (real checkpoints hold no downsample keys). The original built the zeros
    with legacy Variable/.cuda() checks; F.pad computes the same values and exports as a Pad whose pads are a constant subgraph
    (folded by the runtimes).
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.extra_channels = out_planes - in_planes  # a constant, so the Pad's pads are constant-foldable
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride, :: self.stride]  # avg_pool3d(kernel 1, stride s), in every dtype
        return F.pad(x, (0, 0, 0, 0, 0, 0, 0, self.extra_channels))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, dilation: int, shortcut: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = _conv3x3x3(in_planes, planes, stride=stride, dilation=dilation)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = _conv3x3x3(planes, planes, dilation=dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.relu = nn.ReLU(inplace=True)
        # Not named `downsample`: shortcut A has no parameters, so no key ever appears under it.
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.shortcut is None else self.shortcut(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + residual)


class ResNet34Classifier(nn.Module):
    """[B, 1, D, H, W] volume in [-1, 1] -> logits [B, 2] (normal, pathology).

    Fully convolutional up to the pooling, so any D, H, W >= 16 works; the model is trained at 256^3.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        in_planes = 64
        for index, (blocks, planes, stride, dilation) in enumerate(zip(BLOCKS_PER_LAYER, CHANNELS, STRIDES, DILATIONS)):
            layer = []
            for block in range(blocks):
                block_stride = stride if block == 0 else 1
                needs_shortcut = block == 0 and (stride != 1 or in_planes != planes)
                shortcut = ShortcutA(in_planes, planes, stride) if needs_shortcut else None
                layer.append(BasicBlock(in_planes, planes, block_stride, dilation, shortcut))
                in_planes = planes
            setattr(self, f"layer{index + 1}", nn.Sequential(*layer))
        self.fc = nn.Linear(CHANNELS[-1], NUM_CLASSES)

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> ResNet34Classifier:
        """The network in eval mode with exactly these weights (strict keys and shapes). Built on the
        meta device and given the tensors themselves: no random initialisation of 63 M parameters is paid."""
        with torch.device("meta"):
            model = cls()
        model.load_state_dict(state_dict, strict=True, assign=True)
        return model.eval()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last residual layer's output (what Grad-CAM attributes on)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool3d(self.features(x), 1).flatten(1)
        return self.fc(pooled)


class WithSoftmax(nn.Module):
    """The served graph: probabilities, so clients and the threshold see P(class) directly."""

    def __init__(self, classifier: ResNet34Classifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.classifier(volume), dim=1)
