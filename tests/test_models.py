import pytest
import torch

from dadh_dist.config import ConfigError
from dadh_dist.models import HashStream, Preprocess, build_streams


def test_small_cnn_streams_separate_weights_and_range():
    f, g = build_streams(12, 1, 28, backbone="small_cnn", width=8, two_streams=True, seed=3)
    x = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    F, G = f(x), g(x)
    assert F.shape == G.shape == (5, 12)
    assert F.abs().max() < 1 and G.abs().max() < 1
    assert not torch.equal(F, G)  # separate weights
    f2, _ = build_streams(12, 1, 28, backbone="small_cnn", width=8, two_streams=True, seed=3)
    assert torch.equal(f2(x), F)  # seeded
    _, none = build_streams(12, 1, 28, backbone="small_cnn", width=8, two_streams=False, seed=3)
    assert none is None


@pytest.mark.parametrize("norm", ["none", "group"])
def test_outputs_do_not_depend_on_batch_composition(norm):
    """No batch norm: a row's output is the same alone or in a batch (W workers ≡ 1)."""
    f, _ = build_streams(8, 1, 8, backbone="small_cnn", width=8, two_streams=False, seed=0,
                         norm=norm)
    x = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    torch.testing.assert_close(f(x)[2:3], f(x[2:3]), rtol=1e-5, atol=1e-6)


def test_group_norm_is_in_the_network_and_unknown_norm_is_refused():
    f, _ = build_streams(8, 1, 8, backbone="small_cnn", width=16, two_streams=False, seed=0,
                         norm="group")
    norms = [m for m in f.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 5 and all(m.num_groups == 8 for m in norms)
    plain, _ = build_streams(8, 1, 8, backbone="small_cnn", width=16, two_streams=False, seed=0)
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in plain.modules())
    with pytest.raises(ValueError, match="model.norm"):
        build_streams(8, 1, 8, backbone="small_cnn", width=16, two_streams=False, seed=0,
                      norm="batch")


def test_preprocess_on_device_resizes_and_repeats_gray():
    p = Preprocess(1, 3, 32, imagenet_norm=True)
    x = torch.full((2, 1, 8, 8), 255, dtype=torch.uint8)
    y = p(x)
    assert y.shape == (2, 3, 32, 32) and y.dtype == torch.float32
    expect = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(y[0, :, 5, 5], expect)


def test_torchvision_backbone_loads_local_weights(tmp_path):
    import torchvision

    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pt"
    torch.save(ref.state_dict(), path)
    s = HashStream(16, 1, 28, backbone="resnet18", input_size=64, pretrained_path=str(path))
    assert torch.equal(s.backbone.conv1.weight, ref.conv1.weight)
    s.eval()
    out = s(torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8))
    assert out.shape == (2, 16)
    with pytest.raises(FileNotFoundError, match="model.pretrained_path"):
        HashStream(16, 1, 28, backbone="resnet18", pretrained_path=str(tmp_path / "none.pt"))
    torch.save({"junk": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="does not fit resnet18"):
        HashStream(16, 1, 28, backbone="resnet18", pretrained_path=str(tmp_path / "bad.pt"))


@pytest.mark.parametrize("name", ["alexnet", "vgg16", "resnet50"])
def test_other_backbones_build_with_hash_head(name):
    s = HashStream(24, 3, 32, backbone=name)
    assert s.head.out_features == 24
    assert s.preprocess.size == 224


@pytest.mark.parametrize("width", [1, 3, 4, 9, 12, 16])
def test_group_norm_takes_any_width_and_keeps_the_groups_of_the_widths_that_worked(width):
    """The group count is the largest divisor of the channels up to 8: min(8, channels) wherever
    that divides them (what checkpoints were trained with), something that divides otherwise."""
    f, _ = build_streams(8, 1, 8, backbone="small_cnn", width=width, two_streams=False, seed=0,
                         norm="group")
    norms = [m for m in f.modules() if isinstance(m, torch.nn.GroupNorm)]
    channels = [width, width, 2 * width, 2 * width, 4 * width]
    assert [m.num_channels for m in norms] == channels
    expect = {1: [1, 1, 2, 2, 4], 3: [3, 3, 6, 6, 6], 4: [4, 4, 8, 8, 8], 9: [3, 3, 6, 6, 6],
              12: [6, 6, 8, 8, 8], 16: [8, 8, 8, 8, 8]}[width]
    assert [m.num_groups for m in norms] == expect
    assert f(torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)).shape == (2, 8)


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling opens (creates) the marker file
        return (open, (self.marker, "w"))


