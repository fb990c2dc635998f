"""Model, data and sampling helpers shared by the two class-conditional image-diffusion scripts (dtr.py and
ant_clustering.py): the parts of DiT's train.py / sample_ddp.py that are not about either paper."""
import argparse
import functools
import json
import math
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from common.checkpoint_formats import (authors_settings, detect_format, dit_spec_from_weights, ema_state_dict,
                                      format_defaults, split_routing_masks)
from common.diffusion import classifier_free_guidance, create_diffusion
from common.dit import DiT, DiT_models
from common.train_utils import (TrainingRun, cleanup_distributed, fail, infinite_loader, init_distributed,
                                load_checkpoint, load_model_state, random_hflip, run_dir_of, save_image_grid,
                                seed_step)
from common.unet import UNetModel
from common.vae import SCALE_FACTOR as SD_SCALE_FACTOR

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


#################################################################################
#                                    Data                                       #
#################################################################################

def create_dataset(data, image_size, num_classes=None, latent=False):
    """Returns (dataset, channels, spatial size, num_classes) for --data synthetic | PATH, --latent DIR."""
    if data == "synthetic" and not latent:
        from data.synthetic import SyntheticShapes
        ds = SyntheticShapes(num_samples=10_000, image_size=image_size, num_classes=num_classes or 4)
        return ds, 3, image_size, ds.num_classes
    try:
        if latent:  # pre-extracted SD-VAE latents (data/extract_latents.py); --image-size does not apply
            from data.latents import LatentDataset
            ds = LatentDataset(data)
            c, h, _ = ds.latent_shape
            return ds, c, h, ds.num_classes
        from data.image_folder import ImageFolder
        ds = ImageFolder(data, image_size)
        return ds, 3, image_size, len(ds.classes)
    except (FileNotFoundError, ValueError) as e:  # a missing / unfinished folder: one line, no traceback
        fail(str(e))


def prepare_batch(batch, device, latent, flip=True, vae_scale=SD_SCALE_FACTOR):
    """Move a batch to the device; latent batches sample the stored VAE posterior (times vae_scale), pixel batches
    get a flip."""
    if latent:
        from data.latents import sample_latents
        if not flip:  # keep the unflipped posterior only (the stored flips are the augmentation)
            batch = {k: v for k, v in batch.items() if not k.endswith("_flip")}
        x, y = sample_latents(batch, scale_factor=vae_scale)
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    x, y = batch
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return (random_hflip(x) if flip else x), y


def fixed_batch(dataset, num_items, device, latent, vae_scale=SD_SCALE_FACTOR):
    """The first num_items items of the data set, unflipped: a fixed batch for analyses (affinity, CKA)."""
    batch = next(infinite_loader(dataset, min(num_items, len(dataset)), 0, 1, 0, 0))
    return prepare_batch(batch, device, latent, flip=False, vae_scale=vae_scale)


def vae_config_scale(path):
    """`scaling_factor` of the diffusers config.json next to a VAE weight file (SD: 0.18215, SDXL: 0.13025), or
    None when there is no config beside it."""
    config = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    if not os.path.isfile(config):
        return None
    try:
        with open(config) as f:
            value = json.load(f).get("scaling_factor")
    except (OSError, ValueError, AttributeError):
        fail(f"{config} (next to the VAE weights) is not a readable diffusers config; fix or remove it")
    return None if value is None else float(value)


def load_vae(path, device, scale=None):
    """The frozen SD VAE (common/vae.py) from a local weight file, for encoding/decoding latents; one-line errors.
    Its latent scale: `scale` if given, else the config.json beside the file, else SD's 0.18215."""
    from common.vae import AutoencoderKL
    if not path or not os.path.isfile(path):
        fail(f"no VAE weights at {path!r}; pass --vae PATH to a local sd-vae-ft-ema / sd-vae-ft-mse / sdxl-vae file "
             f"(diffusers diffusion_pytorch_model.safetensors / .bin, or an LDM .ckpt)")
    try:
        vae = AutoencoderKL.from_pretrained_file(path)  # architecture read off the weights
    except ValueError as e:
        fail(str(e))
    configured = vae_config_scale(path)
    vae.scaling_factor = scale if scale is not None else configured if configured is not None else SD_SCALE_FACTOR
    if configured is not None and abs(configured - vae.scaling_factor) > 1e-9:
        print(f"warning: {path}'s config.json says scaling_factor {configured}, using {vae.scaling_factor} "
              f"(the scale the latents were made with)", file=sys.stderr)
    return vae.to(device).eval().requires_grad_(False)


