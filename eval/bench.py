"""Benchmarks behind the README's speed and memory claims, printed as ratios measured in one process.

    python -m eval.bench --quick                 # CPU, small shapes, about a minute
    python -m eval.bench --device cuda           # full size: DiT-L/2 on 32x32x4 latents, batch 32, bf16, SDPA
    python -m eval.bench --gpu-check             # the prepared GPU check (eval/gpu_check.sh), < 8 min on an H100
    python -m eval.bench --gpu-check --tiny      # the same code at toy shapes on CPU, under a minute

Sections (--only picks some): anchor (one DiT training step, fwd + bwd + AdamW + EMA, of our fast path against the
official DiT recipe reproduced in-process: images/s, ratio, TFLOP/s, MFU, peak memory; DTR and ANT-UW / vanilla), dtr (DiT fwd+bwd+AdamW step time and peak memory, routing dtr vs none), mfu (images/s,
achieved TFLOP/s and MFU of that step), ant (step time of ANT-UW / PCGrad / Nash-MTL over k = 5 clusters vs vanilla),
dp (interval clustering at T = 1000, k = 8), sampler (DDPM steps/s), taskdiffusion (inference time per image for
1-10 DDIM steps vs the no-diffusion baseline; ViT-L at 512 px, --quick: tiny ViT at 64 px), fidmem (host memory
of `python -m eval.fid` reading a synthetic 50K x 256x256x3 .npz with a stand-in feature model; --quick: 2000 x 64^2),
odsf (SEISM-procedure boundary odsF, CPU seconds per 512x512 image on one core and the implied PASCAL-Context val
time; --quick: 256 px).
Timings are medians over interleaved repeats (A, B, A, B, ...), so slow drift of the machine hits both sides alike.
"""
import argparse
import copy
import csv
import functools
import glob
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import tracemalloc
import types
import zipfile
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import ant_clustering as ant
import dtr
import task_diffusion as td
from common.diffusion import create_diffusion
from common.named_models import create_model
from common.training_run import adamw, autocast, fail, make_ema, training_module, update_ema
from common.transformer import Attention

# Dense bf16 tensor-core peak (TFLOP/s) per GPU name, from NVIDIA's data sheets; --peak-tflops overrides.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}


#################################################################################
#                                   Timing                                      #
#################################################################################

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(fns, iters, warmup, device):
    """{name: median seconds per call} for every callable in fns, run round-robin after `warmup` calls each."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_memory(fn, device):
    """Peak bytes of one call: CUDA's allocator peak on GPU; on CPU the bytes autograd saves for backward
    (activations, the part of a training step's memory that routing could change)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel() * x.element_size()) or x,
                                                  lambda x: x):
        fn()
    return sum(saved)


#################################################################################
#                           Model FLOPs of a DiT step                           #
#################################################################################

def dit_forward_flops(model, batch_size):
    """Matmul FLOPs of one DiT forward pass (2 per multiply-add), counted from the architecture.

    Per block with N tokens of width D: qkv 6ND^2, attention out 2ND^2, MLP 16ND^2, QK^T and AV 4N^2D, adaLN 12D^2;
    plus the patch embedding, the timestep MLP and the final layer. Norms, softmax and elementwise ops are ignored.
    """
    D, N, p = model.x_embedder.proj.out_channels, model.num_patches, model.patch_size
    freq = model.t_embedder.frequency_embedding_size
    per_block = 24 * N * D * D + 4 * N * N * D + 12 * D * D
    embed = 2 * N * p * p * model.in_channels * D + 2 * freq * D + 2 * D * D
    final = 2 * N * D * p * p * model.out_channels + 4 * D * D
    return batch_size * (len(model.blocks) * per_block + embed + final)


def peak_tflops(device, override=None):
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


#################################################################################
#                                  Sections                                     #
#################################################################################

