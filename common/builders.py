"""Model, data and sampling helpers shared by the two class-conditional image-diffusion scripts (dtr.py and
ant_clustering.py): the parts of DiT's train.py / sample_ddp.py that are not about either paper."""
import math
import os

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from common.diffusion import classifier_free_guidance, create_diffusion
from common.dit import DiT, DiT_models
from common.train_utils import fail, random_hflip, save_image_grid
from common.unet import UNetModel

#################################################################################
#                                   Models                                      #
#################################################################################

# Not in the DiT paper: a 6-block, 192-wide DiT that trains in minutes on a CPU (the scripts' no-argument default).
DIT_TINY = dict(depth=6, hidden_size=192, patch_size=4, num_heads=3)

# guided-diffusion's class-conditional ImageNet configs (Dhariwal & Nichol 2021, Table 11 / model card flags),
# by resolution; "ADM-S" is a small variant of ours for CPU runs and tests.
ADM_CONFIGS = {
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
    """A DiT-*/p, DiT-Ti/4, ADM (guided-diffusion config for the resolution) or ADM-S by name."""
    dit_kwargs = dict(input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                      learn_sigma=learn_sigma, class_dropout_prob=class_dropout_prob)
    if name in DiT_models:
        model = DiT_models[name](**dit_kwargs)
    elif name == "DiT-Ti/4":
        model = DiT(**dit_kwargs, **DIT_TINY)
    elif name in ("ADM", "ADM-S"):
        if name == "ADM" and input_size not in ADM_CONFIGS:
            fail(f"ADM has configs for image sizes {sorted(ADM_CONFIGS)}; use --image-size one of them or ADM-S")
        cfg = ADM_CONFIGS[input_size] if name == "ADM" else ADM_SMALL
        # guided-diffusion has no null class; one extra embedding row (index num_classes) serves classifier-free
        # guidance as in DiT, and the training loop drops labels (cfg_label_dropout) since UNetModel does not.
        model = UNetModel(image_size=input_size, in_channels=in_channels,
                          out_channels=in_channels * (2 if learn_sigma else 1), dropout=0.1 if name == "ADM" else 0.0,
                          num_classes=num_classes + 1, use_scale_shift_norm=True, resblock_updown=True,
                          use_new_attention_order=True, **cfg)  # attention_resolutions = downsample factors
        model.class_dropout_prob = class_dropout_prob
    else:
        fail(f"unknown --model '{name}'; choose one of: {', '.join(MODEL_NAMES)}")
    model.null_class = num_classes
    return model


def cfg_label_dropout(model, y):
    """Replace labels by the null class with prob. class_dropout_prob for the U-Net (DiT drops them itself)."""
    if isinstance(model, UNetModel) and model.training and model.class_dropout_prob > 0:
        drop = torch.rand(y.shape, device=y.device) < model.class_dropout_prob
        y = torch.where(drop, torch.full_like(y, model.null_class), y)
    return y


#################################################################################
#                                    Data                                       #
#################################################################################

def create_dataset(data, image_size, num_classes=None, latent=False):
    """Returns (dataset, channels, spatial size, num_classes) for --data synthetic | PATH, --latent DIR."""
    if latent:
        from data.latents import LatentDataset
        ds = LatentDataset(data)
        c, h, _ = ds.latent_shape
        return ds, c, h, ds.num_classes
    if data == "synthetic":
        from data.synthetic import SyntheticShapes
        ds = SyntheticShapes(num_samples=10_000, image_size=image_size, num_classes=num_classes or 4)
        return ds, 3, image_size, ds.num_classes
    from data.image_folder import ImageFolder
    ds = ImageFolder(data, image_size)
    return ds, 3, image_size, len(ds.classes)


def prepare_batch(batch, device, latent, flip=True):
    """Move a batch to the device; latent batches sample the stored VAE posterior, pixel batches get a flip."""
    if latent:
        from data.latents import sample_latents
        x, y = sample_latents(batch)
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    x, y = batch
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return (random_hflip(x) if flip else x), y


def load_vae(path, device):
    """The SD VAE (common/vae.py) from a local weight file, for encoding/decoding latents."""
    from common.vae import AutoencoderKL
    return AutoencoderKL.from_pretrained_file(path).to(device).eval()


#################################################################################
#                                   Sampling                                    #
#################################################################################

@torch.no_grad()
def sample_images(model, labels, input_shape, sampler="ddpm", num_steps=250, cfg_scale=1.5, cfg_channels=None,
                  noise_schedule="linear", learn_sigma=True, eta=0.0, vae=None, generator=None, progress=False):
    """Class-conditional samples in [-1, 1] (decoded through the VAE in latent mode)."""
    respacing = f"ddim{num_steps}" if sampler == "ddim" and 1000 % num_steps == 0 else str(num_steps)
    diffusion = create_diffusion(respacing, noise_schedule, learn_sigma)
    fn = model
    if cfg_scale != 1.0:
        guided = input_shape[0] if cfg_channels is None else cfg_channels
        fn = classifier_free_guidance(model, cfg_scale, model.null_class, guided)
    shape = (len(labels), *input_shape)
    noise = torch.randn(shape, device=labels.device, generator=generator)
    loop = diffusion.ddim_sample_loop if sampler == "ddim" else diffusion.p_sample_loop
    kwargs = dict(eta=eta) if sampler == "ddim" else {}
    x = loop(fn, shape, noise=noise, model_kwargs=dict(y=labels), progress=progress, generator=generator,
             clip_denoised=vae is None, **kwargs)
    return vae.decode_from_latent(x).clamp(-1, 1) if vae is not None else x.clamp(-1, 1)


def write_sample_grid(model, path, input_shape, num_classes, device, n=16, seed=0, **sample_kwargs):
    """A PNG grid of n samples cycling through the classes (fixed seed, so grids are comparable over training)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    labels = torch.arange(n, device=device) % num_classes
    was_training = model.training
    model.eval()
    images = sample_images(model, labels, input_shape, generator=gen, **sample_kwargs)
    # latents without a VAE to decode them: show the first 3 latent channels as RGB
    save_image_grid(images[:, :3], path, nrow=int(math.ceil(math.sqrt(n))))
    model.train(was_training)


@torch.no_grad()
def sample_to_npz(model, out_dir, num_samples, batch_size, input_shape, num_classes, device, rank=0,
                  world_size=1, seed=0, **sample_kwargs):
    """DiT sample_ddp.py: each rank draws its share, rank 0 writes `samples.npz` (ADM's uint8 NHWC `arr_0`)."""
    from eval.fid import save_adm_npz
    os.makedirs(out_dir, exist_ok=True)
    per_rank = int(math.ceil(num_samples / world_size))
    gen = torch.Generator(device=device).manual_seed(seed * world_size + rank)
    chunks = []
    for start in tqdm(range(0, per_rank, batch_size), disable=rank != 0, desc="sampling"):
        labels = torch.randint(0, num_classes, (min(batch_size, per_rank - start),), device=device, generator=gen)
        x = sample_images(model, labels, input_shape, generator=gen, **sample_kwargs)
        chunks.append(((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu())
    # each rank writes its shard; rank 0 merges them (50K x 256^2 images do not fit an all_gather)
    np.save(os.path.join(out_dir, f"shard_rank{rank:03d}.npy"), torch.cat(chunks).numpy())
    if dist.is_initialized():
        dist.barrier()
    path = os.path.join(out_dir, "samples.npz")
    if rank == 0:
        shards = [os.path.join(out_dir, f"shard_rank{r:03d}.npy") for r in range(world_size)]
        images = np.concatenate([np.load(s) for s in shards])[:num_samples]
        save_adm_npz(path, images)
        save_image_grid(torch.from_numpy(images[:64]).permute(0, 3, 1, 2).float() / 127.5 - 1,
                        os.path.join(out_dir, "samples.png"))
        for s in shards:
            os.remove(s)
    if dist.is_initialized():
        dist.barrier()
    return path
