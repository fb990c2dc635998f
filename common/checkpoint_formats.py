"""The checkpoint layouts a DiT-based script (dtr.py, ant_clustering.py) may be given, told apart by their keys.

  ours  {"model", "ema", "opt", "args": dict, "step", "script", ...}: common/training_run.TrainingRun.save
  dit   a bare DiT state dict: facebookresearch/DiT's released `DiT-XL-2-256x256.pt`
  ant   gohyojun15/ANT_diffusion: {"ema", "model"} (lightweight_ckpt.py, the released weights), or a training
        checkpoint {"model", "ema", "opt", "args": Namespace, "config": DictConfig[, "uw"]}; official DiT keys
  dtr   byeongjun-park/DTR train.py: {"model", "ema", "opt", "config": DictConfig[, "uw"]}; official DiT keys plus
        a persistent `blocks.{i}.routing._unit_mapping` (T, C) routing mask per block
What the weights say (model size, classes, learn_sigma, input size) is read off them here; what they cannot say
(noise schedule, VAE, sampler) comes from the caller's flags and presets. `model_from_checkpoint` turns a file in
any of these layouts into the EMA model and its training settings.
"""
import argparse
import re

import torch

from common.checkpoint_io import plain_data
from common.named_models import create_model
from common.training_run import fail, load_checkpoint, load_model_state

FORMATS = ("ours", "dit", "ant", "dtr")
ROUTING_BUFFER = re.compile(r"blocks\.(\d+)\.routing\._unit_mapping")

# DiT configs by (hidden size, depth) -> size name (facebookresearch/DiT models.py; Ti is our CPU size).
DIT_SIZES = {(384, 12): "S", (768, 12): "B", (1024, 24): "L", (1152, 28): "XL", (192, 6): "Ti"}


def detect_format(ckpt):
    """One of FORMATS, or None for a file in no known layout."""
    if not isinstance(ckpt, dict):
        return None
    if isinstance(ckpt.get("args"), dict) and "ema" in ckpt and "step" in ckpt:
        return "ours"
    if isinstance(ckpt.get("ema"), dict):
        return "dtr" if any(ROUTING_BUFFER.fullmatch(k) for k in ckpt["ema"]) else "ant"
    if "x_embedder.proj.weight" in ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        return "dit"
    return None


def ema_state_dict(ckpt, fmt):
    """The EMA weights (the ones every paper samples and evaluates) of a checkpoint in layout `fmt`."""
    return ckpt if fmt == "dit" else ckpt["ema"]


def split_routing_masks(state_dict):
    """(state dict without the DTR routing buffers, stacked (depth, T, C) masks or None if there were none)."""
    masks = {int(m[1]): v for k, v in state_dict.items() for m in [ROUTING_BUFFER.fullmatch(k)] if m}
    rest = {k: v for k, v in state_dict.items() if not ROUTING_BUFFER.fullmatch(k)}
    if not masks:
        return rest, None
    if sorted(masks) != list(range(len(masks))):
        raise ValueError(f"routing masks for blocks {sorted(masks)}: expected one per block 0..{len(masks) - 1}")
    return rest, torch.stack([masks[i].float() for i in range(len(masks))])


def dit_spec_from_weights(state_dict):
    """{model, input_size, in_channels, num_classes, learn_sigma} read off official-DiT-keyed weights; ValueError
    (one line) when they match no DiT config."""
    try:
        proj = state_dict["x_embedder.proj.weight"]  # (hidden, in_channels, p, p)
        table = state_dict["y_embedder.embedding_table.weight"]
        pos = state_dict["pos_embed"]
        out = state_dict["final_layer.linear.weight"]  # (p * p * out_channels, hidden)
    except KeyError as e:
        raise ValueError(f"not DiT weights: no {e.args[0]}") from None
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    depth = len({m[1] for k in state_dict for m in [re.match(r"blocks\.(\d+)\.", k)] if m})
    size = DIT_SIZES.get((hidden, depth))
    if size is None or (size == "Ti" and patch != 4):
        known = ", ".join(f"{n} (hidden {h}, depth {d})" for (h, d), n in DIT_SIZES.items())
        raise ValueError(f"DiT weights with hidden size {hidden} and depth {depth} match no config: {known}")
    out_channels = out.shape[0] // (patch * patch)
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"final layer has {out_channels} output channels for {in_channels} input channels")
    rows = table.shape[0]
    # DiT adds a null-class row when labels are dropped (classifier-free guidance); a single row is unconditional.
    return dict(model=f"DiT-{size}/{patch}", input_size=int(round(pos.shape[1] ** 0.5)) * patch,
                in_channels=in_channels, num_classes=1 if rows == 1 else rows - 1,
                learn_sigma=out_channels == 2 * in_channels)


def authors_settings(ckpt):
    """The settings an authors' training checkpoint records (ANT's args Namespace, DTR's / ANT's omegaconf config),
    flattened to {"section.key": value}; {} for weights-only files."""
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix[:-1]] = value

    if isinstance(ckpt.get("args"), argparse.Namespace):
        walk("args.", vars(ckpt["args"]))
    config = plain_data(ckpt.get("config"))
    if isinstance(config, dict):
        walk("config.", config)
    return flat


SD_SCALE, SDXL_SCALE = 0.18215, 0.13025


def format_defaults(fmt, spec, settings):
    """What a file of layout `fmt` cannot say about how its model was trained: {noise_schedule, vae_scale}, as the
    authors' own training / sampling scripts set them (flags override these)."""
    if fmt == "dit":  # facebookresearch/DiT: create_diffusion's default linear schedule, SD VAE
        return dict(noise_schedule="linear", vae_scale=SD_SCALE)
    if fmt == "ant":  # ANT create_diffusion's default squaredcos_cap_v2 (= cosine) for both model sizes; DiT-S on
        # SDXL-VAE latents (train_ant_single_gpu.py, sample_ddp.py), DiT-L on SD-VAE latents (train_uw_multi_gpu.py)
        return dict(noise_schedule="cosine", vae_scale=SDXL_SCALE if spec["model"].startswith("DiT-S/") else SD_SCALE)
    if fmt == "dtr":  # DTR train.py: config general.schedule_name (base_config.yaml: cosine), sd-vae-ft-{ema,mse}
        schedule = settings.get("config.general.schedule_name", "cosine")
        return dict(noise_schedule={"squaredcos_cap_v2": "cosine"}.get(schedule, schedule), vae_scale=SD_SCALE)
    raise ValueError(f"no defaults for checkpoint layout {fmt!r}")


#################################################################################
#                    A model from a checkpoint in any layout                    #
#################################################################################

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