#################################################################################
#                                   Sampling                                    #
#################################################################################

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


# Images in [-1, 1] -> uint8 exactly as the authors' sample_ddp.py: DiT / DTR truncate clamp(127.5 x + 128, 0, 255)
# (= round(127.5 (x + 1)) up to ties); ANT rounds it, half a grey level brighter on average. Their FIDs come from these.
QUANTIZERS = {"dit": torch.floor, "ant": torch.round}


def to_uint8(images, quantize="dit"):
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8 on the CPU, rounded as the authors' QUANTIZERS[quantize]."""
    return QUANTIZERS[quantize]((127.5 * images + 128.0).clamp(0, 255)).to(torch.uint8).permute(0, 2, 3, 1).cpu()


@torch.no_grad()
def write_samples_npz(draw, out_dir, num_samples, batch_size, device, rank=0, world_size=1, seed=0, desc="sampling",
                      quantize="dit"):
    """DiT sample_ddp.py for any sampler: draw(n, generator) -> n images (N, C, H, W) in [-1, 1]; each rank draws its
    share with its own seeded generator, rank 0 merges them into `samples.npz` (ADM's uint8 NHWC `arr_0`, rounded
    by `to_uint8`) and a PNG preview. Returns the .npz path."""
    from eval.fid import save_adm_npz
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


#################################################################################
#             Training-run plumbing (DiT train.py / sample_ddp.py)              #
#################################################################################
# The parts of a training script that are the same whatever the paper: command line, DDP / run folder / data set,
# resume, the periodic log / checkpoint / sample work, and sampling a checkpoint into an ADM .npz. The loop body
# (the paper's loss and update) stays in each script.

def add_model_data_args(p):
    """--model, the data flags and the noise schedule."""
    p.add_argument("--model", default="DiT-Ti/4", help=f"one of {', '.join(MODEL_NAMES)}")
    p.add_argument("--data", default="synthetic", help="'synthetic', an image folder, or a latent dir (--latent)")
    p.add_argument("--latent", action="store_true", help="--data holds VAE latents (data/extract_latents.py)")
    p.add_argument("--image-size", type=int, default=None, help="pixels (default 32 synthetic, 256 folders)")
    p.add_argument("--num-classes", type=int, default=None, help="synthetic set only (default 4; 1 = unconditional)")
    p.add_argument("--unconditional", action="store_true",
                   help="ignore the class labels: a 1-row label table, no label dropout, sampling without guidance "
                        "(automatic when the data has one class, e.g. FFHQ; as the DTR authors)")
    p.add_argument("--noise-schedule", choices=["linear", "cosine"], default=None,
                   help="default cosine (both papers; the DTR authors' example script uses linear); for an authors' "
                        "checkpoint, what its authors trained it with")
    p.add_argument("--vae-scale", type=float, default=None,
                   help="latent scale factor (SD VAE 0.18215, SDXL VAE 0.13025); default: the latent dir's manifest "
                        "when training, the checkpoint's when sampling, else the VAE's config.json")


def add_sampling_args(p, cfg_channels):
    """Sampler flags, --sample-only mode and its checkpoint / output flags; `cfg_channels` ("all" or "3") is the
    script's authors' choice of guided eps channels."""
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    p.add_argument("--num-sampling-steps", type=int, default=None, help="default 250 (paper); 50 on synthetic")
    p.add_argument("--ddim-eta", type=float, default=0.0, help="DDIM noise (0 = deterministic, 1 = DDPM-like)")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="classifier-free guidance scale (default 1.5, the papers'; 1 = none, for unconditional models)")
    p.add_argument("--cfg-channels", choices=["3", "all"], default=cfg_channels,
                   help=f"eps channels to guide (default {cfg_channels}, as this paper's authors: DTR guides all "
                        f"4 latent channels, ANT and DiT only the first 3, a DiT leftover)")
    p.add_argument("--sample-only", action="store_true", help="sample --num-samples from --ckpt, write .npz")
    p.add_argument("--ckpt", default=None, help="a checkpoint of ours, official DiT, ANT or DTR weights")
    p.add_argument("--num-samples", type=int, default=50_000)
    p.add_argument("--sample-batch-size", type=int, default=32)
    p.add_argument("--vae", default=None, help="SD / SDXL VAE weights (latent checkpoints)")
    p.add_argument("--quantize", choices=sorted(QUANTIZERS), default="dit",
                   help="uint8 rounding of the .npz: dit = floor(127.5 x + 128) as DiT / DTR; ant = round(127.5 x + "
                        "128) as ANT's sample_ddp.py (half a level brighter; to reproduce ANT's numbers)")


