"""The reference models netshrink ships, sized for the digits data (8x8, 28x28, 32x32 inputs)."""

from __future__ import annotations

from torch import nn


class LeNet300(nn.Module):
    """LeNet-300-100: a 3-layer perceptron (LeCun et al. 1998)."""

    def __init__(self, in_chans: int = 1, input_size: int = 28, num_classes: int = 10) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_chans * input_size * input_size, 300)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(300, 100)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x):
        x = self.relu1(self.fc1(self.flatten(x)))
        return self.fc3(self.relu2(self.fc2(x)))


class LeNet5(nn.Module):
    """LeNet-5 as used by Deep Compression and most pruning papers (Caffe variant):
    conv 20@5x5 - pool - conv 50@5x5 - pool - fc 500 - fc classes (431K params at 28x28).

    Inputs smaller than 20 pixels get padding 2 so 8x8 digits fit.
    """

    def __init__(self, in_chans: int = 1, input_size: int = 28, num_classes: int = 10) -> None:
        super().__init__()
        pad = 2 if input_size < 20 else 0
        self.conv1 = nn.Conv2d(in_chans, 20, 5, padding=pad)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(20, 50, 5, padding=pad)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        side = ((input_size + 2 * pad - 4) // 2 + 2 * pad - 4) // 2
        if side < 1:
            raise ValueError(f"lenet5 needs inputs of at least 8 pixels, got {input_size}")
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(50 * side * side, 500)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x):
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(self.flatten(x))))


def _conv_bn(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class VGGSmall(nn.Module):
    """A small VGG (CIFAR-style): 3 blocks of two 3x3 convs (32-64-128) with BatchNorm and
    max-pooling, then a 256-unit FC layer and the classifier."""

    def __init__(
        self,
        in_chans: int = 1,
        input_size: int = 32,
        num_classes: int = 10,
        widths: tuple[int, ...] = (32, 64, 128),
        hidden: int = 256,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_chans
        for width in widths:
            layers += _conv_bn(cin, width) + _conv_bn(width, width) + [nn.MaxPool2d(2)]
            cin = width
        self.features = nn.Sequential(*layers)
        side = input_size // (2 ** len(widths))
        if side < 1:
            raise ValueError(f"vgg_small needs inputs of at least {2 ** len(widths)} pixels")
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(cin * side * side, hidden)
        self.relu = nn.ReLU(inplace=True)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = self.flatten(self.features(x))
        return self.classifier(self.relu(self.fc1(x)))


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetSmall(nn.Module):
    """A small CIFAR-style ResNet: 3x3 stem, three stages of basic blocks (32-64-128, strides
    1-2-2), global average pooling and a linear classifier."""

    def __init__(
        self,
        in_chans: int = 1,
        input_size: int = 32,
        num_classes: int = 10,
        widths: tuple[int, ...] = (32, 64, 128),
        blocks: tuple[int, ...] = (1, 1, 1),
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(in_chans, widths[0]))
        stages = []
        cin = widths[0]
        for i, (width, count) in enumerate(zip(widths, blocks)):
            stage = []
            for j in range(count):
                stage.append(BasicBlock(cin, width, stride=2 if (i > 0 and j == 0) else 1))
                cin = width
            stages.append(nn.Sequential(*stage))
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.layers(self.stem(x)))))


ZOO = {
    "lenet300": (LeNet300, "LeNet-300-100 (MLP)", "fc3"),
    "lenet5": (LeNet5, "LeNet-5, Caffe variant (20-50-500)", "fc2"),
    "vgg_small": (VGGSmall, "small VGG, 6 convs 32-64-128 + FC 256", "classifier"),
    "resnet_small": (ResNetSmall, "small ResNet, 3 stages 32-64-128", "fc"),
}
