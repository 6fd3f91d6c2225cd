"""Models: the CIFAR nets and lenet in timm's registry, their classifier interface, and FeatureNet on top of them."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from oodlab.models import FeatureNet, check_model_name, create_model

# name -> (last feature map shape at 32px, parameter-count range with 10 classes)
CIFAR_NETS = {
    "resnet18_cifar": ((512, 4, 4), (11.0e6, 11.4e6)),
    "resnet_tiny_cifar": ((128, 4, 4), (0.25e6, 0.35e6)),
    "densenet_bc100_cifar": ((342, 8, 8), (0.76e6, 0.80e6)),  # DenseNet-BC-100 k=12: 0.769M
    "wrn40_2_cifar": ((128, 8, 8), (2.2e6, 2.3e6)),  # WRN-40-2: 2.24M
    "small_cnn": ((128, 8, 8), (0.09e6, 0.1e6)),  # 128x7x7 at Fashion-MNIST's 28px
}


def images(size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", CIFAR_NETS)
def test_last_feature_map_shape_and_post_relu(name):
    model = timm.create_model(name, num_classes=10).eval()
    with torch.no_grad():
        fmap = model.forward_features(images())
    assert fmap.shape == (2, *CIFAR_NETS[name][0])
    assert model.num_features == fmap.shape[1]
    # post BN+ReLU: nothing negative, and the ReLU did clip something (a pre-activation map would have negatives)
    assert (fmap >= 0).all()
    assert (fmap == 0).any()


@pytest.mark.parametrize("name", CIFAR_NETS)
def test_feature_net_matches_plain_forward(name):
    model = timm.create_model(name, num_classes=10).eval()
    net = FeatureNet(model)
    x = images()
    with torch.no_grad():
        logits, pooled, fmap = net(x)
        expected = model(x)
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(pooled, fmap.mean(dim=(2, 3)))
    assert isinstance(net.classifier, nn.Linear) and net.classifier.in_features == pooled.shape[1]
    head = net.head()
    torch.testing.assert_close(pooled @ head.weight.T + head.bias, logits)


@pytest.mark.parametrize("name", CIFAR_NETS)
def test_parameter_count_in_expected_range(name):
    low, high = CIFAR_NETS[name][1]
    count = sum(p.numel() for p in timm.create_model(name, num_classes=10).parameters())
    assert low <= count <= high, f"{name}: {count} parameters"


@pytest.mark.parametrize("name", CIFAR_NETS)
def test_reset_classifier(name):
    model = timm.create_model(name, num_classes=10).eval()
    model.reset_classifier(5)
    assert model.num_classes == 5 and model.get_classifier().out_features == 5
    with torch.no_grad():
        assert model(images()).shape == (2, 5)


@pytest.mark.parametrize("name", CIFAR_NETS)
def test_pretrained_weights_do_not_exist(name):
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model(name, pretrained=True, num_classes=10)


def test_densenet_has_the_reference_dropout_by_default():
    def drop_rates(model):
        return {m.drop_rate for m in model.modules() if hasattr(m, "drop_rate") and isinstance(m.drop_rate, float)}

    assert drop_rates(timm.create_model("densenet_bc100_cifar")) == {0.3}
    assert drop_rates(timm.create_model("densenet_bc100_cifar", proj_drop_rate=0.0)) == {0.0}


def test_wrn_dropout_is_off_by_default_and_settable():
    def dropout_ps(model):
        return {m.p for m in model.modules() if isinstance(m, nn.Dropout)}

    assert dropout_ps(timm.create_model("wrn40_2_cifar")) == {0.0}
    assert 0.3 in dropout_ps(timm.create_model("wrn40_2_cifar", proj_drop_rate=0.3))


def test_wrn_depth_must_be_6n_plus_4():
    from oodlab.models.wrn_cifar import WideResNet

    with pytest.raises(ValueError, match="depth"):
        WideResNet(depth=30)


TYPOS = [
    ("densenet_bc100_cifr", "densenet_bc100_cifar"),
    ("wrn40_2_cifa", "wrn40_2_cifar"),
    ("resnet18_cifr", "resnet18_cifar"),
]


@pytest.mark.parametrize(("typo", "intended"), TYPOS)
def test_unknown_name_suggests_close_matches(typo, intended):
    with pytest.raises(ValueError, match=intended):
        check_model_name(typo)
    with pytest.raises(ValueError, match="model.name"):
        create_model(typo, num_classes=10)


def test_registered_names_pass_the_check():
    for name in [*CIFAR_NETS, "lenet"]:
        check_model_name(name)


def test_timm_imagenet_model_through_feature_net():
    model = create_model("resnet50", num_classes=10).eval()
    x = images(64)
    with torch.no_grad():
        logits, pooled, fmap = FeatureNet(model)(x)
        expected = model(x)
    assert fmap.shape == (2, 2048, 2, 2)
    assert pooled.shape == (2, 2048)
    torch.testing.assert_close(logits, expected)


# ---------------------------------------------------------------- lenet: the published FMNIST model, no pooled head


def test_lenet_shapes_feature_map_and_parameters():
    model = timm.create_model("lenet", num_classes=10).eval()
    net = FeatureNet(model)
    x = images(28)
    with torch.no_grad():
        logits, hidden, fmap = net(x)
        expected = model(x)
    # 2 x (5x5 conv 32 / 64, ReLU, 2x2 max-pool) -> 64x7x7 post-ReLU map; fc 3136 -> 256 (ReLU) -> 10
    assert fmap.shape == (2, 64, 7, 7) and (fmap >= 0).all()
    assert hidden.shape == (2, 256) and (hidden >= 0).all()
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(hidden @ net.head().weight.T + net.head().bias, logits)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.kernel_size, c.out_channels) for c in convs] == [((5, 5), 32), ((5, 5), 64)]
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.AdaptiveAvgPool2d)) for m in model.modules())
    count = sum(p.numel() for p in model.parameters())
    assert count == (3 * 25 + 1) * 32 + (32 * 25 + 1) * 64 + (3136 + 1) * 256 + (256 + 1) * 10  # 857,738
    model.reset_classifier(5)
    with torch.no_grad():
        assert model(x).shape == (2, 5)


def test_lenet_position_logits_decompose_the_logits_exactly():
    """z_ij = HW * W2 (m * W1_ij f_ij) + W2 (m * b1) + b2: their mean over positions is the logits; on a map that is
    zero but at one position, that position's logits are HW times its share of the pre-bias logits plus the bias."""
    net = FeatureNet(timm.create_model("lenet", num_classes=10)).eval()
    with torch.no_grad():
        fmap = net.model.forward_features(images(28))
        logits = net.model.forward_head(fmap)
        z = net.position_logits(fmap)
        assert z.shape == (2, 10, 7, 7)
        torch.testing.assert_close(z.mean(dim=(2, 3)), logits, atol=1e-5, rtol=1e-5)
        labels = torch.tensor([3, 7])
        torch.testing.assert_close(net.position_logits(fmap, labels), z[torch.arange(2), labels])
        one = torch.zeros_like(fmap)
        one[:, :, 2, 5] = fmap[:, :, 2, 5]
        fc1, fc2 = net.model.fc1, net.model.fc
        on = (fc1(one.flatten(1)) > 0).float()
        share = one.flatten(1) @ fc1.weight.T  # the only position's input to the hidden units
        expected = 49 * (on * share) @ fc2.weight.T + (on * fc1.bias) @ fc2.weight.T + fc2.bias
        torch.testing.assert_close(net.position_logits(one)[:, :, 2, 5], expected, atol=1e-4, rtol=1e-5)


def test_pooled_heads_position_logits_are_w_f_plus_b():
    net = FeatureNet(timm.create_model("small_cnn", num_classes=10)).eval()
    with torch.no_grad():
        fmap = net.model.forward_features(images(28))
        z = net.position_logits(fmap)
        head = net.head()
        torch.testing.assert_close(z[:, :, 1, 2], fmap[:, :, 1, 2] @ head.weight.T + head.bias)
        torch.testing.assert_close(z.mean(dim=(2, 3)), net(images(28))[0], atol=1e-5, rtol=1e-5)
