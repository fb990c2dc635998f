"""The command line and run plumbing of the class-conditional image scripts (dtr.py, ant_clustering.py): the parts
of DiT's train.py / sample_ddp.py that are not about either paper (flags and their defaults, the start of a training
run, sampling a checkpoint of any layout into an ADM .npz). The loop body, the paper's loss and update, stays in
each script."""
import functools
import os

from common.adm_npz import QUANTIZERS
from common.checkpoint_formats import model_from_checkpoint
from common.named_models import MODEL_NAMES
from common.sampling import sample_to_npz, write_sample_grid
from common.training_run import TrainingRun, cleanup_distributed, fail, init_distributed, run_dir_of
from common.vae import load_vae


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


def start_training(args, name, script, defining, data):
    """DDP, per-rank batch and run folder for `data` = (dataset, channels, size, num_classes) of
    data.labelled_images.create_dataset: (run, device, per-rank batch size, dataset). Records in args
    what a checkpoint needs to be sampled without the data: input shape, classes (1 = unconditional), noise
    schedule and latent scale; `script` names the producer in every checkpoint, `defining` the args a resume
    must not change."""
    rank, world_size, device = init_distributed()
    dataset, channels, size, num_classes = data
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
