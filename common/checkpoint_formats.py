"""The checkpoint layouts our scripts may be given, told apart by their keys. For dtr.py and ant_clustering.py:

  ours  {"model", "ema", "opt", "args": dict, "step", "script", ...}: common/training_run.TrainingRun.save
  dit   a bare DiT state dict: facebookresearch/DiT's released `DiT-XL-2-256x256.pt`
  ant   gohyojun15/ANT_diffusion: {"ema", "model"} (lightweight_ckpt.py, the released weights), or a training
        checkpoint {"model", "ema", "opt", "args": Namespace, "config": DictConfig[, "uw"]}; official DiT keys
  dtr   byeongjun-park/DTR train.py: {"model", "ema", "opt", "config": DictConfig[, "uw"]}; official DiT keys plus
        a persistent `blocks.{i}.routing._unit_mapping` (T, C) routing mask per block
What the weights say (model size, classes, learn_sigma, input size) is read off them here; what they cannot say
(noise schedule, VAE, sampler) comes from the caller's flags and presets. `model_from_checkpoint` turns a file in
any of these layouts into the EMA model and its training settings.
For task_diffusion.py: YuqiYang213/TaskDiffusion's {'model': DDP state dict}, renamed to our module names through
one table, TASKDIFFUSION_KEY_MAP (the model itself is built in task_diffusion.py).
"""
import argparse
import re

import torch

from common.checkpoint_io import plain_data, strip_prefix
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


#################################################################################
#        TaskDiffusion: the authors' module names -> task_diffusion.py's        #
#################################################################################

# The authors' main.py saves {'model': DDP(model).state_dict()} ('module.' prefixes; resumable files also hold
# optimizer, scheduler, epoch, iter_count). One row per module: their module path -> ours, with {l} a level,
# {j} a block and {t} a task; the rest of the key is kept, or renamed through the row's leaf table. Derived from
# models/TaskDiffusion_wrapper.py (backbone, heads), models/transformers/TaskDiffusion_baseline.py (MLoRE: the ViT
# + fea_fuse) and TaskDiffusion_head.py (Crosstask_diffusion_decoder, FPN_withtime, FPN_sharediff_withtime,
# Conv_MLP_withtime(_res), Conv_withtime, Mask_withtime, Conv_MLP, Transform_withtime, LearnedSinusoidalPosEmb).
CONV_MLP_LEAVES = {"conv_1": "norm_conv.conv", "norm": "norm_conv.norm", "time_mlp.1": "norm_conv.film.1",
                   "conv_2": "conv2", "conv_3": "proj"}  # Conv_MLP*, Mask_withtime -> ConvBlock
CONV_T_LEAVES = {"conv_1": "conv", "norm": "norm", "time_mlp.1": "film.1"}  # Conv_withtime -> NormConv
FEAT_TASK_LEAVES = {"0": "1.norm_conv.conv", "1": "1.norm_conv.norm", "3": "1.conv2",  # conv-BN-GELU-conv twice,
                    "4": "2.norm_conv.conv", "5": "2.norm_conv.norm", "7": "2.conv2"}  # an nn.Sequential -> 2 blocks
