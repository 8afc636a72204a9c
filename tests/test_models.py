"""The two CNNs (apl.models): shapes, parameter counts from the architecture text, init statistics."""
import math

import pytest
import torch
from torch import nn

from apl.models import MaCNN, PaperCNN, build_model, param_count


def conv(cin, cout):  # 3x3 kernel with bias
    return cin * cout * 9 + cout


def bn(c):
    return 2 * c


def linear(i, o):
    return i * o + o


def paper_count(width=1.0, classes=10):
    """PaperCNN's parameters from the paper's Sec. 2.2 text (with the width scaling)."""
    c1, c2, c3, h = (max(1, round(c * width)) for c in (64, 128, 256, 1024))
    convs = conv(3, c1) + conv(c1, c1) + conv(c1, c2) + conv(c2, c2) + conv(c2, c3) + conv(c3, c3)
    return convs + bn(c1) * 2 + bn(c2) * 2 + bn(c3) * 2 + linear(c3 * 16, h) + linear(h, classes)


def ma_count(classes=10):
    """MaCNN's parameters from the cited work's description (64, 128, 196; 3136 -> 256 -> BN1d -> 10)."""
    convs = conv(3, 64) + conv(64, 64) + conv(64, 128) + conv(128, 128) + conv(128, 196) + conv(196, 196)
    return convs + 2 * (bn(64) + bn(128) + bn(196)) + linear(3136, 256) + bn(256) + linear(256, classes)


@pytest.mark.parametrize("model", [PaperCNN(), PaperCNN(7, width=0.25), MaCNN(), MaCNN(7)])
def test_output_shape(model):
    n_cls = model.classifier[-1].out_features
    model.eval()
    out = model(torch.randn(5, 3, 32, 32))
    assert out.shape == (5, n_cls) and torch.isfinite(out).all()


@pytest.mark.parametrize("width", [1.0, 0.5, 0.25, 0.125])
def test_paper_param_count_matches_architecture(width):
    assert param_count(PaperCNN(10, width)) == paper_count(width)


def test_paper_docstring_states_the_real_count():
    expected = paper_count(1.0)
    assert f"{expected:,}" in PaperCNN.__doc__
    assert abs(expected - 4.2e6) > 1e6  # the paper's "~4.2 million" is not the total


def test_ma_param_count_and_flatten():
    m = MaCNN()
    assert param_count(m) == ma_count()
    assert f"{ma_count():,}" in MaCNN.__doc__
    feats = m.features(torch.randn(2, 3, 32, 32))
    assert feats.shape == (2, 196, 4, 4) and feats[0].numel() == 3136
    assert m.classifier[1].in_features == 3136
    assert isinstance(m.classifier[2], nn.BatchNorm1d)
    assert not any(isinstance(x, nn.Dropout) for x in m.modules())


def test_paper_classifier_order_and_dropout():
    m = PaperCNN()
    kinds = [type(x) for x in m.classifier]
    assert kinds == [nn.Flatten, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert m.classifier[3].p == 0.5
    x = torch.randn(4, 3, 32, 32)
    m.eval()
    assert torch.equal(m(x), m(x))
    m.train()
    torch.manual_seed(0)
    a = m(x)
    b = m(x)
    assert not torch.equal(a, b)  # dropout active in training


def test_paper_init_statistics():
    torch.manual_seed(0)
    m = PaperCNN()
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256]
    big = convs[-1]  # 256*256*9 weights: std within 2 %
    fan_out = big.out_channels * 9
    assert big.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.02)
    assert abs(big.weight.mean().item()) < 0.01 * math.sqrt(2 / fan_out) * 10
    fc1 = m.classifier[1]
    assert fc1.weight.std().item() == pytest.approx(math.sqrt(2 / fc1.in_features), rel=0.02)
    for mod in m.modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            assert torch.count_nonzero(mod.bias) == 0
        if isinstance(mod, nn.BatchNorm2d):
            assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0)


@pytest.mark.parametrize("cls", [PaperCNN, MaCNN])
def test_torch_init_keeps_pytorchs_defaults(cls):
    """init="torch" (the seed paper's author's code): no Kaiming normal, PyTorch's layer defaults,
    i.e. weights uniform with bound 1/sqrt(fan_in) and nonzero conv biases; same layers and size."""
    torch.manual_seed(0)
    m = cls(init="torch")
    assert param_count(m) == param_count(cls())
    big = [x for x in m.modules() if isinstance(x, nn.Conv2d)][-1]
    bound = 1 / math.sqrt(big.in_channels * 9)
    assert big.weight.abs().max().item() <= bound
    assert big.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    assert torch.count_nonzero(big.bias) == big.out_channels
    torch.manual_seed(0)
    assert not torch.equal(cls().classifier[1].weight, cls(init="torch").classifier[1].weight)


def test_paper_cnn_at_width_1_has_the_authors_simplecnn_size():
    assert param_count(build_model("paper", 10, 1.0, "torch")) == 5_352_778


def test_ma_init_statistics():
    torch.manual_seed(0)
    m = MaCNN()
    big = [x for x in m.modules() if isinstance(x, nn.Conv2d)][-1]
    bound = math.sqrt(6 / (big.in_channels * 9))  # Kaiming uniform, fan_in, ReLU gain
    assert big.weight.abs().max().item() <= bound
    assert big.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    fc1 = m.classifier[1]
    xb = math.sqrt(6 / (fc1.in_features + fc1.out_features))  # Xavier uniform
    assert fc1.weight.abs().max().item() <= xb
    assert fc1.weight.std().item() == pytest.approx(xb / math.sqrt(3), rel=0.02)


def test_build_model():
    assert isinstance(build_model("paper", 10, 0.5), PaperCNN)
    assert isinstance(build_model("ma2020", 10), MaCNN)
    assert param_count(build_model("paper", 10, 0.5)) == paper_count(0.5)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet", 10)


@pytest.mark.parametrize("kwargs, match", [
    ({"width": 0}, "width"), ({"width": -1.0}, "width"), ({"width": float("inf")}, "width"),
    ({"num_classes": 1}, "num_classes"), ({"num_classes": 2.5}, "num_classes"), ({"init": "xavier"}, "init"),
])
def test_bad_constructor_args(kwargs, match):
    for cls in (PaperCNN, MaCNN):
        with pytest.raises(ValueError, match=match):
            cls(**kwargs)


def test_wrong_input_shape_is_a_clear_error():
    m = PaperCNN(width=0.125).eval()
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\)"):
        m(torch.randn(2, 3, 28, 28))
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\)"):
        m(torch.randn(3, 32, 32))
