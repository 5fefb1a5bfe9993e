import pytest
import torch

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
