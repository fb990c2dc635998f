"""LPIPS v0.1 (Zhang et al. 2018, richzhang/PerceptualSimilarity), written out without torchvision.

d(x0, x1) = sum_l mean_{h,w} w_l . (n(f_l(x0)) - n(f_l(x1)))^2        (Eq. 1 of the paper; v0.1 code)
with f_l the backbone activations after the l-th upstream slice, n(.) the unit normalisation of every spatial
position's channel vector (eps 1e-10), and w_l >= 0 the learned 1x1 "lin" conv (no bias).

Inputs are images in [-1, 1] (pass normalize=True for [0, 1]); they first go through the fixed ScalingLayer.
Weights are two local files, both in their upstream key format:
  - backbone_weights: torchvision `alexnet-owt-7be5be79.pth` / `vgg16-397923af.pth` (`features.N.weight/bias`; the
    `classifier.*` keys are ignored). An lpips-style `net.sliceK.N.*` dict is accepted too.
  - lin_weights: lpips `weights/v0.1/alex.pth` / `vgg.pth` with keys `lin0.model.1.weight` ... `lin4.model.1.weight`
    (index 1 because upstream's NetLinLayer is Sequential(Dropout, Conv2d)).
Leaving a file out keeps random (untrained) weights: only useful for tests, the distances mean nothing then.
"""
import os
import re

import torch
import torch.nn as nn

#################################################################################
#                     Backbones (torchvision `features` layout)                  #
#################################################################################


def alexnet_features():
    """torchvision AlexNet `features[0:12]` (the final max pool is unused by LPIPS)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(),  # 0, 1 -> relu1
        nn.MaxPool2d(kernel_size=3, stride=2),                              # 2
        nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(),            # 3, 4 -> relu2
        nn.MaxPool2d(kernel_size=3, stride=2),                              # 5
        nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(),           # 6, 7 -> relu3
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(),           # 8, 9 -> relu4
        nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(),           # 10, 11 -> relu5
    )


def vgg16_features():
    """torchvision VGG16 (config "D") `features[0:30]`: 3x3 convs + ReLU, 2x2 max pools (the last pool is unused)."""
    layers, in_channels = [], 3
    for width in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512):
        if width == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_channels, width, kernel_size=3, padding=1), nn.ReLU()]
            in_channels = width
    return nn.Sequential(*layers)


# name -> (features builder, index of the last layer of each upstream slice, channels of each tapped layer).
# lpips `pretrained_networks.py` slices: alexnet [0,2) [2,5) [5,8) [8,10) [10,12);
#                                        vgg16   [0,4) [4,9) [9,16) [16,23) [23,30).
BACKBONES = {
    "alex": (alexnet_features, (1, 4, 7, 9, 11), (64, 192, 384, 256, 256)),
    "vgg": (vgg16_features, (3, 8, 15, 22, 29), (64, 128, 256, 512, 512)),
}


class Backbone(nn.Module):
    """Runs torchvision's `features` and returns the activations at the end of every upstream LPIPS slice."""

    def __init__(self, net):
        super().__init__()
        build, self.taps, self.channels = BACKBONES[net]
        self.features = build()

    def forward(self, x):
        outs = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.taps:
                outs.append(x)
        return outs


#################################################################################
#                                 LPIPS Distance                                #
#################################################################################

