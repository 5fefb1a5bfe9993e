"""The two hash streams: a backbone and a k-unit tanh head each (plain nn.Modules, no DDP).

Images arrive as uint8 (N, C, H, W) on the device; `Preprocess` turns them into normalised
floats at the backbone's input size there, so the input pipeline never does per-image work.
Backbone weights come from a local file when `pretrained_path` is set; nothing is downloaded.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as nnf
from torch import nn

from dadh_dist.config import MIN_INPUT_SIDE, ConfigError
from dadh_dist.uris import first_line

TORCHVISION_BACKBONES = ("alexnet", "resnet18", "resnet50", "vgg16")
HEAD_KEYS = ("fc.weight", "fc.bias", "classifier.6.weight", "classifier.6.bias")
"""The classifier layer the hash head replaces: not loaded from pretrained weights, whatever
its class count."""


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
    after every convolution; it normalises each image on its own, so that stays true. Its group
    count is the largest divisor of the channel count up to 8, so any width works.
    """

    def __init__(self, in_channels: int, width: int = 32, norm: str = "none"):
        super().__init__()
        w = width

        def block(cin: int, cout: int) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1)]
            if norm == "group":
                groups = max(d for d in range(1, 9) if cout % d == 0)
                layers.append(nn.GroupNorm(groups, cout))
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

    # the file first: a bad one is refused before a large network is built
    state = read_state_dict(Path(pretrained_path)) if pretrained_path else None
    net = getattr(torchvision.models, name)(weights=None)
    if state is not None:
        _load_pretrained(net, name, state, pretrained_path)
    # Drop the classifier's last layer; the hash head replaces it.
    if name.startswith("resnet"):
        dim = net.fc.in_features
        net.fc = nn.Identity()
    else:
        dim = net.classifier[6].in_features
        net.classifier[6] = nn.Identity()
    return net, dim


def read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    """The tensors of a file saved with torch.save(state_dict), read with weights_only: a file
    that would run code when unpickled (a whole pickled model, anything else) is refused."""
    where = f"model.pretrained_path: {path}"
    if path.is_dir():
        raise ConfigError(f"{where} is a folder; name the weights file")
    if not path.is_file():
        raise FileNotFoundError(f"{where} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # bytes that are no pickle of objects at all
            raise ConfigError(f"{where} is not a readable torch weights file "
                              f"({first_line(e)})") from None
        raise ConfigError(f"{where} holds pickled objects, not only tensors (a whole model?); "
                          "save the backbone's state_dict() instead") from None
    except Exception as e:  # truncated, empty or not a torch file: torch raises many kinds
        raise ConfigError(f"{where} is not a readable torch weights file "
                          f"({first_line(e)})") from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        raise ConfigError(f"{where} is a training checkpoint with a 'state_dict' entry; save "
                          "that entry alone (torch.save(ckpt['state_dict'], path))")
    if not isinstance(state, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ConfigError(f"{where} holds a {type(state).__name__}, not a state_dict (names "
                          "to tensors)")
    return state


def _load_pretrained(net: nn.Module, name: str, state: Mapping[str, torch.Tensor],
                     path: str) -> None:
    """The weights `state` (read from `path`) into `net`, all of them but the classifier layer
    the hash head replaces; weights of another architecture are refused, naming what does not
    fit."""
    state = {k: v for k, v in state.items() if k not in HEAD_KEYS}
    own = net.state_dict()
    # BatchNorm fills a missing step count itself (files saved before torch 0.4.1 have none)
    missing = sorted(k for k in own if k not in state and k not in HEAD_KEYS
                     and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in own)
    shapes = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state
                    if k in own and state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        found = [f"{what} {items[:3]}" for what, items in
                 (("missing", missing), ("unexpected", unexpected), ("shapes", shapes)) if items]
        raise ConfigError(f"model.pretrained_path: {path} does not fit {name} "
                          f"({', '.join(found)})")
    net.load_state_dict(state, strict=False)


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
        if backbone != "small_cnn" and backbone not in TORCHVISION_BACKBONES:
            raise ValueError(f"model.backbone: unknown backbone {backbone!r}")
        size = input_size or (image_size if backbone == "small_cnn" else 224)
        if size < MIN_INPUT_SIDE.get(backbone, 1):
            given = f"got {size}" if input_size else f"the images are {size} px; set it"
            raise ConfigError(f"model.input_size: {backbone} needs at least "
                              f"{MIN_INPUT_SIDE[backbone]} px ({given})")
        if backbone == "small_cnn":
            if pretrained_path:
                raise ConfigError(f"model.pretrained_path: small_cnn has no pretrained weights "
                                  f"to load ({', '.join(TORCHVISION_BACKBONES)} do); drop it")
            self.preprocess = Preprocess(in_channels, in_channels, size, imagenet_norm=False)
            self.backbone: nn.Module = SmallCNN(in_channels, width, norm)
            dim = self.backbone.out_features
        else:
            self.preprocess = Preprocess(in_channels, 3, size, imagenet_norm=True)
            self.backbone, dim = _torchvision_backbone(backbone, pretrained_path)
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