def finish_args(p, args, demo, paper):
    """Check --model and fill every flag left at None from `demo` (--data synthetic) or `paper` (real data)."""
    if args.model not in MODEL_NAMES:
        p.error(f"unknown --model '{args.model}'; choose one of: {', '.join(MODEL_NAMES)}")
    for key, value in (demo if args.data == "synthetic" else paper).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.cfg_scale is not None and args.cfg_scale < 1:
        p.error(f"--cfg-scale {args.cfg_scale}: use a scale >= 1 (1 = no guidance)")
    return args


def start_training(args, name, script, defining):
    """DDP, per-rank batch, run folder and data set: (run, device, per-rank batch size, dataset). Records in args
    what a checkpoint needs to be sampled without the data: input shape, classes (1 = unconditional), noise
    schedule and latent scale; `script` names the producer in every checkpoint, `defining` the args a resume
    must not change."""
    rank, world_size, device = init_distributed()
    dataset, channels, size, num_classes = create_dataset(args.data, args.image_size, args.num_classes, args.latent)
    args.unconditional = bool(args.unconditional or num_classes == 1)
    args.input_shape, args.num_classes = [channels, size, size], 1 if args.unconditional else num_classes
    args.noise_schedule = args.noise_schedule or "cosine"
    if args.latent:
        args.vae_scale = args.vae_scale or dataset.scale_factor
    run = TrainingRun(args, name, rank, world_size, script=script, defining=defining)
    return run, device, run.batch_size, dataset


def guidance_scale(args, targs):
    """--cfg-scale, defaulting to the papers' 1.5 (1 for an unconditional model, which has no null class)."""
    if targs.num_classes == 1:
        if args.cfg_scale not in (None, 1.0):
            fail(f"--cfg-scale {args.cfg_scale}: this model is unconditional (one class), it samples without "
                 f"guidance; drop --cfg-scale")
        return 1.0
    return 1.5 if args.cfg_scale is None else args.cfg_scale


def sampling_kwargs(args, targs, device):
    """Sampler keyword arguments (sample_images) from the command line and the model's training settings `targs`;
    the VAE (at the latent scale the model was trained with) decodes latents if --vae is set."""
    scale = args.vae_scale or getattr(targs, "vae_scale", None)
    return dict(noise_schedule=targs.noise_schedule, num_steps=args.num_sampling_steps, sampler=args.sampler,
                eta=args.ddim_eta, cfg_scale=guidance_scale(args, targs),
                cfg_channels=None if args.cfg_channels == "all" else 3, latent=targs.latent,
                vae=load_vae(args.vae, device, scale) if targs.latent and args.vae else None)


def sample_grid_writer(ema, args, device):
    """path -> write_sample_grid of the EMA model with the command line's sampler: end_of_step's `sample`."""
    return functools.partial(write_sample_grid, ema, input_shape=tuple(args.input_shape), num_classes=args.num_classes,
                             device=device, **sampling_kwargs(args, args, device))


def training_batch(loader, model, args, rank, step, device):
    """This step's batch: re-seed (noise, timesteps, flips, label drops depend on (seed, rank, step) alone, so a
    resumed run is exact), fetch, flip, and drop labels for classifier-free guidance (unconditional: all 0)."""
    seed_step(args.seed, rank, step)
    x, y = prepare_batch(next(loader), device, args.latent, vae_scale=getattr(args, "vae_scale", None))
    if args.unconditional:
        return x, torch.zeros_like(y)
    return x, cfg_label_dropout(model, y)


