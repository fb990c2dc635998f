"""LPIPS v0.1: metric properties, upstream key names, and the normalise / diff / lin / mean pipeline by hand."""
import numpy as np
import pytest
import torch

from eval.lpips import LPIPS, ScalingLayer, distance_from_features

# torchvision `features` indices of the convolutions (AlexNet: conv ReLU pool conv ReLU pool conv ReLU conv ReLU conv;
# VGG16 "D": 2-2-3-3-3 convs, each followed by ReLU, max pool between stages).
ALEX_CONVS = [0, 3, 6, 8, 10]
VGG_CONVS = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
CHANNELS = {"alex": [64, 192, 384, 256, 256], "vgg": [64, 128, 256, 512, 512]}
# Conv parameters of torchvision's `features`: total minus classifier from the weights metadata,
# alexnet 61,100,840 - 58,631,144 and vgg16 138,357,544 - 123,642,856.
FEATURE_PARAMS = {"alex": 2_469_696, "vgg": 14_714_688}


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """Random AlexNet weights in torchvision's key format and non-negative lin weights in lpips v0.1's format."""
    folder = tmp_path_factory.mktemp("lpips")
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        backbone = LPIPS("alex").net.features.state_dict()
    torchvision_style = {f"features.{k}": v for k, v in backbone.items()}
    torchvision_style["classifier.1.weight"] = torch.zeros(4096, 9216)  # ignored, as the classifier head
    lpips_style = {f"net.slice{1 + [0, 3, 6, 8, 10].index(int(k.split('.')[0]))}.{k}": v for k, v in backbone.items()}
    lins = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=generator)
            for i, c in enumerate(CHANNELS["alex"])}
    torch.save(torchvision_style, folder / "alexnet.pth")
    torch.save(lpips_style, folder / "alexnet_lpips_style.pth")
    torch.save(lins, folder / "alex.pth")
    return folder


@pytest.fixture(scope="module")
def model(weight_files):
    return LPIPS("alex", backbone_weights=str(weight_files / "alexnet.pth"), lin_weights=str(weight_files / "alex.pth"))


def test_distance_properties(model):
    x, y = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    d_xx, d_xy, d_yx = model(x, x), model(x, y), model(y, x)
    assert d_xx.shape == (2,) and torch.all(d_xx.abs() < 1e-7)
    assert torch.allclose(d_xy, d_yx, rtol=1e-5, atol=1e-7)
    assert torch.all(d_xy > 1e-3)
    assert torch.allclose(model((x + 1) / 2, (y + 1) / 2, normalize=True), d_xy, rtol=1e-5)  # [0, 1] inputs


def test_key_names_and_parameter_counts():
    for net, convs in (("alex", ALEX_CONVS), ("vgg", VGG_CONVS)):
        with torch.device("meta"):
            lpips = LPIPS(net)
        state = lpips.state_dict()
        backbone = {f"net.features.{i}.{p}" for i in convs for p in ("weight", "bias")}
        lins = {f"lin{k}.model.1.weight" for k in range(5)}
        assert set(state) == backbone | lins | {"scaling_layer.shift", "scaling_layer.scale"}
        assert [tuple(state[f"lin{k}.model.1.weight"].shape) for k in range(5)] == [(1, c, 1, 1) for c in CHANNELS[net]]
        assert sum(p.numel() for p in lpips.net.parameters()) == FEATURE_PARAMS[net]


def test_backbone_taps_are_the_upstream_slices(model):
    # AlexNet at 64 px: conv1 (k11, s4, p2) -> 15, pool -> 7, conv2 -> 7, pool -> 3, conv3..5 -> 3.
    feats = model.net(torch.rand(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 15, 15), (192, 7, 7), (384, 3, 3), (256, 3, 3), (256, 3, 3)]
    assert all(bool((f >= 0).all()) for f in feats)  # taps sit after a ReLU
    feats = LPIPS("vgg").net(torch.rand(1, 3, 32, 32))  # 3x3 same convs, 2x2 pools between slices
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 2, 2)]


def test_pipeline_matches_hand_computation_on_toy_feature():
    # One layer: n(f) = f / (|f|_channels + 1e-10), d = mean_hw sum_c w_c (n(f0) - n(f1))_c^2.
    rng = np.random.default_rng(0)
    f0, f1 = rng.standard_normal((2, 4, 3, 5)), rng.standard_normal((2, 4, 3, 5))
    w = rng.uniform(0, 1, 4)
    n0 = f0 / (np.sqrt((f0 ** 2).sum(axis=1, keepdims=True)) + 1e-10)
    n1 = f1 / (np.sqrt((f1 ** 2).sum(axis=1, keepdims=True)) + 1e-10)
    expected = np.einsum("c,bchw->b", w, (n0 - n1) ** 2) / (3 * 5)
    lin = torch.nn.Conv2d(4, 1, kernel_size=1, bias=False).double().requires_grad_(False)
    lin.weight.data = torch.tensor(w).view(1, 4, 1, 1)
    got = distance_from_features([torch.tensor(f0)], [torch.tensor(f1)], [lin])
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    # Two layers add up.
    both = distance_from_features([torch.tensor(f0)] * 2, [torch.tensor(f1)] * 2, [lin, lin])
    np.testing.assert_allclose(both.numpy(), 2 * expected, rtol=1e-12)


def test_scaling_layer_constants():
    shift, scale = torch.tensor([-0.030, -0.088, -0.188]), torch.tensor([0.458, 0.448, 0.450])
    layer = ScalingLayer()
    assert torch.allclose(layer(shift.view(1, 3, 1, 1)), torch.zeros(1, 3, 1, 1))
    assert torch.allclose(layer((shift + scale).view(1, 3, 1, 1)), torch.ones(1, 3, 1, 1))


def test_lpips_style_backbone_file_gives_same_model(model, weight_files):
    other = LPIPS("alex", backbone_weights=str(weight_files / "alexnet_lpips_style.pth"),
                  lin_weights=str(weight_files / "alex.pth"))
    x, y = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.equal(other(x, y), model(x, y))


def test_bad_inputs_give_clear_errors(weight_files, tmp_path):
    with pytest.raises(FileNotFoundError, match="alexnet-owt"):
        LPIPS("alex", backbone_weights=str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match="v0.1"):
        LPIPS("alex", lin_weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="choose 'alex' or 'vgg'"):
        LPIPS("squeeze")
    torch.save({"lin0.model.1.weight": torch.rand(1, 64, 1, 1)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="lin1.model.1.weight"):
        LPIPS("alex", lin_weights=str(tmp_path / "partial.pth"))
    with pytest.raises(ValueError, match="same backbone"):  # alex lin file into a VGG LPIPS: wrong shapes
        LPIPS("vgg", lin_weights=str(weight_files / "alex.pth"))
    with pytest.raises(ValueError, match="torchvision file"):
        LPIPS("vgg", backbone_weights=str(weight_files / "alexnet.pth"))
    with pytest.raises(ValueError, match="one shape"):
        LPIPS("alex")(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 16, 16))
