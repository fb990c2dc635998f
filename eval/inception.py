"""The FID Inception-v3 of mseitzer/pytorch-fid, written out without torchvision.

pytorch-fid (`src/pytorch_fid/inception.py`, `fid_inception_v3`) builds torchvision's `Inception3` with 1008 classes
and no AuxLogits, then swaps in blocks that mimic the 2015 TensorFlow graph the FID was defined on:
  - FIDInceptionA / FIDInceptionC / Mixed_7b (pytorch-fid's FIDInceptionE_1): the pool branch is a 3x3 average pool
    with count_include_pad=False, because TensorFlow does not count the zero padding in its average;
  - Mixed_7c (pytorch-fid's FIDInceptionE_2): the pool branch is a 3x3 *max* pool (a quirk of the TF graph).
Module and parameter names are torchvision's, so `pt_inception-2015-12-05-6726825d.pth` loads with strict=True. That
file has no AuxLogits keys (pytorch-fid builds `aux_logits=False` and loads strictly; toshas/torch-fidelity's
`convert_inception_weights.py` maps only the main trunk and `softmax/{weights,biases}` -> `fc`).

Input convention (exactly pytorch-fid's `InceptionV3(resize_input=True, normalize_input=True)`):
  x: float (B, 3, H, W) in [0, 1]  ->  bilinear resize to 299x299 (align_corners=False)  ->  2x - 1.
Outputs of `FIDInception.forward`:
  pool            (B, 2048)      pool_3 features, the FID features;
  spatial         (B, 7*17*17)   sFID features (ADM): the first 7 channels of TF's `mixed_6/conv`, which is the
                                 ReLU output of Mixed_6d.branch1x1 (TF mixed, mixed_1..mixed_10 = torchvision
                                 Mixed_5b..Mixed_7c, per torch-fidelity's name map), flattened in TF's NHWC order
                                 (h, w, c) so that ADM's stored `mu_s` / `sigma_s` line up feature by feature;
  logits          (B, 1008)      fc(pool) with bias;
  logits_unbiased (B, 1008)      pool @ fc.weight^T, the logits the Inception Score code of improved-gan / ADM
                                 (`softmax/logits/MatMul`) uses.
ADM's TF evaluator resizes inside the graph with TF's legacy bilinear kernel, so numbers computed here differ from
ADM's by a small amount; compare only numbers computed with the same pipeline.
"""
import os
from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
# pytorch-fid's FID_WEIGHTS_URL: where the user downloads the weight file once, by hand (no downloads here).
FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_NAME
NUM_SPATIAL_CHANNELS = 7  # ADM evaluator: spatial = mixed_6/conv[..., :7]


#################################################################################
#                         Inception-v3 Blocks (torchvision)                     #
#################################################################################

class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm(eps=0.001) -> ReLU, torchvision layout."""

    def __init__(self, in_channels, out_channels, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x):
    """3x3 stride-1 average pool that, like TensorFlow, ignores the zero padding (pytorch-fid's patch)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """Mixed_5b/5c/5d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | TF avg pool-1x1 branches (35x35 grid)."""

    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):
        branch1x1 = self.branch1x1(x)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(tf_avg_pool(x))
        return torch.cat([branch1x1, branch5x5, branch3x3dbl, branch_pool], 1)


class InceptionB(nn.Module):
    """Mixed_6a: grid reduction 35 -> 17 (strided 3x3 | 1x1-3x3-strided 3x3 | max pool). Unchanged by pytorch-fid."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        branch3x3 = self.branch3x3(x)
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch3x3dbl, branch_pool], 1)


class FIDInceptionC(nn.Module):
    """Mixed_6b..6e: 1x1 | factorised 7x7 | double factorised 7x7 | TF avg pool-1x1 branches (17x17 grid)."""

    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        branch1x1 = self.branch1x1(x)
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = conv(branch7x7dbl)
        branch_pool = self.branch_pool(tf_avg_pool(x))
        return torch.cat([branch1x1, branch7x7, branch7x7dbl, branch_pool], 1)


class InceptionD(nn.Module):
    """Mixed_7a: grid reduction 17 -> 8. Unchanged by pytorch-fid."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch7x7x3, branch_pool], 1)