class ScalingLayer(nn.Module):
    """Fixed per-channel shift / scale that maps [-1, 1] inputs to the backbone's ImageNet statistics."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, x):
        return (x - self.shift) / self.scale


class NetLinLayer(nn.Module):
    """The learned per-channel weights w_l as a 1x1 conv without bias; Sequential(Dropout, Conv) as upstream."""

    def __init__(self, channels):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x):
        return self.model(x)


def normalize_channels(feat, eps=1e-10):
    """Unit-normalise the channel vector at every spatial position (lpips `normalize_tensor`)."""
    return feat / (feat.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def distance_from_features(feats0, feats1, lins):
    """Eq. (1): sum over layers of the spatial mean of lin_l((n(f0_l) - n(f1_l))^2); returns (B,)."""
    total = 0
    for f0, f1, lin in zip(feats0, feats1, lins, strict=True):
        diff = (normalize_channels(f0) - normalize_channels(f1)) ** 2
        total = total + lin(diff).mean(dim=(1, 2, 3))  # lin output has one channel: mean over (1, H, W)
    return total


class LPIPS(nn.Module):
    """LPIPS v0.1 distance between two image batches in [-1, 1]; `net` is "alex" (default) or "vgg"."""

    def __init__(self, net="alex", backbone_weights=None, lin_weights=None):
        super().__init__()
        net = {"vgg16": "vgg"}.get(net, net)
        if net not in BACKBONES:
            raise ValueError(f"unknown LPIPS backbone {net!r}; choose 'alex' or 'vgg'")
        self.scaling_layer = ScalingLayer()
        self.net = Backbone(net)
        for index, channels in enumerate(self.net.channels):  # attribute names lin0..lin4 match the lpips keys
            self.add_module(f"lin{index}", NetLinLayer(channels))
        self.lins = [getattr(self, f"lin{index}") for index in range(len(self.net.channels))]
        if backbone_weights is not None:
            self.load_backbone(backbone_weights)
        if lin_weights is not None:
            self.load_lins(lin_weights)
        self.eval()
        self.requires_grad_(False)

    def load_backbone(self, path):
        """torchvision classification checkpoint (`features.N.*`) or lpips-style `net.sliceK.N.*` state dict."""
        state_dict = _load_file(path, "backbone", "torchvision's alexnet-owt-7be5be79.pth / vgg16-397923af.pth")
        features = {}
        for key, value in state_dict.items():
            match = re.fullmatch(r"(?:features|(?:net\.)?slice\d+)\.(\d+\.(?:weight|bias))", key)
            if match:
                features[match.group(1)] = value
        try:
            self.net.features.load_state_dict(features, strict=True)
        except RuntimeError as error:
            first_line = str(error).strip().splitlines()[0]
            raise ValueError(f"{path!r} does not match the {type(self.net).__name__} layout "
                             f"({first_line}); pass the torchvision file of the same network") from None

    def load_lins(self, path):
        """lpips v0.1 lin weights (`lin{k}.model.1.weight`)."""
        state_dict = _load_file(path, "lin", "lpips weights/v0.1/alex.pth or vgg.pth")
        keys = [f"lin{index}.model.1.weight" for index in range(len(self.lins))]
        missing = [key for key in keys if key not in state_dict]
        if missing:
            raise ValueError(f"{path!r} lacks {missing}; pass the lpips v0.1 weight file of the same backbone")
        for key, lin in zip(keys, self.lins):
            if state_dict[key].shape != lin.model[1].weight.shape:
                raise ValueError(f"{path!r}: {key} has shape {tuple(state_dict[key].shape)}, expected "
                                 f"{tuple(lin.model[1].weight.shape)}; pass the lin file of the same backbone")
            lin.model[1].weight.data.copy_(state_dict[key])

    def forward(self, in0, in1, normalize=False):
        if in0.shape != in1.shape or in0.ndim != 4 or in0.shape[1] != 3:
            raise ValueError(f"need two (B, 3, H, W) batches of one shape, got {tuple(in0.shape)} and "
                             f"{tuple(in1.shape)}")
        if normalize:  # [0, 1] -> [-1, 1]
            in0, in1 = 2 * in0 - 1, 2 * in1 - 1
        feats0 = self.net(self.scaling_layer(in0))
        feats1 = self.net(self.scaling_layer(in1))
        return distance_from_features(feats0, feats1, self.lins)


def _load_file(path, what, name):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LPIPS {what} weights not found at {path!r}; pass a local copy of {name}")
    return torch.load(path, map_location="cpu", weights_only=True)
