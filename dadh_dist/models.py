"""The two hash streams: a backbone and a k-unit tanh head each (plain nn.Modules, no DDP).

Images arrive as uint8 (N, C, H, W) on the device; `Preprocess` turns them into normalised
floats at the backbone's input size there, so the input pipeline never does per-image work.
Backbone weights come from a local file when `pretrained_path` is set; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as nnf
from torch import nn

TORCHVISION_BACKBONES = ("alexnet", "resnet18", "resnet50", "vgg16")


class Preprocess(nn.Module):
    """uint8 → float in [0, 1], channel repeat (gray → RGB when needed), resize, normalise."""

    def __init__(self, in_channels: int, out_channels: int, size: int, imagenet_norm: bool):
        super().__init__()
        self.in_channels, self.out_channels, self.size = in_channels, out_channels, size
        if imagenet_norm:
            mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
        else:
            mean, std = [0.5] * out_channels, [0.5] * out_channels
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0
        if self.in_channels == 1 and self.out_channels == 3:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = nnf.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
        return (x - self.mean) / self.std


class SmallCNN(nn.Module):
    """Three conv blocks and a global average pool: a CPU-friendly backbone for small images.

    No batch norm and no dropout, so a forward pass is a pure function of the weights and the
    image: W workers and one worker compute the same outputs. `norm="group"` puts a GroupNorm
    after every convolution; it normalises each image on its own, so that stays true.
    """

    def __init__(self, in_channels: int, width: int = 32, norm: str = "none"):
        super().__init__()
        w = width

        def block(cin: int, cout: int) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1)]
            if norm == "group":
                layers.append(nn.GroupNorm(min(8, cout), cout))
            elif norm != "none":
                raise ValueError(f"model.norm: unknown normalisation {norm!r}")
            return [*layers, nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_channels, w), *block(w, w), nn.MaxPool2d(2),
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
            *block(2 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Sequential(nn.Linear(4 * w, 8 * w), nn.ReLU(inplace=True))
        self.out_features = 8 * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def _torchvision_backbone(name: str, pretrained_path: str) -> tuple[nn.Module, int]:
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    if pretrained_path:
        path = Path(pretrained_path)
        if not path.is_file():
            raise FileNotFoundError(f"model.pretrained_path: {path} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing, unexpected = net.load_state_dict(state, strict=False)
        head_keys = {"fc.weight", "fc.bias", "classifier.6.weight", "classifier.6.bias"}
        if set(missing) - head_keys or unexpected:
            raise ValueError(
                f"model.pretrained_path: {path} does not fit {name} "
                f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
            )
    # Drop the classifier's last layer; the hash head replaces it.
    if name.startswith("resnet"):
        dim = net.fc.in_features
        net.fc = nn.Identity()
    else:
        dim = net.classifier[6].in_features
        net.classifier[6] = nn.Identity()
    return net, dim


class HashStream(nn.Module):
    """x (uint8 images) → tanh(W·backbone(x) + b) ∈ (−1, 1)^k."""

    def __init__(
        self,
        bits: int,
        in_channels: int,
        image_size: int,
        backbone: str = "small_cnn",
        width: int = 32,
        input_size: int = 0,
        pretrained_path: str = "",
        norm: str = "none",
    ):
        super().__init__()
        if backbone == "small_cnn":
            size = input_size or image_size
            self.preprocess = Preprocess(in_channels, in_channels, size, imagenet_norm=False)
            self.backbone: nn.Module = SmallCNN(in_channels, width, norm)
            dim = self.backbone.out_features
        elif backbone in TORCHVISION_BACKBONES:
            size = input_size or 224
            self.preprocess = Preprocess(in_channels, 3, size, imagenet_norm=True)
            self.backbone, dim = _torchvision_backbone(backbone, pretrained_path)
        else:
            raise ValueError(f"model.backbone: unknown backbone {backbone!r}")
        self.head = nn.Linear(dim, bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.head(self.backbone(self.preprocess(x))))


def build_streams(
    bits: int,
    in_channels: int,
    image_size: int,
    *,
    backbone: str,
    width: int,
    input_size: int = 0,
    pretrained_path: str = "",
    two_streams: bool = True,
    seed: int = 0,
    norm: str = "none",
) -> tuple[HashStream, HashStream | None]:
    """Two streams with separate weights (f seeded by `seed`, g by `seed + 1`)."""

    def make(s: int) -> HashStream:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            return HashStream(bits, in_channels, image_size, backbone, width, input_size,
                              pretrained_path, norm)

    f = make(seed)
    g = make(seed + 1) if two_streams else None
    return f, g