def dit_training_step(model, diffusion, batch, bf16, loss_fn=None):
    """One DiT train.py step on a fixed batch: eps-MSE + vb loss, backward, AdamW update."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    x, y = batch
    device = x.device

    def step():
        t = torch.randint(0, diffusion.num_timesteps, (len(x),), device=device)
        with autocast(device, bf16):
            terms = diffusion.training_losses(model, x, t, dict(y=y))
        loss = terms["loss"].mean() if loss_fn is None else loss_fn(terms["loss"], t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def make_dit_pair(args, device):
    """Vanilla and DTR DiTs with identical weights, plus a fixed batch and the training diffusion."""
    torch.manual_seed(0)
    vanilla = create_model(args.model, args.latent_size, 4, 1000).to(device)
    routed = create_model(args.model, args.latent_size, 4, 1000)
    routed.load_state_dict(vanilla.state_dict())
    routed = dtr.add_task_routing(routed, "dtr").to(device)
    x = torch.randn(args.batch_size, 4, args.latent_size, args.latent_size, device=device)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    return vanilla, routed, (x, y), create_diffusion("", "cosine", learn_sigma=True)


def bench_dtr(args, device, results):
    vanilla, routed, batch, diffusion = make_dit_pair(args, device)
    steps = {"vanilla": dit_training_step(vanilla, diffusion, batch, args.bf16),
             "dtr": dit_training_step(routed, diffusion, batch, args.bf16)}
    sec = interleaved_medians(steps, args.iters, args.warmup, device)
    mem = {name: peak_memory(fn, device) for name, fn in steps.items()}
    what = "peak memory" if device.type == "cuda" else "saved activations"
    print(f"[dtr] {args.model} batch {args.batch_size} on {args.latent_size}x{args.latent_size}x4, "
          f"bf16={args.bf16 and device.type == 'cuda'}")
    print(f"  step time  vanilla {sec['vanilla'] * 1e3:8.1f} ms   dtr {sec['dtr'] * 1e3:8.1f} ms   "
          f"ratio dtr/vanilla = {sec['dtr'] / sec['vanilla']:.3f}   (target <= 1.01 on GPU)")
    print(f"  {what:11s} vanilla {mem['vanilla'] / 2**20:8.1f} MiB  dtr {mem['dtr'] / 2**20:8.1f} MiB  "
          f"ratio dtr/vanilla = {mem['dtr'] / mem['vanilla']:.3f}   (target <= 1.01)")
    results["dtr_step_ratio"] = sec["dtr"] / sec["vanilla"]
    results["dtr_memory_ratio"] = mem["dtr"] / mem["vanilla"]
    results["vanilla_step_s"] = sec["vanilla"]
    results["vanilla_model"] = vanilla


def bench_mfu(args, device, results):
    if "vanilla_step_s" not in results:
        bench_dtr(args, device, results)
    model, sec = results["vanilla_model"], results["vanilla_step_s"]
    flops = 3 * dit_forward_flops(model, args.batch_size)  # backward = 2x forward (activation + weight grads)
    achieved = flops / sec / 1e12
    peak = peak_tflops(device, args.peak_tflops)
    mfu = f"MFU {achieved / peak:.1%} of {peak:g} TFLOP/s" if peak else "MFU n/a (pass --peak-tflops)"
    print(f"[mfu] {args.model} fwd+bwd: {args.batch_size / sec:.1f} images/s, "
          f"{flops / args.batch_size / 1e9:.1f} GFLOP/image, {achieved:.2f} TFLOP/s achieved, {mfu}")
    results["images_per_s"], results["tflops"] = args.batch_size / sec, achieved


def bench_dp(args, device, results, T=1000, k=8):
    abar = create_diffusion("", "cosine").alphas_cumprod
    lo, hi = ant.paper_size_bounds(T, k)
    rows = []
    for name, build, bounds in [("timestep", lambda: ant.timestep_cost(T), (None, None)),
                                ("snr", lambda: ant.snr_cost(abar), (lo, hi))]:
        start = time.perf_counter()
        cost = build()
        built = time.perf_counter()
        ant.interval_clustering(cost, k, *bounds)
        done = time.perf_counter()
        rows.append((name, built - start, done - built))
    print(f"[dp] interval clustering T={T} k={k}: "
          + "; ".join(f"{n} cost {c * 1e3:.0f} ms + DP {d * 1e3:.0f} ms" for n, c, d in rows))
    results["dp_seconds"] = max(d for _, _, d in rows)


def bench_sampler(args, device, results):
    vanilla = results.get("vanilla_model") or make_dit_pair(args, device)[0]
    vanilla.eval()
    x = torch.randn(args.batch_size, 4, args.latent_size, args.latent_size, device=device)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    t = torch.zeros(args.batch_size, dtype=torch.long, device=device)
    diffusion = create_diffusion(str(args.sampling_steps), "cosine")

    @torch.no_grad()
    def forward():
        with autocast(device, args.bf16):
            vanilla(x, t, y)

    @torch.no_grad()
    def loop():
        with autocast(device, args.bf16):
            diffusion.p_sample_loop(vanilla, x.shape, noise=x, model_kwargs=dict(y=y))
    sec = interleaved_medians({"forward": forward, "loop": loop}, max(1, args.iters // 4), 1, device)
    per_step = sec["loop"] / args.sampling_steps
    print(f"[sampler] DDPM-{args.sampling_steps}, batch {args.batch_size}: {1 / per_step:.1f} steps/s, "
          f"{args.batch_size / sec['loop']:.2f} images/s; "
          f"sampler step / bare forward = {per_step / sec['forward']:.3f}")
    results["sampler_steps_per_s"] = 1 / per_step


def bench_ant(args, device, results):
    """One ANT training step (ant_clustering.mtl_backward over k stratified cluster losses + AdamW) per method,
    against the vanilla step on the same model and batch. Nash-MTL is amortised over its 25-step update cycle."""
    k = args.ant_k
    batch_size = max(1, args.batch_size // k) * k  # stratified batches need B divisible by k
    torch.manual_seed(0)
    model = create_model(args.model, args.latent_size, 4, 1000).to(device)
    diffusion = create_diffusion("", "cosine", learn_sigma=True)
    x = torch.randn(batch_size, 4, args.latent_size, args.latent_size, device=device)
    y = torch.randint(0, 1000, (batch_size,), device=device)
    clusters = ant.ClusterLoss(ant.uniform_intervals(diffusion.num_timesteps, k)).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0)

    def ant_step(method, steps):
        state = ant.mtl_state(method, k, device=device)

        def step():
            t = clusters.sample_timesteps(batch_size)
            loss_fn = functools.partial(ant.batch_cluster_losses, diffusion, model, x, y, t, clusters, bf16=args.bf16)
            opt.zero_grad(set_to_none=True)
            ant.mtl_backward(method, loss_fn, params, state, next(steps))
            opt.step()
        return step

    fns = {"vanilla": dit_training_step(model, diffusion, (x, y), args.bf16),
           "uw": ant_step("uw", iter(range(10**9))), "pcgrad": ant_step("pcgrad", iter(range(10**9))),
           "nash-reuse": ant_step("nash", (i for i in range(10**9) if i % 25)),  # alpha reused (24 of 25 steps)
           "nash-update": ant_step("nash", iter(range(0, 10**9, 25)))}  # alpha re-solved from k gradients
    sec = interleaved_medians(fns, args.iters, args.warmup, device)
    sec["nash"] = (24 * sec.pop("nash-reuse") + sec.pop("nash-update")) / 25
    print(f"[ant] {args.model} batch {batch_size}, k={k} clusters: vanilla {sec['vanilla'] * 1e3:.1f} ms/step")
    targets = {"uw": "<= 1.03", "pcgrad": f"<= (k+1)/2 = {(k + 1) / 2:g}", "nash": "amortised over 25 steps"}
    for method, target in targets.items():
        ratio = sec[method] / sec["vanilla"]
        print(f"  {method:7s} {sec[method] * 1e3:8.1f} ms   ratio {method}/vanilla = {ratio:.3f}   ({target})")
        results[f"ant_{method}_ratio"] = ratio


def bench_taskdiffusion(args, device, results):
    """TaskDiffusion inference (Algorithm 2) time per image for 1..10 DDIM steps, against the --decoder none
    baseline (the same backbone and task branches, no diffusion decoder)."""
    dataset, backbone, size = ("synthetic", "vit-tiny", 64) if args.quick else ("pascal", "vit-l", 512)
    tasks = td.output_channels(dataset, td.DATASETS[dataset]["tasks"])
    torch.manual_seed(0)
    models = {d: td.TaskDiffusion(tasks, backbone, size, td.EMBED_DIM[backbone], decoder=d).to(device).eval()
              for d in ("cross-task", "none")}
    images = torch.randn(args.td_batch_size, 3, size, size, device=device)

    def infer(decoder, steps):
        def run():
            with torch.no_grad(), autocast(device, args.bf16):
                td.predict(models[decoder], images, steps)
        return run
    fns = {"baseline": infer("none", 0), **{f"{n} steps": infer("cross-task", n) for n in (1, 3, 5, 10)}}
    sec = interleaved_medians(fns, max(1, args.iters // 2), 1, device)
    per_image = {name: s / args.td_batch_size for name, s in sec.items()}
    print(f"[taskdiffusion] {backbone} {size}x{size} {dataset}, batch {args.td_batch_size}: baseline "
          f"{per_image['baseline'] * 1e3:.1f} ms/image; "
          + "; ".join(f"{name} {t * 1e3:.1f} ms ({t / per_image['baseline']:.2f}x)"
                      for name, t in per_image.items() if name != "baseline"))
    results["taskdiffusion_3step_ratio"] = per_image["3 steps"] / per_image["baseline"]


class StandInInception(torch.nn.Module):
    """FIDInception's outputs and sizes (pool 2048, spatial 2023, logits 1008) from fixed random projections of the
    4x4-pooled image: cheap, so fidmem measures eval.fid's own buffers rather than Inception's activations."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.register_buffer("proj", torch.randn(48, 2048 + 2023 + 1008, generator=gen) / 48 ** 0.5)

    def forward(self, x):
        h = F.adaptive_avg_pool2d(x, 4).flatten(1) @ self.proj
        pool, spatial, logits = h.split([2048, 2023, 1008], dim=1)
        return dict(pool=pool.relu(), spatial=spatial.relu(), logits=logits, logits_unbiased=logits)