TASKDIFFUSION_KEY_MAP = [
    # ViT (their MLoRE keeps timm's names) and the per-level 1x1 convs
    ("backbone.patch_embed.", "encoder.vit.patch_embed.", None),
    ("backbone.pos_embed", "encoder.vit.pos_embed", None),
    ("backbone.blocks.{j}.", "encoder.vit.blocks.{j}.", None),
    ("backbone.norm.", "encoder.vit.norm.", None),
    ("backbone.fea_fuse.{l}.", "encoder.fuse.{l}.", None),
    # task-specific branches F_i^s (FPN_withtime.feat_task) and the auxiliary heads
    ("heads.fpn_encoder.feat_task.{l}.{t}.", "branches.branches.{t}.{l}.", FEAT_TASK_LEAVES),
    ("heads.aux_heads.{t}.0.", "aux_heads.{t}.0.", CONV_MLP_LEAVES),
    ("heads.aux_heads.{t}.1.", "aux_heads.{t}.1.", None),
    # cross-task label encoder
    ("heads.embedding_tables.{t}.", "label_encoder.embeddings.{t}.", None),
    ("heads.invalid_embedding_tables.{t}.weight", "label_encoder.invalid.{t}", None),  # nn.Embedding(1, C/4): flat
    ("heads.embed_all.", "label_encoder.fuse.", None),
    # cross-task diffusion decoder
    ("heads.time_mlp.0.weights", "decoder.time_embed.freqs", None),
    ("heads.time_mlp.1.", "decoder.time_embed.mlp.0.", None),
    ("heads.time_mlp.3.", "decoder.time_embed.mlp.2.", None),
    ("heads.transforms.conv_transforms.{l}.", "decoder.inputs.{l}.", None),
    ("heads.fpn_encoder.share_fpn.fpn_conv.{l}.{j}.", "decoder.shared.{l}.{j}.", CONV_MLP_LEAVES),
    ("heads.fpn_encoder.mask_task.{l}.", "decoder.relation.{l}.", CONV_T_LEAVES),
    ("heads.fpn_encoder.specific_head.{l}.{t}.", "decoder.specific.{l}.{t}.", CONV_T_LEAVES),
    ("heads.fpn_encoder.fpn_mask.{t}.", "decoder.level_weights.{t}.", CONV_MLP_LEAVES),
    ("heads.encoders.{j}.{t}.", "decoder.heads.{t}.blocks.{j}.", CONV_MLP_LEAVES),
    ("heads.pred_heads.{t}.", "decoder.heads.{t}.pred.", None),
]
TASKDIFFUSION_OURS_ONLY = ("encoder.vit.cls_token",)  # their ViT has no class token; ours keeps timm's, unused (patch tokens only)


def _compile_key_map(rows):
    """Each row as (regex, our template, leaves): {l} / {j} match indices, {t} a task name."""
    compiled = []
    for theirs, ours, leaves in rows:
        pattern = re.escape(theirs)
        for name, part in (("l", r"\d+"), ("j", r"\d+"), ("t", r"[a-z_]+")):
            pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>{part})")
        pattern += "(?P<rest>.+)" if theirs.endswith(".") else ""
        compiled.append((re.compile(pattern + "$"), ours, leaves))
    return compiled


_TASKDIFFUSION_RULES = _compile_key_map(TASKDIFFUSION_KEY_MAP)


def _our_key(key):
    """Our name of one of the authors' keys, or None when no row of TASKDIFFUSION_KEY_MAP covers it."""
    for regex, ours, leaves in _TASKDIFFUSION_RULES:
        match = regex.match(key)
        if match:
            groups = match.groupdict()
            rest = groups.pop("rest", "")
            if leaves is not None:
                leaf = next((k for k in leaves if rest.startswith(k + ".")), None)
                if leaf is None:
                    return None  # a module we map, with a parameter we do not know
                rest = leaves[leaf] + rest[len(leaf):]
            return ours.format(**groups) + rest
    return None


def taskdiffusion_to_ours(state_dict):
    """The authors' state dict ('module.' stripped) -> (ours, their keys that no row of TASKDIFFUSION_KEY_MAP maps)."""
    converted, unmapped = {}, []
    for key, value in state_dict.items():
        name = _our_key(key)
        if name is None:
            unmapped.append(key)
        else:
            converted[name] = value.flatten() if name.startswith("label_encoder.invalid.") else value
    return converted, unmapped


def taskdiffusion_layout(obj):
    """'ours' ({model, ema, args, step}: TrainingRun.save), 'authors' ({'model': their state dict}, or the bare
    state dict), or None."""
    if isinstance(obj, dict) and {"model", "args", "step"} <= set(obj):
        return "ours"
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        keys = strip_prefix(state, "module.")
        if any(k.startswith("backbone.") for k in keys) and any(k.startswith("heads.") for k in keys):
            return "authors"
    return None