def model_from_checkpoint(ckpt_path, device, args, script, prepare=None):
    """(EMA model in eval mode, its training settings, step) of --ckpt in any layout of common/checkpoint_formats
    (ours, official DiT, ANT, DTR), converted in memory; one log line says which layout was read.
    prepare(model, targs, masks) adds what `script` builds on the plain model (DTR routing) before the weights are
    loaded; masks are the routing masks a DTR-layout file stores (else None). A checkpoint of another of our
    scripts is refused: its model is not the one this script builds."""
    ckpt = load_checkpoint(ckpt_path)
    fmt = detect_format(ckpt)
    if fmt is None:
        fail(f"{ckpt_path} is in no known checkpoint layout: expected one of ours (dtr.py / ant_clustering.py), "
             f"an official DiT state dict, or ANT / DTR weights with an 'ema' entry")
    masks = None
    if fmt == "ours":
        targs, state, step = argparse.Namespace(**ckpt["args"]), ckpt["ema"], ckpt["step"]
        producer = ckpt.get("script")
        if producer is not None and producer != script:
            fail(f"{ckpt_path} was trained by {producer}.py, not {script}.py: sample or evaluate it with "
                 f"`python {producer}.py --sample-only --ckpt {ckpt_path}`")
        targs.format, targs.learn_sigma = "ours", getattr(targs, "learn_sigma", True)
        targs.unconditional = getattr(targs, "unconditional", targs.num_classes == 1)
        print(f"read {ckpt_path}: our {producer or script}.py checkpoint at step {step}")
    else:
        state, masks = split_routing_masks(ema_state_dict(ckpt, fmt))
        try:
            spec = dit_spec_from_weights(state)
        except ValueError as e:
            fail(f"{ckpt_path}: {e}")
        targs = foreign_training_args(spec, fmt, authors_settings(ckpt), args)
        step = 0
        print(f"read {ckpt_path}: {fmt} layout ({'official DiT' if fmt == 'dit' else fmt.upper() + ' authors'}), "
              f"{spec['model']} at {spec['input_size']}x{spec['input_size']}x{spec['in_channels']}, "
              f"{'unconditional' if targs.unconditional else f'{targs.num_classes} classes'}, "
              f"{targs.noise_schedule} schedule, latent scale {targs.vae_scale}")
    (channels, size, _), num_classes = targs.input_shape, targs.num_classes
    model = create_model(targs.model, size, channels, num_classes, learn_sigma=targs.learn_sigma)
    if prepare is not None:
        prepare(model, targs, masks)
    load_model_state(model, state, ckpt_path)
    return model.to(device).eval(), targs, step


def foreign_training_args(spec, fmt, settings, args):
    """Training settings of an authors' checkpoint: the model read off its weights, the schedule and latent scale
    from the command line, else what its authors used (checkpoint_formats.format_defaults)."""
    defaults = format_defaults(fmt, spec, settings)
    size = spec["input_size"]
    return argparse.Namespace(
        model=spec["model"], input_shape=[spec["in_channels"], size, size], num_classes=spec["num_classes"],
        learn_sigma=spec["learn_sigma"], unconditional=spec["num_classes"] == 1,
        noise_schedule=args.noise_schedule or defaults["noise_schedule"],
        latent=spec["in_channels"] == 4, vae_scale=args.vae_scale or defaults["vae_scale"],
        format=fmt, settings=settings)


def sample_main(args, script, prepare=None):
    """DiT sample_ddp.py: the EMA model of --ckpt (model_from_checkpoint, any layout) draws --num-samples images
    into an ADM .npz; returns its path."""
    rank, world_size, device = init_distributed()
    model, targs, step = model_from_checkpoint(args.ckpt, device, args, script, prepare)
    path = sample_checkpoint(args, model, targs, args.ckpt, step, rank, world_size, device)
    cleanup_distributed()
    return path


def samples_dir(args, ckpt_path, step, targs, tag=""):
    """<run>/samples-<step>-<sampler><steps>-cfg<scale><tag>/ for our checkpoints; <results-dir>/<file name>-...
    for an authors' file, which has no run folder of ours around it."""
    name = f"samples-{step:07d}-{args.sampler}{args.num_sampling_steps}-cfg{guidance_scale(args, targs)}{tag}"
    if getattr(targs, "format", "ours") == "ours":
        return os.path.join(run_dir_of(ckpt_path), name)
    stem = os.path.splitext(os.path.basename(ckpt_path))[0]
    return os.path.join(args.results_dir, f"{stem}-{name}")


def sample_checkpoint(args, model, targs, ckpt_path, step, rank, world_size, device, tag=""):
    """sample_ddp.py: --num-samples images of a loaded model into samples_dir(...)/samples.npz (ADM format), rank 0
    prints the path and returns it."""
    if targs.latent and not args.vae:
        fail("this checkpoint was trained on VAE latents; pass --vae PATH to the VAE weights to decode "
             "(SD sd-vae-ft-ema, or SDXL for ANT's DiT-S runs)")
    path = sample_to_npz(model, samples_dir(args, ckpt_path, step, targs, tag), args.num_samples,
                         args.sample_batch_size, tuple(targs.input_shape), targs.num_classes, device, rank, world_size,
                         args.seed, quantize=args.quantize, progress=False, **sampling_kwargs(args, targs, device))
    if rank == 0:
        print(f"wrote {path}")
    return path
