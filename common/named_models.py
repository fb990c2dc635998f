"""Models by name for the class-conditional image scripts (--model): DiT-*/p as in the DiT paper, a CPU-sized
DiT-Ti/4, guided-diffusion's ADM configs by resolution and a small ADM-S; plus the U-Net's label dropout for
classifier-free guidance (DiT drops labels itself)."""
import torch

from common.dit import DiT, DiT_models
from common.training_run import fail
from common.unet import UNetModel

# Not in the DiT paper: a 6-block, 192-wide DiT that trains in minutes on a CPU (the scripts' no-argument default).
DIT_TINY = dict(depth=6, hidden_size=192, patch_size=4, num_heads=3)

# guided-diffusion's class-conditional ImageNet configs (Dhariwal & Nichol 2021, Table 11 / model card flags),
# by resolution; "ADM-S" is a small variant of ours for CPU runs and tests.
ADM_CONFIGS = {
    # Not in guided-diffusion (it has no 32 px model) but used by MT-Diffusion (Table 2 at 32 px; latent sides 8 /
    # 16 / 32 for 64 / 128 / 256 px images through the 8x SD-VAE): improved-diffusion's 32 px channel_mult, narrowed
    # for 16 and 8, at App. E.2's width (192 channels, 3 res blocks), attention at the 16 / 8 / 4 px levels present.
    8: dict(model_channels=192, channel_mult=(1, 2), attention_resolutions=(1, 2), num_res_blocks=3,
            num_head_channels=64),
    16: dict(model_channels=192, channel_mult=(1, 2, 2), attention_resolutions=(1, 2, 4), num_res_blocks=3,
             num_head_channels=64),
    32: dict(model_channels=192, channel_mult=(1, 2, 2, 2), attention_resolutions=(2, 4, 8), num_res_blocks=3,
             num_head_channels=64),
    64: dict(model_channels=192, channel_mult=(1, 2, 3, 4), attention_resolutions=(2, 4, 8), num_res_blocks=3,
             num_head_channels=64),
    128: dict(model_channels=256, channel_mult=(1, 1, 2, 3, 4), attention_resolutions=(4, 8, 16),
              num_res_blocks=2, num_head_channels=64),
    256: dict(model_channels=256, channel_mult=(1, 1, 2, 2, 4, 4), attention_resolutions=(8, 16, 32),
              num_res_blocks=2, num_head_channels=64),
}

ADM_SMALL = dict(model_channels=64, channel_mult=(1, 2, 2), attention_resolutions=(2,), num_res_blocks=2,
                 num_head_channels=32)

MODEL_NAMES = sorted(DiT_models) + ["DiT-Ti/4", "ADM", "ADM-S"]

def create_model(name, input_size, in_channels, num_classes, learn_sigma=True, class_dropout_prob=0.1):
    """A DiT-*/p, DiT-Ti/4, ADM (guided-diffusion config for the resolution) or ADM-S by name. num_classes = 1 is
    an unconditional model, as DiT/DTR upstream: no label dropout, a 1-row label table, no null class."""
    if num_classes == 1:
        class_dropout_prob = 0.0
    dit_kwargs = dict(input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                      learn_sigma=learn_sigma, class_dropout_prob=class_dropout_prob)
    if name.startswith("DiT"):
        patch = int(name.rsplit("/", 1)[1]) if "/" in name else 0
        if patch and input_size % patch:
            fail(f"{name} needs an input size divisible by its patch size {patch}, got {input_size}"
                 f"{' (latents are 1/8 of --image-size)' if in_channels == 4 else ''}; change --image-size")
    if name in DiT_models:
        model = DiT_models[name](**dit_kwargs)
    elif name == "DiT-Ti/4":
        model = DiT(**dit_kwargs, **DIT_TINY)
    elif name in ("ADM", "ADM-S"):
        if name == "ADM" and input_size not in ADM_CONFIGS:
            fail(f"ADM has configs for image sizes {sorted(ADM_CONFIGS)}; use --image-size one of them or ADM-S")
        cfg = ADM_CONFIGS[input_size] if name == "ADM" else ADM_SMALL
        factor = 2 ** (len(cfg["channel_mult"]) - 1)
        if input_size % factor:
            fail(f"{name} downsamples {factor}x: it needs an input size divisible by {factor}, got {input_size}; "
                 f"change --image-size")
        # guided-diffusion has no null class; one extra embedding row (index num_classes) serves classifier-free
        # guidance as in DiT, and the training loop drops labels (cfg_label_dropout) since UNetModel does not.
        model = UNetModel(image_size=input_size, in_channels=in_channels,
                          out_channels=in_channels * (2 if learn_sigma else 1), dropout=0.1 if name == "ADM" else 0.0,
                          num_classes=num_classes + (class_dropout_prob > 0), use_scale_shift_norm=True,
                          resblock_updown=True, use_new_attention_order=True, **cfg)  # attention res = factors
        model.class_dropout_prob = class_dropout_prob
    else:
        fail(f"unknown --model '{name}'; choose one of: {', '.join(MODEL_NAMES)}")
    model.null_class = num_classes if class_dropout_prob > 0 else None  # None: no guidance possible
    return model


def cfg_label_dropout(model, y):
    """Replace labels by the null class with prob. class_dropout_prob for the U-Net (DiT drops them itself)."""
    if isinstance(model, UNetModel) and model.training and model.class_dropout_prob > 0:
        drop = torch.rand(y.shape, device=y.device) < model.class_dropout_prob
        y = torch.where(drop, torch.full_like(y, model.null_class), y)
    return y
