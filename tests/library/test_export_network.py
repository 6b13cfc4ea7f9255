"""The network is MedicalNet's ResNet-34 layout exactly (keys, strides, dilations, shortcut A)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from classifier import ResNet34Classifier
from classifier.network import ShortcutA


@pytest.fixture(scope="module")
def model() -> ResNet34Classifier:
    torch.manual_seed(0)
    return ResNet34Classifier().eval()


def test_parameter_count_matches_medicalnet_resnet34(model):
    # docs/model.md: about 63.3 M parameters (backbone 63.29 M + FC 512 x 2).
    assert sum(p.numel() for p in model.parameters()) == 63_296_834


def test_state_dict_uses_medicalnet_key_names_and_no_shortcut_weights(model):
    keys = list(model.state_dict())
    assert keys[:2] == ["conv1.weight", "bn1.weight"]
    assert "layer1.2.conv2.weight" in keys and "layer2.3.bn2.running_var" in keys
    assert "layer3.5.conv1.weight" in keys and "layer4.2.bn2.bias" in keys
    assert "layer1.3.conv1.weight" not in keys and "layer4.3.conv1.weight" not in keys  # [3, 4, 6, 3]
    assert not any("downsample" in key or "shortcut" in key for key in keys)  # shortcut A has no weights
    assert keys[-2:] == ["fc.weight", "fc.bias"] and model.fc.weight.shape == (2, 512)


def test_strides_and_dilations(model):
    assert (model.conv1.kernel_size, model.conv1.stride, model.conv1.padding) == ((7, 7, 7), (2, 2, 2), (3, 3, 3))
    assert model.conv1.bias is None
    assert model.layer2[0].conv1.stride == (2, 2, 2)
    for layer, dilation in ((model.layer3, 2), (model.layer4, 4)):
        for block in layer:
            for conv in (block.conv1, block.conv2):
                assert conv.stride == (1, 1, 1) and conv.dilation == (dilation,) * 3 and conv.padding == (dilation,) * 3


def _medicalnet_downsample(x: torch.Tensor, planes: int, stride: int) -> torch.Tensor:
    """MedicalNet's downsample_basic_block, minus its legacy Variable/cuda checks."""
    out = F.avg_pool3d(x, kernel_size=1, stride=stride)
    zero_pads = torch.zeros(out.size(0), planes - out.size(1), out.size(2), out.size(3), out.size(4))
    return torch.cat([out, zero_pads], dim=1)


@pytest.mark.parametrize("in_planes,planes,stride", [(64, 128, 2), (128, 256, 1), (256, 512, 1)])
def test_shortcut_a_equals_medicalnet(in_planes, planes, stride):
    x = torch.randn(2, in_planes, 6, 7, 8)
    assert torch.equal(ShortcutA(in_planes, planes, stride)(x), _medicalnet_downsample(x, planes, stride))


def test_any_input_size_gives_two_logits_and_features_at_one_eighth(model):
    with torch.no_grad():
        logits = model(torch.rand(2, 1, 32, 48, 40) * 2 - 1)
        features = model.features(torch.zeros(1, 1, 64, 64, 64))
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    assert features.shape == (1, 512, 8, 8, 8)  # dilated layer3/4 keep 1/8 resolution


def test_batch_items_are_independent(model):
    x = torch.rand(3, 1, 32, 32, 32) * 2 - 1
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(3)])
    assert torch.allclose(together, alone, atol=1e-5)
    assert not isinstance(model.layer2[0].shortcut, nn.Identity)
