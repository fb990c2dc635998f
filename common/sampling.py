"""Sampling the class-conditional image models (DiT sample.py / sample_ddp.py for any sampler): images in [-1, 1]
with classifier-free guidance, PNG grids during training, and ADM `.npz` files sharded over ranks."""
import math
import os

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from common.adm_npz import save_adm_npz, to_uint8
from common.diffusion import classifier_free_guidance, create_diffusion
from common.training_run import save_image_grid


def clips_predicted_x0(latent):
    """The one place that decides whether samplers clip the predicted x0 to [-1, 1]: pixels yes (guided-diffusion
    image_sample.py, clip_denoised=True), latents never (DiT / DTR / ANT sample_ddp.py, clip_denoised=False: an SD
    latent spans about [-4, 4])."""
    return not latent


@torch.no_grad()
def sample_images(model, labels, input_shape, sampler="ddpm", num_steps=250, cfg_scale=1.5, cfg_channels=None,
                  noise_schedule="linear", learn_sigma=True, eta=0.0, vae=None, generator=None, progress=False,
                  latent=None):
    """Class-conditional samples in [-1, 1], decoded through `vae` when given. latent (default: vae is given)
    decides the clipping of the predicted x0 (clips_predicted_x0). cfg_scale 1 (or an unconditional model) samples
    without guidance; eta is DDIM's (0 = deterministic)."""
    latent = vae is not None if latent is None else latent
    respacing = f"ddim{num_steps}" if sampler == "ddim" and 1000 % num_steps == 0 else str(num_steps)
    diffusion = create_diffusion(respacing, noise_schedule, learn_sigma)
    fn = model
    if cfg_scale != 1.0:
        if model.null_class is None:
            raise ValueError("an unconditional model has no null class: sample it with cfg_scale 1")
        guided = input_shape[0] if cfg_channels is None else cfg_channels
        fn = classifier_free_guidance(model, cfg_scale, model.null_class, guided)
    shape = (len(labels), *input_shape)
    noise = torch.randn(shape, device=labels.device, generator=generator)
    loop = diffusion.ddim_sample_loop if sampler == "ddim" else diffusion.p_sample_loop
    kwargs = dict(eta=eta) if sampler == "ddim" else {}
    x = loop(fn, shape, noise=noise, model_kwargs=dict(y=labels), progress=progress, generator=generator,
             clip_denoised=clips_predicted_x0(latent), **kwargs)
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
def write_samples_npz(draw, out_dir, num_samples, batch_size, device, rank=0, world_size=1, seed=0, desc="sampling",
                      quantize="dit"):
    """DiT sample_ddp.py for any sampler: draw(n, generator) -> n images (N, C, H, W) in [-1, 1]; each rank draws its
    share with its own seeded generator, rank 0 merges them into `samples.npz` (ADM's uint8 NHWC `arr_0`, rounded
    by `to_uint8`) and a PNG preview. Returns the .npz path."""
    os.makedirs(out_dir, exist_ok=True)
    per_rank = int(math.ceil(num_samples / world_size))
    gen = torch.Generator(device=device).manual_seed(seed * world_size + rank)
    chunks = []
    for start in tqdm(range(0, per_rank, batch_size), disable=rank != 0, desc=desc):
        x = draw(min(batch_size, per_rank - start), gen)
        chunks.append(to_uint8(x, quantize))
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


def sample_to_npz(model, out_dir, num_samples, batch_size, input_shape, num_classes, device, rank=0,
                  world_size=1, seed=0, quantize="dit", **sample_kwargs):
    """Class-conditional samples of `model` (uniform random labels) into an ADM .npz: write_samples_npz."""
    def draw(n, gen):
        labels = torch.randint(0, num_classes, (n,), device=device, generator=gen)
        return sample_images(model, labels, input_shape, generator=gen, **sample_kwargs)
    return write_samples_npz(draw, out_dir, num_samples, batch_size, device, rank, world_size, seed,
                             quantize=quantize)