def write_synthetic_npz(path, n, size, chunk=500):
    """np.savez's layout (stored zip64 member arr_0.npy, .npy 1.0 header) for n uint8 size^2 x 3 images, written
    chunk by chunk so that the 10 GB file never sits in memory."""
    block = np.random.default_rng(0).integers(0, 256, (min(chunk, n), size, size, 3), dtype=np.uint8)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                                     "shape": (n, size, size, 3)})
            for start in range(0, n, chunk):
                f.write(block[:min(chunk, n - start)] + np.uint8(start // chunk % 256))  # wraps: new pixels per chunk


def reset_rss_peak():
    """Reset Linux's peak-RSS counter (VmHWM) to the current RSS and return it in bytes; None where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return read_rss("VmRSS")
    except OSError:
        return None


def read_rss(field="VmHWM"):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def bench_fidmem(args, device, results):
    """Host memory of one eval.fid input side (stream arr_0, FID + sFID statistics, keep pool and IS logits, IS) on
    a synthetic .npz: tracemalloc's peak (numpy / Python buffers) and the growth of the process's peak RSS."""
    from eval import fid
    n = args.fidmem_samples or (2000 if args.quick else 50_000)
    size = args.fidmem_size or (64 if args.quick else 256)
    folder = args.fidmem_dir or tempfile.gettempdir()
    file_bytes = n * size * size * 3
    if not os.path.isdir(folder) or shutil.disk_usage(folder).free < 1.1 * file_bytes:
        fail(f"fidmem needs {file_bytes / 1e9:.1f} GB free in --fidmem-dir {folder!r}; pass a folder with room or "
             f"fewer --fidmem-samples")
    fd, path = tempfile.mkstemp(suffix=".npz", dir=folder)
    os.close(fd)
    try:
        model = StandInInception()
        # warm-up on a small file: the first call pages in kernels of torch's libraries, which RSS would count
        write_synthetic_npz(path, min(n, 100), size)
        fid.describe_input(path, fid.inspect_input(path), model, 50, device, keep=["pool", "logits_unbiased"])
        write_synthetic_npz(path, n, size)
        info = fid.inspect_input(path)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rss_before = reset_rss_peak()
        tracemalloc.start()
        start = time.perf_counter()
        feats, _, _ = fid.describe_input(path, info, model, 50, device, keep=["pool", "logits_unbiased"])  # CLI batch
        fid.inception_score(feats["logits_unbiased"])
        seconds = time.perf_counter() - start
        traced = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        rss = read_rss() - rss_before if rss_before is not None else None
        del feats
    finally:
        os.remove(path)
    gpu = f", CUDA peak {torch.cuda.max_memory_allocated(device) / 1e9:.2f} GB" if device.type == "cuda" else ""
    rss_text = f"{rss / 1e9:.2f} GB" if rss is not None else "n/a (no /proc/self/clear_refs)"
    print(f"[fidmem] {n} x {size}x{size}x3 .npz ({file_bytes / 1e9:.2f} GB), stand-in features 2048/2023/1008, "
          f"batch 50: traced peak {traced / 1e9:.2f} GB, peak RSS growth {rss_text}{gpu} (target < 2 GB); "
          f"{n / seconds:.0f} images/s")
    results["fidmem_traced_gb"] = traced / 1e9
    if rss is not None:
        results["fidmem_rss_gb"] = rss / 1e9


def synthetic_edge_pair(rng, size):
    """A warped-Voronoi label map and a network-like 8-bit edge probability for it (blurred, shifted, noisy)."""
    from scipy import ndimage
    from eval.dense_metrics import seg2bmap
    seeds = rng.uniform(0, size, size=(12, 2))
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)
    warp = [ndimage.gaussian_filter(rng.normal(size=(size, size)), 12) * 400 for _ in range(2)]
    dist = (rows[..., None] + warp[0][..., None] - seeds[:, 0]) ** 2 + (cols[..., None] + warp[1][..., None] - seeds[:, 1]) ** 2
    labels = dist.argmin(-1)
    response = ndimage.gaussian_filter(np.roll(seg2bmap(labels), 1, axis=0).astype(np.float64), 1.5) * 3
    prob = 1 / (1 + np.exp(-(8 * response - 3))) + rng.normal(scale=0.01, size=(size, size))
    return np.clip(prob, 0, 1), labels


def bench_odsf(args, device, results):
    """EdgeMeter (SEISM procedure, 101 thresholds, maxDist 0.0075) per image on one core; CPU only by design."""
    import os
    from eval.dense_metrics import EdgeMeter
    size, count = (256, 2) if args.quick else (512, 6)
    rng = np.random.default_rng(0)
    pairs = [synthetic_edge_pair(rng, size) for _ in range(count)]
    seconds = []
    for prob, labels in pairs:
        meter = EdgeMeter(gt_format="segmentation")
        start = time.perf_counter()
        meter.update(prob, labels, valid=np.ones(labels.shape, bool))
        seconds.append(time.perf_counter() - start)
    per_image = statistics.median(seconds)
    cores = os.cpu_count() or 1
    print(f"[odsf] {size}x{size}, 101 thresholds, one core: {per_image:.2f} s/image (median of {count}); "
          f"PASCAL-Context val (5105 images) ~ {5105 * per_image / 60:.0f} core-minutes, "
          f"~ {5105 * per_image / 60 / cores:.1f} min with EdgeMeter(workers={cores})")
    results["odsf_seconds_per_image"] = per_image


#################################################################################
#          The anchor: our fast path against the official DiT recipe             #
#################################################################################
# The official recipe, reproduced in-process on our same model: DiT's train.py trains in fp32 (TF32 matmuls
# allowed), with timm 0.x's Attention (softmax(q k^T / sqrt(d)) v written out), no compile, and an EMA that loops
# over the parameters. Ours, as the scripts train: bf16 autocast on CUDA, F.scaled_dot_product_attention, --compile,
# fused AdamW on CUDA, a one-op EMA (torch._foreach_lerp_).

def timm_attention_forward(self, x):
    """timm 0.x Attention.forward, as DiT's models.py uses it: the attention matrix is materialised."""
    B, N, C = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    attn = (q @ k.transpose(-2, -1)) * (C // self.num_heads) ** -0.5
    x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, C)
    return self.proj(x)


def official_recipe(model):
    """A copy of `model` (same weights) whose attention modules run timm_attention_forward."""
    official = copy.deepcopy(model)
    for module in official.modules():
        if isinstance(module, Attention):
            module.forward = types.MethodType(timm_attention_forward, module)
    return official


@torch.no_grad()
def official_update_ema(ema_model, model, decay=0.9999):
    """DiT train.py's update_ema: one mul_ / add_ per parameter."""
    ema_params = OrderedDict(ema_model.named_parameters())
    for name, param in model.named_parameters():
        ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)


def recipe_loss(model, diffusion, x, y, t, noise, bf16):
    """The step's loss (eps-MSE + vb, batch mean), under bf16 autocast on CUDA when bf16."""
    with autocast(x.device, bf16):
        return diffusion.training_losses(model, x, t, dict(y=y), noise=noise)["loss"].mean()


def official_adamw(params, lr):
    """DiT train.py's optimiser: torch's default AdamW (foreach kernels on CUDA)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=0)


def recipe_step(model, diffusion, batch, bf16, ema_update, loss_fn=None, optimizer=adamw):
    """One full training step (fwd + bwd + AdamW + EMA) on a fixed batch; `model` may be a compiled wrapper.
    loss_fn(module, x, y, t) replaces the plain loss (ANT-UW); optimizer: ours (fused on CUDA) or official_adamw."""
    bare = getattr(model, "_orig_mod", model)
    params = [p for p in bare.parameters() if p.requires_grad]
    opt = optimizer(params + (list(loss_fn.extra_params) if loss_fn else []), lr=1e-4)
    ema = make_ema(bare)
    x, y = batch

    def step():
        t = torch.randint(0, diffusion.num_timesteps, (len(x),), device=x.device)
        loss = recipe_loss(model, diffusion, x, y, t, None, bf16) if loss_fn is None else loss_fn(model, x, y, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(ema, bare)
    return step


class UWLoss:
    """ANT-UW over k timestep clusters (ant_clustering: stratified timesteps, cluster losses, uncertainty weights)."""

    def __init__(self, diffusion, k, device, bf16):
        self.clusters = ant.ClusterLoss(ant.uniform_intervals(diffusion.num_timesteps, k)).to(device)
        self.uw = ant.UncertaintyWeighting(k).to(device)
        self.extra_params, self.diffusion, self.bf16 = list(self.uw.parameters()), diffusion, bf16

    def __call__(self, model, x, y, t):
        t = self.clusters.sample_timesteps(len(x))  # every cluster in every batch
        losses, present = ant.batch_cluster_losses(self.diffusion, model, x, y, t, self.clusters, bf16=self.bf16)
        return self.uw(losses, present)


def step_flops(model, diffusion, batch):
    """FLOPs of one fwd + bwd of `model` (the official copy: its attention is countable matmuls), counted by
    torch's FlopCounterMode; the weights are left untouched."""
    x, y = batch
    t = torch.randint(0, diffusion.num_timesteps, (len(x),), device=x.device)
    with FlopCounterMode(display=False) as counter:
        recipe_loss(model, diffusion, x, y, t, None, False).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def bench_anchor(args, device, results):
    """Our fast path vs the official DiT recipe: images/s, TFLOP/s, MFU, peak memory; DTR and ANT-UW vs vanilla."""
    torch.manual_seed(0)
    model = create_model(args.model, args.latent_size, 4, 1000).to(device)
    official = official_recipe(model)
    routed = dtr.add_task_routing(copy.deepcopy(model), "dtr")
    diffusion = create_diffusion("", "cosine", learn_sigma=True)
    B = args.batch_size
    batch = (torch.randn(B, 4, args.latent_size, args.latent_size, device=device),
             torch.randint(0, 1000, (B,), device=device))
    k = max(d for d in range(1, 9) if B % d == 0)  # ANT-UW clusters: dtr.py's k = 8 where B allows
    fast = argparse.Namespace(compile=args.compile, grad_checkpoint=False)
    ours = training_module(model, fast)  # ANT-UW runs the same module on the same shapes: no second compile
    steps = {"ours": recipe_step(ours, diffusion, batch, args.bf16, update_ema),
             "official": recipe_step(official, diffusion, batch, False, official_update_ema, optimizer=official_adamw),
             "ours-dtr": recipe_step(training_module(routed, fast), diffusion, batch, args.bf16, update_ema),
             "ours-ant-uw": recipe_step(ours, diffusion, batch, args.bf16, update_ema,
                                        UWLoss(diffusion, k, device, args.bf16))}
    flops = step_flops(official, diffusion, batch)
    sec = interleaved_medians(steps, args.iters, max(args.warmup, 2 if args.compile else 0), device)
    mem = {name: peak_memory(steps[name], device) for name in ("ours", "official", "ours-dtr")}
    peak = peak_tflops(device, args.peak_tflops)
    what = "peak memory" if device.type == "cuda" else "saved activations"
    bf16 = args.bf16 and device.type == "cuda"
    print(f"[anchor] {args.model} batch {B} on {args.latent_size}x{args.latent_size}x4, one step fwd+bwd+AdamW+EMA; "
          f"ours: bf16={bf16}, SDPA, compile={args.compile}, fused AdamW={device.type == 'cuda'}; official: fp32 "
          f"(TF32 on CUDA), softmax(QK^T)V, no compile, foreach AdamW; {flops / B / 1e9:.2f} GFLOP/image "
          f"(FlopCounterMode)")
    for name in ("ours", "official"):
        tflops = flops / sec[name] / 1e12
        mfu = f"MFU {tflops / peak:.1%} of {peak:g} bf16 TFLOP/s" if peak else "MFU n/a (no bf16 peak for this device)"
        print(f"  {name:8s} {B / sec[name]:9.2f} images/s  {sec[name] * 1e3:8.1f} ms/step  {tflops:7.3f} TFLOP/s  "
              f"{mfu}  {what} {mem[name] / 2**20:.1f} MiB")
        results[f"anchor_{name}_images_per_s"] = B / sec[name]
        results[f"anchor_{name}_tflops"] = tflops
        results[f"anchor_{name}_mfu"] = tflops / peak if peak else None
        results[f"anchor_{name}_memory_mib"] = mem[name] / 2**20
    results["anchor_speedup"] = sec["official"] / sec["ours"]
    results["anchor_dtr_ratio"] = sec["ours-dtr"] / sec["ours"]
    results["anchor_ant_uw_ratio"] = sec["ours-ant-uw"] / sec["ours"]
    results["anchor_dtr_memory_ratio"] = mem["ours-dtr"] / mem["ours"]
    print(f"  ours / official = {results['anchor_speedup']:.2f}x (target >= 1.5 on H100/H200; MFU >= 40%)")
    print(f"  step time DTR / vanilla = {results['anchor_dtr_ratio']:.3f} (target <= 1.01), ANT-UW (k={k}) / "
          f"vanilla = {results['anchor_ant_uw_ratio']:.3f} (target <= 1.03), both on our fast path; {what} DTR / "
          f"vanilla = {results['anchor_dtr_memory_ratio']:.3f}")


#################################################################################
#                 The prepared GPU check (--gpu-check, --tiny)                  #
#################################################################################
# One command for a short GPU loan: every part at the paper's shapes, one summary table (printed and written to
# --gpu-check-out). A part that would start after --gpu-check-budget seconds is skipped and says so, so the whole
# check ends in time. --tiny runs the same code at toy shapes on CPU (compile off: inductor on CPU takes minutes).

GPU_CHECK = dict(model="DiT-L/2", latent_size=32, batch_size=32, iters=10, warmup=3, smoke_steps=200,
                 sampling_steps=250, td_backbone="vit-l", td_size=512, td_batch_size=4)
TINY_CHECK = dict(model="DiT-Ti/4", latent_size=8, batch_size=4, iters=2, warmup=1, smoke_steps=20,
                  sampling_steps=250, td_backbone="vit-tiny", td_size=64, td_batch_size=2)


def write_random_latents(root, n, size, num_classes=1000, scale=0.18215):
    """A latent directory of data/latents.py (manifest + shard) holding N(0, 1) latents once scaled: the smoke
    run's data, with no download."""
    from data.latents import LatentShardWriter
    gen = torch.Generator().manual_seed(0)
    shape = (n, 4, size, size)
    mean = lambda: torch.randn(shape, generator=gen) / scale
    std = torch.full(shape, 0.01)
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    with LatentShardWriter(root, shape[1:], shard_size=n, scale_factor=scale,
                           extra={"num_classes": num_classes}) as writer:
        writer.add(mean(), std, mean(), std, labels)
    return root


def read_losses(run_dir):
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    return [(int(float(r["step"])), float(r["loss"]), float(r["steps_per_sec"])) for r in rows]


def check_smoke(cfg, args, device, folder):
    """dtr.py itself (DiT + DTR, bf16, --compile) for smoke_steps steps on random latents: loss at start and end."""
    steps, B = cfg["smoke_steps"], cfg["batch_size"]
    data = write_random_latents(os.path.join(folder, "latents"), 4 * B, cfg["latent_size"])
    argv = ["--model", cfg["model"], "--latent", "--data", data, "--results-dir", os.path.join(folder, "runs"),
            "--steps", str(steps), "--global-batch-size", str(B), "--lr", "1e-4", "--log-every", str(steps // 10),
            "--ckpt-every", str(steps), "--sample-every", str(steps), "--num-sampling-steps", "10",
            "--num-workers", "2"]
    run_dir = dtr.main(argv + (["--compile"] if args.compile else []) + ([] if args.bf16 else ["--no-bf16"]))
    rows = read_losses(run_dir)
    (first, start, _), (_, end, rate) = rows[0], rows[-1]
    print(f"[smoke] dtr.py {cfg['model']} + DTR, {steps} steps, batch {B}, bf16={args.bf16 and device.type == 'cuda'},"
          f" compile={args.compile}: loss {start:.4f} (steps 1-{first}) -> {end:.4f} (last {steps // 10} steps), "
          f"{rate:.2f} steps/s at the end")
    return {"smoke_start_loss": start, "smoke_end_loss": end, "smoke_steps_per_s": rate}


def check_sampler(cfg, args, device):
    """DDPM-250 with cfg 1.5 (common.sampling.sample_images, as --sample-only): images/s of one batch."""
    from common.sampling import sample_images
    from common.training_run import sampling_module
    torch.manual_seed(0)
    model = create_model(cfg["model"], cfg["latent_size"], 4, 1000).to(device).eval()
    model = sampling_module(model, argparse.Namespace(compile=args.compile))
    labels = torch.randint(0, 1000, (cfg["batch_size"],), device=device)
    shape = (4, cfg["latent_size"], cfg["latent_size"])

    def draw(steps):
        with autocast(device, args.bf16):
            sample_images(model, labels, shape, num_steps=steps, cfg_scale=1.5, noise_schedule="cosine")
    draw(2)  # warm-up (compilation with --compile)
    synchronize(device)
    start = time.perf_counter()
    draw(cfg["sampling_steps"])
    synchronize(device)
    sec = time.perf_counter() - start
    print(f"[sampler] {cfg['model']} DDPM-{cfg['sampling_steps']} cfg 1.5, batch {len(labels)} (x2 for guidance), "
          f"compile={args.compile}: {len(labels) / sec:.2f} images/s ({sec:.1f} s)")
    return {"sampler_images_per_s": len(labels) / sec}


def check_taskdiffusion(cfg, args, device):
    """TaskDiffusion at the paper's backbone and size: one training step (Adam) and 3-step inference, timed after
    a warm-up of each, on synthetic dense labels."""
    targs = td.parse_args(["--backbone", cfg["td_backbone"], "--image-size", str(cfg["td_size"])])
    torch.manual_seed(0)
    model = td.build_model(targs).to(device)
    loader = torch.utils.data.DataLoader(td.create_dense_dataset(targs, "train"), batch_size=cfg["td_batch_size"])
    images, targets = td.to_device(next(iter(loader)), targs.tasks, device)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def train_step():
        with autocast(device, args.bf16):
            loss, _ = td.training_loss(model.train(), images, targets, targs.dataset, targs.aux_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def infer():
        with torch.no_grad(), autocast(device, args.bf16):
            td.predict(model.eval(), images, 3)
    sec = interleaved_medians({"train": train_step, "infer": infer}, 1, 1, device)
    print(f"[taskdiffusion] {cfg['td_backbone']} {cfg['td_size']}x{cfg['td_size']}, batch {len(images)}: one training "
          f"step {sec['train']:.3f} s, 3-step inference {sec['infer'] / len(images) * 1e3:.1f} ms/image")
    return {"td_train_step_s": sec["train"], "td_infer_3step_ms_per_image": sec["infer"] / len(images) * 1e3}


def check_torchrun(cfg, args, device, folder):
    """dtr.py under `torchrun --nproc_per_node=2` (two GPUs; --tiny: two CPU processes over gloo): the run ends
    and its log reports the replicas in sync."""
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if gpus < 2 and not args.tiny:
        print(f"[torchrun] skipped: {gpus} GPU(s) here, the 2-process run needs 2")
        return {"torchrun": f"skipped ({gpus} GPU)"}
    results_dir = os.path.join(folder, "torchrun")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "dtr.py",
               "--model", "DiT-Ti/4" if args.tiny else "DiT-B/2", "--image-size", "16" if args.tiny else "32",
               "--steps", "4" if args.tiny else "20", "--global-batch-size", "8", "--log-every", "2",
               "--ckpt-every", "1000", "--sample-every", "1000", "--num-sampling-steps", "2",
               "--results-dir", results_dir]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env,
                          capture_output=True, text=True, timeout=300)
    logs = glob.glob(os.path.join(results_dir, "*", "log.txt"))
    in_sync = bool(logs) and "replicas in sync: True" in open(logs[0]).read()
    status = "ok, replicas in sync" if done.returncode == 0 and in_sync else f"FAILED (exit {done.returncode})"
    print(f"[torchrun] 2 processes ({'CPU, gloo' if gpus < 2 else 'GPUs, nccl'}): {status}")
    if done.returncode:
        print(done.stderr[-2000:])
    return {"torchrun": status}


def summary_table(rows):
    lines = ["| check | measured | target | seconds |", "|---|---|---|---|"]
    lines += [f"| {name} | {measured} | {target} | {sec} |" for name, measured, target, sec in rows]
    return "\n".join(lines)


def gpu_check(args, device):
    """Every part of the check in order of importance, within --gpu-check-budget; returns (results, table)."""
    cfg = dict(TINY_CHECK if args.tiny else GPU_CHECK)
    for key in ("model", "latent_size", "batch_size", "iters", "warmup"):
        setattr(args, key, cfg[key])
    args.compile = args.compile and not args.tiny
    start, results, rows = time.perf_counter(), {}, []
    fmt = lambda key, pattern: pattern.format(results[key]) if key in results else "n/a"
    folder = tempfile.mkdtemp(prefix="gpu_check_")
    parts = [
        ("anchor", lambda: bench_anchor(args, device, results)),
        ("smoke", lambda: results.update(check_smoke(cfg, args, device, folder))),
        ("sampler", lambda: results.update(check_sampler(cfg, args, device))),
        ("taskdiffusion", lambda: results.update(check_taskdiffusion(cfg, args, device))),
        ("torchrun", lambda: results.update(check_torchrun(cfg, args, device, folder))),
    ]
    seconds = {}
    try:
        for name, run in parts:
            if seconds and time.perf_counter() - start > args.gpu_check_budget:  # the first part always runs
                print(f"[{name}] skipped: the check has run {time.perf_counter() - start:.0f} s, over "
                      f"--gpu-check-budget {args.gpu_check_budget:g} s")
                seconds[name] = "skipped (time)"
                continue
            part_start = time.perf_counter()
            try:
                run()
            except (Exception, SystemExit) as e:  # one broken part (or fail()) must not cost the others their turn
                traceback.print_exc()
                results[f"{name}_error"] = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            seconds[name] = f"{time.perf_counter() - part_start:.0f}"
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    shapes = f"{cfg['model']}, {cfg['latent_size']}x{cfg['latent_size']}x4, batch {cfg['batch_size']}"
    mfu = results.get("anchor_ours_mfu")
    rows = [(f"{name}: error", results[f"{name}_error"], "", "") for name, _ in parts if f"{name}_error" in results]
    rows += [
        (f"ours / official DiT recipe, train step ({shapes})", fmt("anchor_speedup", "{:.2f}x"), ">= 1.5x",
         seconds.get("anchor", "")),
        ("ours: images/s, TFLOP/s", f"{fmt('anchor_ours_images_per_s', '{:.1f}')}, "
         f"{fmt('anchor_ours_tflops', '{:.3g}')}", "", ""),
        ("official: images/s, TFLOP/s", f"{fmt('anchor_official_images_per_s', '{:.1f}')}, "
         f"{fmt('anchor_official_tflops', '{:.3g}')}", "", ""),
        ("MFU of ours (bf16 peak)", f"{mfu:.1%}" if mfu else "n/a", ">= 40%", ""),
        ("peak memory ours / official (MiB)", f"{fmt('anchor_ours_memory_mib', '{:.0f}')} / "
         f"{fmt('anchor_official_memory_mib', '{:.0f}')}", "", ""),
        ("DTR / vanilla step time", fmt("anchor_dtr_ratio", "{:.3f}"), "<= 1.01", ""),
        ("ANT-UW / vanilla step time", fmt("anchor_ant_uw_ratio", "{:.3f}"), "<= 1.03", ""),
        (f"dtr.py smoke, {cfg['smoke_steps']} steps: loss start -> end",
         f"{fmt('smoke_start_loss', '{:.4f}')} -> {fmt('smoke_end_loss', '{:.4f}')} "
         f"({fmt('smoke_steps_per_s', '{:.2f}')} steps/s)", "decreasing", seconds.get("smoke", "")),
        (f"DDPM-{cfg['sampling_steps']} cfg 1.5 sampling, images/s", fmt("sampler_images_per_s", "{:.2f}"), "",
         seconds.get("sampler", "")),
        (f"TaskDiffusion {cfg['td_backbone']} {cfg['td_size']} px: train step s, 3-step ms/image",
         f"{fmt('td_train_step_s', '{:.3f}')}, {fmt('td_infer_3step_ms_per_image', '{:.1f}')}", "",
         seconds.get("taskdiffusion", "")),
        ("torchrun, 2 processes", results.get("torchrun", "n/a"), "replicas in sync", seconds.get("torchrun", "")),
    ]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    header = (f"{'--tiny (toy shapes, CPU) ' if args.tiny else ''}gpu check on {name}, torch {torch.__version__}, "
              f"compile={args.compile}, bf16={args.bf16 and device.type == 'cuda'}, "
              f"{time.perf_counter() - start:.0f} s in all")
    table = f"{header}\n\n{summary_table(rows)}\n"
    print("\n" + table)
    os.makedirs(os.path.dirname(os.path.abspath(args.gpu_check_out)), exist_ok=True)
    with open(args.gpu_check_out, "w") as f:
        f.write(table)
    print(f"wrote {args.gpu_check_out}")
    return results, table


SECTIONS = {"anchor": bench_anchor, "dtr": bench_dtr, "mfu": bench_mfu, "ant": bench_ant, "dp": bench_dp, "sampler": bench_sampler,
            "taskdiffusion": bench_taskdiffusion, "fidmem": bench_fidmem, "odsf": bench_odsf}


#################################################################################
#                                     main                                      #
#################################################################################

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small CPU-friendly shapes (DiT-S/4, batch 8, few repeats)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default=None, help="DiT for dtr/mfu/sampler (default DiT-L/2; --quick: DiT-S/4)")
    p.add_argument("--latent-size", type=int, default=32, help="latent side (ImageNet 256 -> 32)")
    p.add_argument("--batch-size", type=int, default=None, help="per-GPU batch (default 32; --quick: 8)")
    p.add_argument("--iters", type=int, default=None, help="timed repeats (default 20; --quick: 5)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--sampling-steps", type=int, default=None, help="DDPM steps (default 250; --quick: 10)")
    p.add_argument("--ant-k", type=int, default=5, help="timestep clusters of the ant section (upstream DiT: 5)")
    p.add_argument("--td-batch-size", type=int, default=None, help="taskdiffusion images per batch (default 4; "
                                                                   "--quick: 2)")
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    p.add_argument("--compile", action="store_true", help="torch.compile our fast path in the anchor section")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, for MFU")
    p.add_argument("--fidmem-samples", type=int, default=None, help="fidmem images (default 50000; --quick: 2000)")
    p.add_argument("--fidmem-size", type=int, default=None, help="fidmem image side (default 256; --quick: 64)")
    p.add_argument("--fidmem-dir", default=None, help="folder for fidmem's temporary .npz (default: system temp)")
    p.add_argument("--gpu-check", action="store_true",
                   help="the prepared GPU check: anchor at DiT-L/2 32x32x4 batch 32 (+ --compile), a 200-step dtr.py "
                        "DiT-L/2 + DTR smoke on random latents, DDPM-250 cfg sampling, TaskDiffusion ViT-L 512 px, "
                        "2-process torchrun if 2 GPUs; one table, also written to --gpu-check-out")
    p.add_argument("--tiny", action="store_true", help="--gpu-check at toy shapes on CPU (under a minute, no compile)")
    p.add_argument("--gpu-check-out", default=os.path.join("results", "gpu_check.md"))
    p.add_argument("--gpu-check-budget", type=float, default=420,
                   help="seconds after which the check starts no further part (default 420: ends within 8 minutes)")
    p.add_argument("--no-compile", dest="check_compile", action="store_false",
                   help="--gpu-check without torch.compile")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    args = p.parse_args(argv)
    quick = dict(model="DiT-S/4", batch_size=10, iters=5, sampling_steps=10, td_batch_size=2)
    full = dict(model="DiT-L/2", batch_size=32, iters=20, sampling_steps=250, td_batch_size=4)
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.tiny and not args.gpu_check:
        p.error("--tiny is a size for --gpu-check: pass both")
    if args.gpu_check:
        args.compile = args.check_compile
    unknown = set(args.only.split(",")) - set(SECTIONS)
    if unknown:
        p.error(f"unknown --only section(s) {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'} "
          f"({torch.get_num_threads()} threads), torch {torch.__version__}")
    if args.gpu_check:
        if device.type != "cuda" and not args.tiny:
            fail("--gpu-check measures a GPU (no CUDA device here); add --tiny to run it at toy shapes on CPU")
        return gpu_check(args, device)[0]
    results = {}
    for name in args.only.split(","):
        SECTIONS[name](args, device, results)
    results.pop("vanilla_model", None)
    return results


if __name__ == "__main__":
    main()