def test_pretrained_path_that_is_no_state_dict_of_the_backbone_is_one_line_naming_it(tmp_path):
    import torchvision

    ref = torchvision.models.resnet18(weights=None).state_dict()
    good = tmp_path / "good.pt"
    torch.save(ref, good)
    marker = tmp_path / "code_ran"
    cases = {
        "truncated.pt": lambda p: p.write_bytes(good.read_bytes()[:4096]),
        "empty.pt": lambda p: p.write_bytes(b""),
        "text.pt": lambda p: p.write_text("not weights"),
        "whole_model.pt": lambda p: torch.save(torch.nn.Linear(2, 2), p),
        "code.pt": lambda p: torch.save({"conv1.weight": _RunsCodeWhenUnpickled(marker)}, p),
        "wrapped.pt": lambda p: torch.save({"state_dict": ref, "epoch": 3}, p),
        "tensor.pt": lambda p: torch.save(torch.zeros(3), p),
        "other_arch.pt": lambda p: torch.save(torchvision.models.alexnet().state_dict(), p),
        "shapes.pt": lambda p: torch.save({**ref, "conv1.weight": torch.zeros(64, 1, 7, 7)}, p),
        "folder": lambda p: p.mkdir(),
    }
    said = {}
    for name, write in cases.items():
        path = tmp_path / name
        write(path)
        with pytest.raises(ConfigError) as e:
            HashStream(16, 3, 32, backbone="resnet18", input_size=32, pretrained_path=str(path))
        said[name] = str(e.value)
        assert said[name].startswith(f"model.pretrained_path: {path} ") and "\n" not in said[name]
    assert not marker.exists()  # weights_only: the pickle's code never ran
    assert "pickled objects" in said["whole_model.pt"] and "pickled objects" in said["code.pt"]
    assert "'state_dict' entry" in said["wrapped.pt"]
    assert "does not fit resnet18 (missing" in said["other_arch.pt"]
    assert "conv1.weight (64, 1, 7, 7) vs (64, 3, 7, 7)" in said["shapes.pt"]

    # a fine-tuned classifier (any class count) and a file without BatchNorm's step counts
    # (saved before torch 0.4.1) load: the hash head replaces that layer, BatchNorm fills those
    tuned = {k: v for k, v in ref.items() if not k.endswith("num_batches_tracked")}
    tuned["fc.weight"], tuned["fc.bias"] = torch.ones(10, 512), torch.ones(10)
    torch.save(tuned, tmp_path / "tuned.pt")
    s = HashStream(16, 3, 32, backbone="resnet18", input_size=32,
                   pretrained_path=str(tmp_path / "tuned.pt"))
    assert torch.equal(s.backbone.layer4[1].bn2.running_var, ref["layer4.1.bn2.running_var"])


def test_small_cnn_refuses_a_pretrained_path_it_would_ignore():
    with pytest.raises(ConfigError, match="model.pretrained_path: small_cnn"):
        HashStream(8, 1, 8, backbone="small_cnn", pretrained_path="weights/alexnet.pth")


def test_an_input_side_the_backbone_pools_to_nothing_is_refused_before_any_forward():
    x = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    for backbone, smallest in (("small_cnn", 4), ("alexnet", 63)):
        s = HashStream(8, 3, 8, backbone=backbone, input_size=smallest).eval()
        assert s(x).shape == (2, 8)  # the smallest side works
        with pytest.raises(ConfigError, match=f"model.input_size: {backbone} needs at least "
                                              f"{smallest} px"):
            HashStream(8, 3, 8, backbone=backbone, input_size=smallest - 1)
    with pytest.raises(ConfigError, match="model.input_size: vgg16 needs at least 32 px"):
        HashStream(8, 3, 8, backbone="vgg16", input_size=31)
    with pytest.raises(ConfigError, match=r"the images are 3 px; set it"):
        HashStream(8, 1, 3, backbone="small_cnn")
