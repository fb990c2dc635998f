"""Benchmarks behind the README's speed and memory claims, printed as ratios measured in one process.

    python -m eval.bench --quick                 # CPU, small shapes, about a minute
    python -m eval.bench --device cuda           # full size: DiT-L/2 on 32x32x4 latents, batch 32, bf16, SDPA

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
import functools
import os
import shutil
import statistics
import tempfile
import time
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
from common.training_run import autocast, fail, make_ema, training_module, update_ema
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
# over the parameters. Ours: bf16 autocast on CUDA, F.scaled_dot_product_attention, --compile, a fused EMA.

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


def recipe_step(model, diffusion, batch, bf16, ema_update, loss_fn=None):
    """One full training step (fwd + bwd + AdamW + EMA) on a fixed batch; `model` may be a compiled wrapper.
    loss_fn(module, x, y, t) replaces the plain loss (ANT-UW)."""
    bare = getattr(model, "_orig_mod", model)
    params = [p for p in bare.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params + (list(loss_fn.extra_params) if loss_fn else []), lr=1e-4, weight_decay=0)
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
    steps = {"ours": recipe_step(training_module(model, fast), diffusion, batch, args.bf16, update_ema),
             "official": recipe_step(official, diffusion, batch, False, official_update_ema),
             "ours-dtr": recipe_step(training_module(routed, fast), diffusion, batch, args.bf16, update_ema),
             "ours-ant-uw": recipe_step(training_module(copy.deepcopy(model), fast), diffusion, batch, args.bf16,
                                        update_ema, UWLoss(diffusion, k, device, args.bf16))}
    flops = step_flops(official, diffusion, batch)
    sec = interleaved_medians(steps, args.iters, max(args.warmup, 2 if args.compile else 0), device)
    mem = {name: peak_memory(steps[name], device) for name in ("ours", "official")}
    peak = peak_tflops(device, args.peak_tflops)
    what = "peak memory" if device.type == "cuda" else "saved activations"
    bf16 = args.bf16 and device.type == "cuda"
    print(f"[anchor] {args.model} batch {B} on {args.latent_size}x{args.latent_size}x4, one step fwd+bwd+AdamW+EMA; "
          f"ours: bf16={bf16}, SDPA, compile={args.compile}; official: fp32 (TF32 on CUDA), softmax(QK^T)V, no "
          f"compile; {flops / B / 1e9:.2f} GFLOP/image (FlopCounterMode)")
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
    print(f"  ours / official = {results['anchor_speedup']:.2f}x (target >= 1.5 on H100/H200; MFU >= 40%)")
    print(f"  step time DTR / vanilla = {results['anchor_dtr_ratio']:.3f} (target <= 1.01), ANT-UW (k={k}) / "
          f"vanilla = {results['anchor_ant_uw_ratio']:.3f} (target <= 1.03), both on our fast path")


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
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    args = p.parse_args(argv)
    quick = dict(model="DiT-S/4", batch_size=10, iters=5, sampling_steps=10, td_batch_size=2)
    full = dict(model="DiT-L/2", batch_size=32, iters=20, sampling_steps=250, td_batch_size=4)
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
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
    results = {}
    for name in args.only.split(","):
        SECTIONS[name](args, device, results)
    results.pop("vanilla_model", None)
    return results


if __name__ == "__main__":
    main()