class FIDInceptionE(nn.Module):
    """Mixed_7b (pool="avg", pytorch-fid's FIDInceptionE_1) and Mixed_7c (pool="max", FIDInceptionE_2), 8x8 grid."""

    def __init__(self, in_channels, pool):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' (Mixed_7b) or 'max' (Mixed_7c), got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        branch1x1 = self.branch1x1(x)
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        # The TF graph max-pools in the last block (pytorch-fid: "likely an error" in that graph, kept for FID parity).
        if self.pool == "max":
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = tf_avg_pool(x)
        branch_pool = self.branch_pool(pooled)
        return torch.cat([branch1x1, branch3x3, branch3x3dbl, branch_pool], 1)


#################################################################################
#                                FID Inception-v3                               #
#################################################################################

def preprocess(x):
    """[0, 1] images (B, 3, H, W) -> bilinear resize to 299x299 (align_corners=False) -> [-1, 1], as pytorch-fid."""
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    return 2 * x - 1


class FIDInception(nn.Module):
    """pytorch-fid's `fid_inception_v3()`; returns pool / spatial / logits features (see module docstring)."""

    def __init__(self, weights_path=None):
        super().__init__()
        # Stem (torchvision names). maxpool1/maxpool2/avgpool/dropout carry no parameters, so they are functional here.
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)  # 1008 = the TF graph's 1000 ImageNet classes + 8 unused
        if weights_path is not None:
            self.load_weights(weights_path)
        self.eval()
        self.requires_grad_(False)

    def load_weights(self, weights_path):
        """Load pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (strict)."""
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(
                f"FID Inception weights not found at {weights_path!r}: download {FID_WEIGHTS_URL} once by hand "
                f"and pass its local path")
        try:
            state_dict = torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - on arbitrary bytes torch's weights-only unpickler raises anything
            # (UnpicklingError, EOFError, IndexError, RuntimeError ...), its messages run to many lines; the user
            # needs the file name and the fix
            raise ValueError(f"{weights_path!r} is not a readable torch weight file ({type(e).__name__}); use "
                             f"{FID_WEIGHTS_NAME} from {FID_WEIGHTS_URL}") from None
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"{weights_path!r} holds a {type(state_dict).__name__}, not a state dict; use "
                             f"{FID_WEIGHTS_NAME} from {FID_WEIGHTS_URL}")
        state_dict = dict(state_dict)
        own = self.state_dict()
        # BatchNorm's step counter is bookkeeping, not a weight: older exports of the file may lack it.
        for key in own:
            if key.endswith("num_batches_tracked") and key not in state_dict:
                state_dict[key] = own[key]
        missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"{weights_path!r} is not pytorch-fid's FID Inception state dict ({len(missing)} missing keys, e.g. "
                f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}); use {FID_WEIGHTS_NAME}")
        wrong = [(k, tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__, tuple(own[k].shape))
                 for k, v in state_dict.items() if not isinstance(v, torch.Tensor) or v.shape != own[k].shape]
        if wrong:
            raise ValueError(f"{weights_path!r} has the FID Inception keys but {len(wrong)} tensors of the wrong shape "
                             f"(e.g. {wrong[0][0]}: {wrong[0][1]}, expected {wrong[0][2]}); use {FID_WEIGHTS_NAME}")
        self.load_state_dict(state_dict, strict=True)

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(x.shape)}; repeat grayscale to 3 "
                             f"channels")
        if not x.is_floating_point():
            raise ValueError(f"expected float images in [0, 1], got dtype {x.dtype}; divide uint8 images by 255")
        x = preprocess(x)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)                       # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                      # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)                       # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))                 # (B, 288, 35, 35)
        x = self.Mixed_6a(x)                                               # (B, 768, 17, 17)
        x = self.Mixed_6c(self.Mixed_6b(x))                                # (B, 768, 17, 17)
        # sFID reads TF's mixed_6/conv = Mixed_6d.branch1x1; re-running that 1x1 conv costs ~1% of the network.
        spatial = self.Mixed_6d.branch1x1(x)[:, :NUM_SPATIAL_CHANNELS]     # (B, 7, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(x))                                # (B, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))                 # (B, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))                                          # (B, 2048) pool_3
        spatial = spatial.permute(0, 2, 3, 1).flatten(1)                   # NHWC order like ADM's TF reshape
        return dict(pool=pool, spatial=spatial, logits=self.fc(pool),
                    logits_unbiased=pool @ self.fc.weight.t())
