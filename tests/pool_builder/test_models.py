import pytest
import torch

from pool_builder.errors import PoolBuilderError, UnknownNameError
from pool_builder.models.wrn import WRNConfig, build_expert_head, count_parameters
from pool_builder.models.registry import create_model, list_models


def test_registry_lists_and_rejects_unknown():
    assert "wrn_16_1" in list_models() and list_models("wrn_16_*") == ["wrn_16_1", "wrn_16_2", "wrn_16_4", "wrn_16_8"]
    with pytest.raises(UnknownNameError, match="unknown architecture 'resnet50'; valid architectures: wrn_10_1"):
        create_model("resnet50", in_channels=1, num_classes=10)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_library_expert_seam(shape):
    model = create_model("wrn_16_1", in_channels=shape[0], num_classes=10).eval()
    x = torch.randn(2, *shape)
    feats = model.forward_features(x)
    assert feats.shape == (2, 32, shape[1] // 2, shape[2] // 2)
    assert torch.equal(model.forward_head(feats), model(x))
    expert = build_expert_head(model.cfg, 0.25, 3).eval()
    assert expert(feats).shape == (2, 3)
    assert expert.group3[0].conv1.out_channels == 16  # 64 * 0.25


def test_parameter_counts_are_those_of_wrn():
    assert count_parameters(create_model("wrn_16_1", in_channels=1, num_classes=10)) == 174778
    assert count_parameters(create_model("wrn_16_2", in_channels=1, num_classes=10)) == 691386


@pytest.mark.parametrize("kwargs, message", [
    (dict(depth=15), "6n\\+4"), (dict(widen_factor=0), "positive"), (dict(in_channels=2), "1 \\(grey\\) or 3"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(PoolBuilderError, match=message):
        WRNConfig(**kwargs)


def test_expert_width_validation():
    with pytest.raises(PoolBuilderError, match="width factor"):
        build_expert_head(WRNConfig(), 1.5, 3)
