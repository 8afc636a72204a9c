"""The two CIFAR-10 CNNs: the seed paper's (:class:`PaperCNN`) and the cited work's (:class:`MaCNN`).

Both take normalised 3x32x32 images and return logits. :func:`build_model` maps the config's
``model`` and ``init`` to one of them: ``init="kaiming"`` is each model's own initialisation
(the paper's stated Kaiming normal; the cited work's official Kaiming uniform and Xavier),
``init="torch"`` keeps PyTorch's default initialisation, as the seed paper's author's code does.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["PaperCNN", "MaCNN", "build_model", "MODEL_NAMES", "MODEL_INITS", "param_count"]

MODEL_NAMES = ("paper", "ma2020")
#: Weight initialisations: the model's own (Kaiming-based) or PyTorch's layer defaults.
MODEL_INITS = ("kaiming", "torch")


def param_count(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _scaled(channels: int, width: float) -> int:
    """``channels * width`` rounded, at least 1 (the quick preset's narrow nets)."""
    return max(1, int(round(channels * width)))


def _check_width(width) -> float:
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not math.isfinite(width) or width <= 0:
        raise ValueError(f"width must be a finite number > 0, got {width!r}")
    return float(width)


def _check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    return num_classes


def _check_init(init) -> str:
    if init not in MODEL_INITS:
        raise ValueError(f"init must be one of {MODEL_INITS}, got {init!r}")
    return init


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel_size=3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _conv_blocks(channels) -> nn.Sequential:
    """Both CNNs' feature extractor: per block [conv-BN-ReLU] x 2 then MaxPool2d(2), from RGB."""
    layers: list[nn.Module] = []
    cin = 3
    for c in channels:
        layers += _conv_bn_relu(cin, c) + _conv_bn_relu(c, c) + [nn.MaxPool2d(2)]
        cin = c
    return nn.Sequential(*layers)


def _check_input(x: torch.Tensor) -> None:
    # The flatten size is fixed by 32x32 inputs; say so instead of a shape error deep in Linear.
    if x.dim() != 4 or tuple(x.shape[1:]) != (3, 32, 32):
        raise ValueError(f"expected images of shape (N, 3, 32, 32), got {tuple(x.shape)}")


class PaperCNN(nn.Module):
    """The seed paper's CNN (Sec. 2.2), optionally narrowed by ``width``.

    Three blocks of [conv3x3 (padding 1) -> BatchNorm -> ReLU] x 2 with 64, 128, 256
    channels, each block followed by MaxPool2d(2) (32 -> 16 -> 8 -> 4); flatten
    256 * 4 * 4 = 4096 -> Linear 1024 -> ReLU -> Dropout(0.5) -> Linear ``num_classes``.
    The paper puts "Dropout (p=0.5) after first FC layer"; it names no activation there,
    so the usual ReLU sits between FC1 and the dropout. Convolutions keep their bias (the
    PyTorch default; the paper does not say). ``width`` scales every channel count and the
    hidden FC size (rounded, at least 1).

    Initialisation, ``init="kaiming"`` (the paper says only "Kaiming normal"): convolutions
    Kaiming normal (fan_out, ReLU gain), linear layers Kaiming normal (fan_in, ReLU gain),
    every bias zero, BatchNorm weight 1 and bias 0. ``init="torch"`` keeps PyTorch's defaults
    (Kaiming uniform with a = sqrt(5), uniform biases): the author's ``SimpleCNN``, which is
    this network at width 1 (same layers, conv biases, parameter count).

    Parameter count at width 1 and 10 classes: **5,352,778** (convs 1,145,408, BatchNorm
    1,792, FC1 4,195,328, FC2 10,250), not the "~4.2 million" the paper states (FC1 alone
    is 4.2 M).
    """

    def __init__(self, num_classes: int = 10, width: float = 1.0, init: str = "kaiming"):
        super().__init__()
        num_classes = _check_num_classes(num_classes)
        width = _check_width(width)
        init = _check_init(init)
        c1, c2, c3 = (_scaled(c, width) for c in (64, 128, 256))
        hidden = _scaled(1024, width)
        self.features = _conv_blocks((c1, c2, c3))
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c3 * 4 * 4, hidden), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(hidden, num_classes))
        if init == "kaiming":
            self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) of images (N, 3, 32, 32)."""
        _check_input(x)
        return self.classifier(self.features(x))


class MaCNN(nn.Module):
    """The cited work's "8-layer" CIFAR-10 CNN (Ma et al. 2020, official ``ToyModel``).

    Three blocks of [conv3x3 (padding 1, with bias) -> BatchNorm -> ReLU] x 2 with 64, 128,
    196 channels, each followed by MaxPool2d(2); every convolution is padded, so 32x32
    becomes 4x4 after the three pools and the flatten is 196 * 4 * 4 = 3136 -> Linear 256
    -> BatchNorm1d -> ReLU -> Linear ``num_classes``. No dropout.

    Initialisation as the official code (``init="kaiming"``): convolutions Kaiming uniform
    (fan_in, ReLU gain), linear weights Xavier uniform; biases and BatchNorm keep PyTorch's
    defaults. ``init="torch"`` keeps PyTorch's defaults everywhere.
    ``width`` (not in the cited work; 1.0 there) scales the channels and hidden size for
    quick runs. Parameter count at width 1 and 10 classes: 1,639,794.
    """

    def __init__(self, num_classes: int = 10, width: float = 1.0, init: str = "kaiming"):
        super().__init__()
        num_classes = _check_num_classes(num_classes)
        width = _check_width(width)
        init = _check_init(init)
        c1, c2, c3 = (_scaled(c, width) for c in (64, 128, 196))
        hidden = _scaled(256, width)
        self.features = _conv_blocks((c1, c2, c3))
        self.flatten_dim = c3 * 4 * 4
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(self.flatten_dim, hidden), nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))
        if init == "kaiming":
            self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) of images (N, 3, 32, 32)."""
        _check_input(x)
        return self.classifier(self.features(x))


def build_model(name: str, num_classes: int = 10, width: float = 1.0, init: str = "kaiming") -> nn.Module:
    """``"paper"`` -> :class:`PaperCNN`, ``"ma2020"`` -> :class:`MaCNN`, initialised by ``init``."""
    if name == "paper":
        return PaperCNN(num_classes, width, init)
    if name == "ma2020":
        return MaCNN(num_classes, width, init)
    raise ValueError(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")
