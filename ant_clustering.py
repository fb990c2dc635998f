"""ANT: Go et al., "Addressing Negative Transfer in Diffusion Models" (NeurIPS 2023).

Diffusion training is multi-task learning over the T denoising tasks. This file, in the paper's order: the task
affinity score (Sec. 3.2: cosine similarity of per-timestep loss gradients, through a fixed random projection),
interval clustering of the timesteps into k contiguous task clusters by exact dynamic programming (Sec. 4.1, App. G)
with the timestep / SNR / affinity costs, the MTL methods applied to the k cluster losses (Sec. 4.2): uncertainty
weighting, PCGrad, Nash-MTL, RLW / LS, then the loss (stratified batches, Min-SNR / P2 baselines), the training loop
(DiT train.py conventions, as dtr.py), the negative-transfer-gap sampler (Eq. 3) and main().
Where the paper text lost Section 4, the project SPEC (../shared/SPEC.md, "ANT") is followed; upstream is
gohyojun15/ANT_diffusion.

    python ant_clustering.py              # demo: affinity, 3 clusterings, ANT-UW vs vanilla on the synthetic set, CPU
    torchrun --nproc_per_node=8 ant_clustering.py --model DiT-L/2 --data <latent dir> --latent --mtl uw
    python ant_clustering.py --task-affinity run/checkpoints/*.pt     # Fig. 1 from a run's checkpoints
    python ant_clustering.py --data <dir> --mtl none --t-range 0 199  # an interval specialist for D[1, 200]
    python ant_clustering.py --ntg --ckpt generalist.pt --specialist specialist.pt --t-range 0 199
"""
import argparse
import contextlib
import functools
import math
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image
from scipy.optimize import minimize
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from common.checkpoint_formats import model_from_checkpoint
from common.class_conditional_cli import (add_model_data_args, add_sampling_args, finish_args, sample_checkpoint,
                                          sample_grid_writer, sample_main, start_training)
from common.diffusion import create_diffusion, min_snr_weight, p2_weight, snr
from common.named_models import create_model
from common.training_run import (add_run_args, all_reduce_mean, all_reduce_mean_, autocast, cleanup_distributed,
                                 end_of_step, fail, finish_training, infinite_loader, init_distributed, load_checkpoint,
                                 load_model_state, make_ema, one_line_errors, resume_training, run_dir_of, update_ema,
                                 wrap_ddp)
from common.training_run import adamw, sampling_module, training_module  # the fast path
from data.labelled_images import create_dataset, fixed_batch, training_batch
from eval.demo_comparison import add_compare_args, comparison_requested, run_comparison


#################################################################################
#                        Task Affinity Score (Sec. 3.2)                         #
#################################################################################

def _projection_block(rows, proj_dim, seed, block_index, device):
    """Rows of the fixed Gaussian projection R (entries N(0, 1/proj_dim)), regenerated from (seed, block_index)."""
    # Seeding every block on its own makes R independent of which parameters happen to get a gradient;
    # SeedSequence mixes (seed, block) into 32 bits (the CPU generator ignores the high bits of a 64-bit seed).
    block_seed = int(np.random.SeedSequence([seed, block_index]).generate_state(1)[0])
    generator = torch.Generator(device=device).manual_seed(block_seed)
    return torch.randn(rows, proj_dim, generator=generator, device=device) / math.sqrt(proj_dim)


def _project_gradient(grads, params, proj_dim, seed, max_block_elems):
    """R^T g for the concatenated gradient g, without ever holding more than max_block_elems entries of R."""
    device = params[0].device
    out = torch.zeros(proj_dim, device=device)
    rows_per_block = max(1, max_block_elems // proj_dim)
    block_index = 0
    for grad, param in zip(grads, params):
        n = param.numel()
        for start in range(0, n, rows_per_block):
            rows = min(rows_per_block, n - start)
            if grad is not None:  # an unused parameter contributes a zero block: skip drawing it
                chunk = grad.reshape(-1)[start:start + rows].float()
                out += chunk @ _projection_block(rows, proj_dim, seed, block_index, device)
            block_index += 1
    return out


def _summed_grads(losses, params):
    """Gradients of a scalar loss, or the summed gradients of an iterable of scalar losses (micro-batches)."""
    total = None
    for loss in [losses] if torch.is_tensor(losses) else losses:
        if not torch.is_tensor(loss) or loss.numel() != 1:
            raise ValueError("loss_fn(t, batch_index) must return a scalar loss tensor (reduce with .mean()) "
                             "or an iterable of them")
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        total = grads if total is None else [a if b is None else b if a is None else a + b
                                             for a, b in zip(total, grads)]
    return total


def task_affinity(loss_fn, params, timesteps, num_batches, proj_dim=4096, seed=0, max_block_elems=2**24):
    """Task affinity A[i, j] = cos(grad L_{t_i}, grad L_{t_j}) averaged over batches (Sec. 3.2, App. B).

    loss_fn(t, batch_index) returns the scalar loss of timestep t on that batch, or an iterable of micro-batch
    losses whose gradients add up (diffusion_affinity: the paper's protocol). proj_dim=None uses the exact flattened
    gradients (small models only; upstream keeps T full gradients, ~130 GB for DiT-S). Each projection regenerates
    R (D x proj_dim draws), so for big models pass a timestep subsample and use interpolate_affinity.
    """
    params, timesteps = list(params), [int(t) for t in timesteps]
    if not (params and timesteps and num_batches >= 1 and (proj_dim is None or proj_dim >= 1)):
        raise ValueError("task_affinity needs parameters, timesteps, num_batches >= 1 and proj_dim >= 1 or None")
    # Johnson-Lindenstrauss: for a Gaussian R with N(0, 1/m) entries, <R^T g_i, R^T g_j> preserves every pairwise
    # inner product (hence cosine) up to O(1/sqrt(m)) relative error, whatever the number of parameters D, so
    # m = 4096 numbers per timestep replace the D-dim gradient. R must be the same for all timesteps and batches.
    affinity = torch.zeros(len(timesteps), len(timesteps), dtype=torch.float64)
    for batch_index in range(num_batches):
        vectors = []
        for t in timesteps:
            grads = _summed_grads(loss_fn(t, batch_index), params)
            if proj_dim is None:
                flat = [torch.zeros(p.numel(), device=p.device) if g is None else g.reshape(-1).float()
                        for g, p in zip(grads, params)]
                vectors.append(torch.cat(flat))
            else:
                vectors.append(_project_gradient(grads, params, proj_dim, seed, max_block_elems))
        unit = torch.nn.functional.normalize(torch.stack(vectors).double(), dim=1)  # zero gradient -> cosine 0
        affinity += (unit @ unit.T).cpu()
    return (affinity / num_batches).numpy()


def interpolate_affinity(affinity, timesteps, num_timesteps):
    """Linearly interpolate an affinity matrix measured on a timestep subsample to the full (T, T) grid."""
    affinity = np.asarray(affinity, dtype=np.float64)
    timesteps = np.asarray(timesteps, dtype=np.float64)
    if affinity.shape != (len(timesteps), len(timesteps)) or np.any(np.diff(timesteps) <= 0):
        raise ValueError(f"affinity {affinity.shape} needs {len(timesteps)} strictly increasing timesteps")
    grid = np.arange(num_timesteps, dtype=np.float64)
    along_s = np.stack([np.interp(grid, timesteps, row) for row in affinity])  # (n, T): [i, s] = A(t_i, s)
    return np.stack([np.interp(grid, timesteps, col) for col in along_s.T], axis=1)  # (T, T): [t, s] = A(t, s)


def affinity_timesteps(num_points, num_timesteps):
    """num_points timesteps evenly spread over 0..T-1 (both ends included), for a subsampled affinity."""
    return np.unique(np.linspace(0, num_timesteps - 1, max(2, num_points)).round().astype(int))


def diffusion_affinity(model, diffusion, x, y, timesteps, micro_batch=64, proj_dim=4096, seed=0):
    """Task affinity of a diffusion model on one image set (App. B: grad L_t on the same 1000 training images for
    every t, one checkpoint). L_t is the DiT loss (mse + vb) of x noised to t with its own seeded noise."""
    was_training = model.training
    model.eval()  # the conditional loss without label dropout: the gradients depend on weights, data and t only

    def loss_fn(t, _):
        noise = torch.randn(x.shape, generator=torch.Generator(device=x.device).manual_seed(seed * 1_000_003 + t),
                            device=x.device)
        for xs, ys, ns in zip(x.split(micro_batch), y.split(micro_batch), noise.split(micro_batch)):
            tt = torch.full((len(xs),), t, dtype=torch.long, device=x.device)
            yield diffusion.training_losses(model, xs, tt, dict(y=ys), noise=ns)["loss"].sum() / len(x)

    try:
        return task_affinity(loss_fn, [p for p in model.parameters() if p.requires_grad], timesteps, 1, proj_dim, seed)
    finally:
        model.train(was_training)


def save_affinity(affinity, path_npy, path_png, min_pixels=256):
    """Save the matrix (.npy) and a blue-white-red heat map (.png, -1 blue, 0 white, +1 red, row 0 at the top)."""
    affinity = np.asarray(affinity, dtype=np.float64)
    if affinity.ndim != 2:
        raise ValueError(f"affinity must be a 2-D matrix, got shape {affinity.shape}")
    for path in (path_npy, path_png):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.save(path_npy, affinity)
    v = np.clip(np.nan_to_num(affinity), -1.0, 1.0)  # cosine similarities: fixed range keeps plots comparable
    red = np.where(v < 0, 1.0 + v, 1.0)
    green = 1.0 - np.abs(v)
    blue = np.where(v > 0, 1.0 - v, 1.0)
    rgb = np.round(np.stack([red, green, blue], axis=-1) * 255).astype(np.uint8)
    image = Image.fromarray(rgb, mode="RGB")
    scale = max(1, math.ceil(min_pixels / max(affinity.shape)))  # blow tiny matrices up with visible cells
    if scale > 1:
        image = image.resize((rgb.shape[1] * scale, rgb.shape[0] * scale), Image.NEAREST)
    image.save(path_png)


#################################################################################
#                   Interval Clustering (Sec. 4.1, App. G)                      #
#################################################################################

def interval_clustering(interval_cost, k, min_size=None, max_size=None):
    """Exact DP for k contiguous intervals covering 0..T-1 with minimal total cost (App. G, Eq. 6-7).

    interval_cost[l, r] (l <= r, inclusive, 0-indexed) is the cost of interval l..r; returns [(l_1, r_1), ...].
    Sizes are bounded by min_size <= r - l + 1 <= max_size (None = unbounded).
    """
    cost = np.asarray(interval_cost, dtype=np.float64)
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"interval_cost must be a square (T, T) matrix, got shape {cost.shape}")
    T = cost.shape[0]
    lo = 1 if min_size is None else int(min_size)
    hi = T if max_size is None else int(max_size)
    if not 1 <= k <= T:
        raise ValueError(f"k must be in 1..T={T}, got {k}")
    if lo < 1 or hi < lo:
        raise ValueError(f"need 1 <= min_size <= max_size, got min_size={min_size}, max_size={max_size}")
    if not k * lo <= T <= k * hi:
        raise ValueError(f"no partition of {T} timesteps into k={k} intervals with sizes in [{lo}, {hi}]: "
                         f"need k*min_size <= T <= k*max_size; loosen the bounds or change k")
    if not np.all(np.isfinite(cost[np.triu_indices(T)])):
        raise ValueError("interval_cost must be finite on and above the diagonal (entries [l, r] with l <= r)")

    # Prefix form of Eq. (7): E[m, i] = min cost of covering the first i timesteps (0..i-1) with m intervals;
    # the last interval is j..i-1, so E[m, i] = min_j E[m-1, j] + cost[j, i-1] with lo <= i - j <= hi.
    # The paper's lower limit max{1 + (m-1) m_I, i + 1 - M_I} on j is implied by E[m-1, j] = inf when infeasible.
    start, end = np.ogrid[:T + 1, :T + 1]  # start = j, end = i (exclusive)
    size = end - start
    band = np.full((T + 1, T + 1), np.inf)
    band[:T, 1:] = cost  # band[j, i] = cost[j, i-1]
    band = np.where((size >= lo) & (size <= hi), band, np.inf)

    E = np.full(T + 1, np.inf)
    E[0] = 0.0
    argmins = []
    for _ in range(k):
        total = E[:, None] + band  # (j, i), vectorised over both the start j and the end i
        best_start = np.argmin(total, axis=0)
        E = total[best_start, np.arange(T + 1)]
        argmins.append(best_start)
    if not np.isfinite(E[T]):
        raise ValueError(f"no feasible partition into k={k} intervals with sizes in [{lo}, {hi}]")

    intervals, i = [], T  # backtrack from S[T, k] (App. G)
    for best_start in reversed(argmins):
        j = int(best_start[i])
        intervals.append((j, i - 1))
        i = j
    return intervals[::-1]


def _centre_cost(per_step):
    """Cost matrix C[l, r] = sum_{t=l..r} per_step[c, t] with centre c = (l + r) // 2 (always inside [l, r])."""
    T = per_step.shape[0]
    prefix = np.zeros((T, T + 1))
    prefix[:, 1:] = np.cumsum(per_step, axis=1)  # row-wise prefix sums: one O(T^2) pass, no double loop
    left, right = np.ogrid[:T, :T]
    centre = (left + right) // 2
    cost = prefix[centre, right + 1] - prefix[centre, left]
    return np.where(right >= left, cost, np.inf)  # lower triangle is not an interval


def timestep_cost(num_timesteps):
    """Timestep cost sum_t |t - c| of every interval; its optimum is the uniform partition."""
    t = np.arange(num_timesteps, dtype=np.float64)
    return _centre_cost(np.abs(t[None, :] - t[:, None]))


def snr_cost(alphas_cumprod, log=False):
    """SNR cost sum_t |SNR(t) - SNR(c)| (log=True: log-SNR) of every interval.

    Raw SNR spans ~1e4..1e-5 on the cosine schedule, so without size bounds the optimum degenerates into tiny
    intervals at small t (cosine, k=5: [0], [1,3], [4,11], [12,36], [37,999]): use paper_size_bounds with it.
    log-SNR is nearly linear in t and gives balanced intervals on its own.
    """
    alphas_cumprod = np.asarray(alphas_cumprod.cpu() if torch.is_tensor(alphas_cumprod) else alphas_cumprod,
                                dtype=np.float64)
    if alphas_cumprod.ndim != 1 or np.any(alphas_cumprod <= 0) or np.any(alphas_cumprod >= 1):
        raise ValueError("alphas_cumprod must be a 1-D array with values in (0, 1) (SNR must be finite)")
    values = snr(alphas_cumprod)
    if log:
        values = np.log(values)
    return _centre_cost(np.abs(values[None, :] - values[:, None]))


def affinity_cost(affinity):
    """Gradient cost -sum_t A[c, t] of every interval, A = task affinity (cosine of loss gradients)."""
    affinity = np.asarray(affinity, dtype=np.float64)
    if affinity.ndim != 2 or affinity.shape[0] != affinity.shape[1] or not np.all(np.isfinite(affinity)):
        raise ValueError(f"affinity must be a finite square (T, T) matrix, got {affinity.shape}; use "
                         f"interpolate_affinity for a timestep subsample, np.nan_to_num for NaNs")
    return _centre_cost(-affinity)


def paper_size_bounds(num_timesteps, k):
    """Paper's interval size bounds (m_I, M_I) = (T / 2k, 2T / k) (App. G)."""
    return num_timesteps // (2 * k), 2 * num_timesteps // k


def uniform_intervals(num_timesteps, k):
    """k equal intervals, as upstream `initialize_cluster("uniform")` (util/uw_util.py), inclusive ends."""
    if not 1 <= k <= num_timesteps:
        raise ValueError(f"k must be in 1..T={num_timesteps}, got {k}")
    return [(num_timesteps * i // k, num_timesteps * (i + 1) // k - 1) for i in range(k)]


CLUSTERINGS = ("timestep", "snr", "gradient")


def clustering_intervals(kind, k, alphas_cumprod, affinity=None, size_bounds=True, log_snr=False):
    """The k intervals minimising one objective of Sec. 4.1 over T = len(alphas_cumprod) timesteps, with the
    paper's size bounds (T/2k, 2T/k) unless size_bounds=False. "gradient" needs the (T, T) task affinity."""
    T = len(alphas_cumprod)
    if kind == "timestep":
        # sum_t |t - c| = floor(n^2 / 4) for an interval of n steps: convex in n, so equal sizes are optimal, but
        # not uniquely (sizes 499 + 501 tie with 500 + 500). Take the uniform optimum, as upstream's "uniform".
        return uniform_intervals(T, k)
    if kind == "snr":
        cost = snr_cost(alphas_cumprod, log=log_snr)
    elif kind == "gradient":
        if affinity is None:
            raise ValueError("gradient clustering needs a (T, T) task-affinity matrix")
        cost = affinity_cost(affinity)
    else:
        raise ValueError(f"unknown clustering '{kind}'; choose one of {', '.join(CLUSTERINGS)}")
    return interval_clustering(cost, k, *(paper_size_bounds(T, k) if size_bounds else (None, None)))


def format_intervals(intervals):
    return " ".join(f"[{l}, {r}]" for l, r in intervals)


def _check_intervals(intervals, num_timesteps):
    """Raise unless intervals are contiguous, in order, and cover 0..T-1."""
    expected_start = 0
    for l, r in intervals:
        if l != expected_start or r < l:
            raise ValueError(f"intervals {intervals} must be contiguous inclusive (start, end) pairs from 0")
        expected_start = r + 1
    if expected_start != num_timesteps:
        raise ValueError(f"intervals {intervals} must end at T-1 = {num_timesteps - 1}")


def interval_index(intervals, num_timesteps):
    """LongTensor[T] mapping each timestep to its cluster id."""
    _check_intervals(intervals, num_timesteps)
    sizes = torch.tensor([r - l + 1 for l, r in intervals])
    return torch.repeat_interleave(torch.arange(len(intervals)), sizes)


def stratified_timesteps(intervals, batch_size, generator=None, device="cpu"):
    """B/k timesteps drawn uniformly inside each interval, grouped by cluster in order (upstream sample_t_batch)."""
    k = len(intervals)
    if batch_size % k != 0:
        raise ValueError(f"batch_size {batch_size} must be divisible by the number of clusters k={k}; "
                         f"use a multiple of {k}")
    _check_intervals(intervals, intervals[-1][1] + 1)
    draw_device = generator.device if generator is not None else device
    t = [torch.randint(l, r + 1, (batch_size // k,), generator=generator, device=draw_device) for l, r in intervals]
    return torch.cat(t).to(device)


#################################################################################
#                 MTL Methods over Cluster Losses (Sec. 4.2)                    #
#################################################################################

def cluster_counts(cluster_ids, k):
    """Samples per cluster, [k] int64: a scatter-add, since torch.bincount on CUDA reads its maximum back to the
    host (a sync every step)."""
    return torch.zeros(k, dtype=torch.long, device=cluster_ids.device).index_add_(0, cluster_ids,
                                                                                  torch.ones_like(cluster_ids))


def cluster_losses(per_sample_loss, cluster_ids, k):
    """(L[k], present[k]): L_i = mean of cluster i's per-sample losses / k; absent clusters give 0, present False.

    The 1/k lives here (upstream divides each cluster mean by k): with a stratified batch, sum_i L_i equals the
    plain batch mean, so LS reproduces vanilla training and every method below sees the same loss scale.
    """
    if per_sample_loss.shape != cluster_ids.shape or per_sample_loss.ndim != 1:
        raise ValueError(f"per_sample_loss {tuple(per_sample_loss.shape)} and cluster_ids "
                         f"{tuple(cluster_ids.shape)} must both be (B,); reduce the loss per sample first")
    sums = per_sample_loss.new_zeros(k).index_add(0, cluster_ids, per_sample_loss)
    counts = cluster_counts(cluster_ids, k)
    present = counts > 0
    means = sums / counts.clamp(min=1).to(sums.dtype)  # absent: 0 / 1 = 0, never NaN
    return means / k, present


class UncertaintyWeighting(nn.Module):
    """Kendall et al. uncertainty weighting: L = sum_i 0.5 * (exp(-s_i) L_i + s_i), s_i = log-variance, init 0."""

    def __init__(self, k):
        super().__init__()
        self.log_vars = nn.Parameter(torch.zeros(k))  # upstream mtl_library/uw.py: init 0 (LibMTL: -0.5)

    def forward(self, losses, present_mask=None):
        terms = 0.5 * (torch.exp(-self.log_vars) * losses + self.log_vars)
        if present_mask is not None:
            terms = torch.where(present_mask, terms, torch.zeros_like(terms))  # absent clusters: no loss, no gradient
        return terms.sum()

    def param_group(self, lr=0.025):
        """AdamW param group with its own lr and no weight decay (upstream train_ant_single_gpu.py)."""
        return {"params": [self.log_vars], "lr": lr, "weight_decay": 0.0}

    def weights(self):
        """Current loss weights exp(-s_i), for logging."""
        return torch.exp(-self.log_vars).detach()


def pcgrad(grads, generator=None):
    """PCGrad (Yu et al. 2020) on k cluster gradients -> combined flat gradient [D].

    Each g_i is projected onto the normal plane of every ORIGINAL g_j it conflicts with (g_i . g_j < 0), j in a
    random order, then the projected gradients are summed. grads: [k, D] tensor or k lists of per-param tensors.
    """
    if isinstance(grads, (list, tuple)):
        grads = torch.stack([torch.cat([g.reshape(-1) for g in per_cluster]) for per_cluster in grads])
    if grads.ndim != 2:
        raise ValueError(f"grads must be [k, D] or a list of k lists of tensors, got shape {tuple(grads.shape)}")
    k = grads.shape[0]
    # Every projected g_i stays a combination sum_j C[i, j] g_j of the originals, so the surgery runs on the k x k
    # Gram matrix (one matmul over D, then O(k^3) tiny ops) instead of k^2 dot products over D. It stays on the
    # gradients' device, branch-free (a conflict test `dot < 0` on the host would wait for the GPU every step).
    gram = (grads @ grads.T).double()
    squared_norms = gram.diagonal() + 1e-8  # 1e-8 keeps a zero gradient from dividing by 0
    coef = torch.eye(k, dtype=torch.float64, device=grads.device)
    # j runs over all clusters as in the PCGrad / LibMTL / upstream code, in a random order per i drawn on the host;
    # j == i only matters if g_i turned against itself after earlier projections. order[i, s] = one-hot of the
    # s-th j for row i, so no index is read back from a tensor.
    order = torch.eye(k, dtype=torch.float64)[torch.stack([torch.randperm(k, generator=generator) for _ in range(k)])]
    order = order.to(grads.device)
    for i in range(k):
        for e_j in order[i]:
            dot = coef[i] @ (gram @ e_j)  # = projected_i . g_j
            # projected_i -= (projected_i . g_j) / |g_j|^2 g_j where they conflict (dot < 0), else unchanged
            coef[i] -= e_j * (dot.clamp(max=0) / (squared_norms @ e_j))
    return coef.sum(dim=0).to(grads) @ grads  # sum_i projected_i


class NashMTL:
    """Nash-MTL (Navon et al. 2022) loss weights alpha, refreshed every 25 steps, at ANT's scale.

    alpha solves the bargaining condition alpha_i (Ghat alpha)_i = 1 on the Gram matrix normalised by its Frobenius
    norm, Ghat = G G^T / ||G G^T||_F, and is used as it is: ANT (`mtl_library/nash.py`, as the nash-mtl code) weights
    its raw cluster means by that alpha and divides by k, i.e. exactly sum_i alpha_i L_i with our L_i = mean_i / k.
    The update then scales with the gradients like plain training (its norm is sqrt(k ||G G^T||_F)); the scale-free
    alpha / sqrt(||G G^T||_F), the condition on G G^T itself, would give every update norm sqrt(k) and, with the
    gradient clipping at 1, clip all of them. Training loss: sum_i alpha_i L_i, grad norm clipped to max_grad_norm.
    """

    max_grad_norm = 1.0
    # Ridge on Ghat (||Ghat||_F = 1): exactly opposite cluster gradients make Ghat singular, and the bargaining
    # objective then has no minimiser (alpha -> 1e9+). With the ridge alpha <= sqrt(k / ridge), and the update
    # stays within sqrt(k ||G G^T||_F) whatever alpha is; a well-conditioned alpha moves by ~1e-6 relative.
    ridge = 1e-6

    def __init__(self, k, update_every=25):
        self.k = k
        self.update_every = update_every  # App. C: alpha updated every 25 iterations
        self.alpha = None  # torch tensor, reused between updates
        self._normalised_alpha = np.ones(k)  # warm start of the solver

    def solve_weights(self, gtg):
        """alpha = argmin_{a >= 1e-8} 0.5 a^T (Ghat + ridge I) a - sum_i log a_i, Ghat = gtg / ||gtg||_F, whose
        stationarity is the Nash condition a_i ((Ghat + ridge I) a)_i = 1 (Navon et al. Eq. 3)."""
        gtg = np.asarray(gtg, dtype=np.float64)
        if gtg.shape != (self.k, self.k):
            raise ValueError(f"gtg must be the ({self.k}, {self.k}) Gram matrix G G^T, got {gtg.shape}")
        alpha = np.zeros(self.k)
        active = np.diag(gtg) > 0  # a cluster with zero gradient (absent) cannot satisfy the condition: weight 0
        norm = np.linalg.norm(gtg[np.ix_(active, active)])
        if not active.any() or not np.isfinite(norm):
            return alpha
        gram = gtg[np.ix_(active, active)] / norm + self.ridge * np.eye(int(active.sum()))
        objective = lambda a: (0.5 * a @ gram @ a - np.log(a).sum(), gram @ a - 1.0 / a)
        result = minimize(objective, self._normalised_alpha[active], jac=True, method="L-BFGS-B",
                          bounds=[(1e-8, None)] * int(active.sum()),
                          options={"maxiter": 1000, "ftol": 1e-15, "gtol": 1e-10})
        if np.all(np.isfinite(result.x)):
            self._normalised_alpha[active] = result.x
        alpha[active] = self._normalised_alpha[active]
        return alpha

    def updates_at(self, step):
        """True when alpha is (re)computed at this step: the first step and every update_every-th."""
        return self.alpha is None or step % self.update_every == 0

    def step_weights(self, step, grads_fn):
        """alpha for this step: grads_fn() -> [k, D] cluster gradients is called only every update_every steps."""
        if self.updates_at(step):
            grads = grads_fn().detach()
            gtg = (grads.double() @ grads.double().T).cpu().numpy()
            self.alpha = torch.tensor(self.solve_weights(gtg), dtype=torch.float32, device=grads.device)
        return self.alpha

    def state_dict(self):
        """alpha and the solver's warm start: a resumed run reuses them exactly as the uninterrupted one."""
        return {"alpha": None if self.alpha is None else self.alpha.cpu(), "warm_start": self._normalised_alpha.copy()}

    def load_state_dict(self, state):
        self.alpha, self._normalised_alpha = state["alpha"], np.array(state["warm_start"], dtype=np.float64)


def rlw_weights(k, generator=None, device="cpu"):
    """Random loss weights: softmax of k standard normals, redrawn every step (LibMTL RLW, dist='Normal')."""
    draw_device = generator.device if generator is not None else device
    return torch.softmax(torch.randn(k, generator=generator, device=draw_device), dim=0).to(device)


def ls_weights(k, device="cpu"):
    """Linear scalarisation: equal weights 1 (LibMTL EW), i.e. the plain batch mean with cluster_losses' 1/k."""
    return torch.ones(k, device=device)


def per_cluster_grads(losses, params, present_mask=None):
    """[k, D] flattened gradients of each cluster loss w.r.t. params (one backward per cluster). losses: a
    [k] tensor, or k scalars with graphs of their own (batch_cluster_losses' separate graphs: each backward then
    runs through its cluster's samples only)."""
    params = [p for p in params]
    out = torch.zeros(len(losses), sum(p.numel() for p in params), device=params[0].device)  # filled in place
    for i, loss in enumerate(losses):
        if not loss.requires_grad:
            continue  # zero row
        if present_mask is not None:  # absent cluster: zero row, decided on the device (no read-back of the mask)
            loss = loss * present_mask[i]
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        offset = 0
        for g, p in zip(grads, params):
            if g is not None:
                out[i, offset:offset + p.numel()] = g.reshape(-1)
            offset += p.numel()
    return out


def write_flat_grad(params, flat_grad):
    """Write a combined flat gradient [D] back into the .grad of params (same order as per_cluster_grads)."""
    params = [p for p in params]
    total = sum(p.numel() for p in params)
    if flat_grad.ndim != 1 or flat_grad.numel() != total:
        raise ValueError(f"flat_grad has shape {tuple(flat_grad.shape)}, expected ({total},) for these params")
    offset = 0
    for p in params:
        p.grad = flat_grad[offset:offset + p.numel()].view_as(p).to(device=p.device, dtype=p.dtype)
        offset += p.numel()


MTL_METHODS = ("uw", "pcgrad", "nash", "ls", "rlw")


def mtl_state(method, k, seed=0, device="cpu"):
    """What `method` carries between steps: {"uw": UncertaintyWeighting} or {"nash": NashMTL}, plus the seed of
    its shared random draws (RLW weights, PCGrad order), which are a pure function of (seed, step)."""
    if method not in MTL_METHODS:
        raise ValueError(f"unknown MTL method '{method}'; choose one of {', '.join(MTL_METHODS)}")
    state = {"seed": seed}
    if method == "uw":
        state["uw"] = UncertaintyWeighting(k).to(device)
    if method == "nash":
        state["nash"] = NashMTL(k)
    return state


def needs_cluster_grads(method, state, step):
    """True when this step of `method` needs the k cluster gradients: PCGrad always, Nash on its update steps."""
    return method == "pcgrad" or (method == "nash" and state["nash"].updates_at(step))


def mtl_backward(method, cluster_loss_fn, params, state, step):
    """One step of an MTL method over the k cluster losses (Sec. 4.2): leaves the combined gradient in the .grad
    of params (the shared model) and of the UW log-variances, averaged over DDP ranks; returns (L[k], weights[k]).

    cluster_loss_fn(separate_graphs) -> (L[k], present[k]) runs the forward (batch_cluster_losses). UW, LS, RLW and
    Nash between updates: one backward of sum_i w_i L_i (DDP averages it). PCGrad and Nash updates: separate
    per-cluster graphs, one backward per cluster, the [k, D] gradients averaged over ranks, then combined.
    """
    params = [p for p in params if p.requires_grad]  # DiT's fixed sin-cos pos_embed is a frozen Parameter
    generator = torch.Generator().manual_seed(state["seed"] * 1_000_003 + step)  # equal on all ranks, and on resume
    if needs_cluster_grads(method, state, step):
        losses, present = cluster_loss_fn(True)
        grads = per_cluster_grads(losses, params, present)
        losses = torch.stack(losses).detach()
        # Average first, then combine: every rank runs the same surgery on the global batch's cluster gradients,
        # which keeps the replicas identical (PCGrad and Nash are not linear in the gradients).
        all_reduce_mean_([grads])
        if method == "pcgrad":
            weights, combined = torch.ones(len(losses)), pcgrad(grads, generator)
        else:
            weights = state["nash"].step_weights(step, lambda: grads)
            combined = weights @ grads  # Nash-MTL update: sum_i alpha_i g_i
        write_flat_grad(params, combined)
    else:
        losses, present = cluster_loss_fn(False)
        k = len(losses)
        if method == "uw":
            total, weights = state["uw"](losses, present), state["uw"].weights()
        else:
            weights = {"ls": lambda: ls_weights(k), "rlw": lambda: rlw_weights(k, generator),
                       "nash": lambda: state["nash"].alpha}[method]().to(losses.device)
            total = (weights * losses).sum()  # an absent cluster has L_i = 0
        total.backward()
    if "uw" in state:  # the log-variances live outside DDP: average their gradients by hand
        all_reduce_mean_([p.grad for p in state["uw"].parameters()])
    if method == "nash":
        torch.nn.utils.clip_grad_norm_(params, NashMTL.max_grad_norm)
    return losses.detach(), weights.detach()


#################################################################################
#           Loss: stratified cluster losses, Min-SNR / P2 baselines             #
#################################################################################

def mse_weight(kind, diffusion, t, min_snr_gamma=5.0, p2_k=1.0, p2_gamma=1.0):
    """Per-sample eps-MSE weight of the loss-weighting baselines (Sec. 5.2; SPEC "ANT"): Min-SNR-gamma (gamma = 5,
    on the eps-MSE term only) or P2, 1 / (k + SNR)^gamma with k = 1, gamma in {0.5, 1}; None = plain."""
    if kind == "none":
        return None
    snr_t = diffusion._extract("snr", t, 1)  # cached on the device: no host-to-device copy per step
    if kind == "min-snr":
        return min_snr_weight(snr_t, min_snr_gamma)
    if kind == "p2":
        return p2_weight(snr_t, p2_k, p2_gamma)
    raise ValueError(f"unknown loss weighting '{kind}'; choose none, min-snr or p2")


class ClusterLoss(nn.Module):
    """The k timestep intervals as a loss (Sec. 4.1-4.2): stratified timesteps in, k cluster losses out.

        clusters = ClusterLoss(uniform_intervals(1000, 8)).to(device)
        t = clusters.sample_timesteps(batch_size)        # B/k timesteps inside each interval, grouped by cluster
        loss = uw(*clusters(per_sample_loss, t))         # (L[k], present[k]) -> UncertaintyWeighting
    The intervals are buffers, so a checkpoint carries the clustering it was trained with.
    """

    def __init__(self, intervals, num_timesteps=None):
        super().__init__()
        T = intervals[-1][1] + 1 if num_timesteps is None else num_timesteps
        self.register_buffer("cluster_of", interval_index(intervals, T))
        self.register_buffer("intervals", torch.tensor(intervals, dtype=torch.long))
        self.interval_list = [tuple(i) for i in intervals]  # host copy: sampling needs no device sync

    @property
    def k(self):
        return len(self.interval_list)

    def load_state_dict(self, state_dict, strict=True):
        out = super().load_state_dict(state_dict, strict)
        self.interval_list = [tuple(i) for i in self.intervals.tolist()]
        return out

    def sample_timesteps(self, batch_size, generator=None):
        return stratified_timesteps(self.interval_list, batch_size, generator, self.cluster_of.device)

    def forward(self, per_sample_loss, t):
        return cluster_losses(per_sample_loss, self.cluster_of[t], self.k)


def batch_cluster_losses(diffusion, model, x, y, t, clusters, separate_graphs=False, weight=None, bf16=True):
    """(L[k], present[k]) of one batch, per-sample loss = (weighted) eps-MSE + vb.

    separate_graphs (PCGrad / Nash): one forward per cluster on its B/k samples (a stratified batch is grouped by
    cluster) with DDP's gradient sync off, and L as a list of k scalars that share no graph, so the k backwards
    of per_cluster_grads cost one batch backward in total, not k of them (a backward from one entry of a stacked
    tensor would also run, with zero gradients, through every other cluster's graph)."""
    chunks = clusters.k if separate_graphs else 1
    weights = [None] * chunks if weight is None else weight.chunk(chunks)
    no_sync = model.no_sync() if separate_graphs and isinstance(model, DDP) else contextlib.nullcontext()
    with no_sync, autocast(x.device, bf16):
        per_chunk = [diffusion.training_losses(model, xc, tc, dict(y=yc), mse_weight=wc)["loss"]
                     for xc, yc, tc, wc in zip(x.chunk(chunks), y.chunk(chunks), t.chunk(chunks), weights)]
    if separate_graphs:  # chunk i is cluster i: L_i = its mean / k, as cluster_losses
        return [c.mean() / clusters.k for c in per_chunk], torch.ones(clusters.k, dtype=torch.bool, device=x.device)
    return clusters(per_chunk[0], t)


#################################################################################
#                      Training loop (DiT train.py conventions)                 #
#################################################################################

def measure_affinity(models, diffusion, x, y, args):
    """Affinity averaged over models (an iterable: checkpoints, loaded one at a time), measured at
    --affinity-timesteps timesteps and interpolated to (T, T)."""
    T = diffusion.num_timesteps
    ts = affinity_timesteps(args.affinity_timesteps, T)
    measured = np.mean([diffusion_affinity(m, diffusion, x, y, ts, args.affinity_micro_batch, args.proj_dim or None,
                                           args.seed) for m in models], axis=0)
    return interpolate_affinity(measured, ts, T)


def choose_intervals(args, diffusion, model, dataset, run, device):
    """The intervals of --clustering (Sec. 4.1); the other objectives' are logged next to them. The gradient
    objective reads --affinity; on the synthetic set without it, rank 0 measures the initial model's affinity
    (a demo stand-in for the paper's average over checkpoints) and saves it with its heat-map in the run folder."""
    T, abar = diffusion.num_timesteps, diffusion.alphas_cumprod
    affinity = None
    if args.affinity:
        if not os.path.isfile(args.affinity):
            fail(f"--affinity '{args.affinity}' does not exist; write one with --task-affinity CKPT [CKPT ...]")
        affinity = np.load(args.affinity)
        if affinity.shape != (T, T):
            fail(f"--affinity '{args.affinity}' is {affinity.shape}, expected ({T}, {T})")
    if affinity is None and args.clustering == "gradient" and args.data != "synthetic":
        fail("--clustering gradient needs --affinity FILE.npy: measure it on trained checkpoints with "
             "--task-affinity CKPT [CKPT ...]")
    if affinity is None and args.clustering == "gradient" and run.rank == 0:
        x, y = fixed_batch(dataset, args.affinity_images, device, args.latent)
        affinity = measure_affinity([model], diffusion, x, y, args)
        save_affinity(affinity, os.path.join(run.dir, "affinity.npy"), os.path.join(run.dir, "affinity.png"))
        run.log(f"task affinity of the initial model ({args.affinity_timesteps} timesteps, {len(x)} images): "
                f"{os.path.join(run.dir, 'affinity.png')}")
    chosen = [None]
    for kind in CLUSTERINGS if run.rank == 0 else ():
        if kind != "gradient" or affinity is not None:
            intervals = clustering_intervals(kind, args.k, abar, affinity, args.size_bounds == "paper", args.log_snr)
            run.log(f"{kind} clustering, k={args.k}: {format_intervals(intervals)}")
            chosen[0] = intervals if kind == args.clustering else chosen[0]
    if dist.is_initialized():  # rank 0's choice for all (the affinity is only measured there)
        dist.broadcast_object_list(chosen, src=0)
    return chosen[0]


# The settings that define a run: `--resume` refuses a checkpoint trained with other values of any of them.
DEFINING = ("model", "clustering", "k", "size_bounds", "log_snr", "affinity", "mtl", "loss_weight", "min_snr_gamma",
            "p2_gamma", "t_range", "noise_schedule", "data", "latent", "vae_scale", "image_size", "num_classes",
            "unconditional", "global_batch_size")


def run_name(args):
    """Folder name with what tells runs apart (clustering, k, method, loss weight, schedule, specialist range)."""
    span = f"-t{args.t_range[0]}-{args.t_range[1]}" if args.t_range else ""
    return (f"ant-{args.model}-{args.clustering}-k{args.k}-{args.mtl}-{args.loss_weight}-"
            f"{args.noise_schedule or 'cosine'}{span}")


def train(args):
    data = create_dataset(args.data, args.image_size, args.num_classes, args.latent)  # fails before any run folder
    run, device, batch_size, dataset = start_training(args, run_name(args), "ant_clustering", DEFINING, data)
    (channels, size, _), num_classes, k = args.input_shape, args.num_classes, args.k
    if args.mtl != "none" and batch_size % k:
        fail(f"the per-rank batch {batch_size} is not divisible by --k {k} (stratified batches draw B/k timesteps "
             f"per cluster); use a --global-batch-size that is a multiple of {k * run.world_size}")
    torch.manual_seed(args.seed)  # same initial weights on every rank and in every (re)run
    model = create_model(args.model, size, channels, num_classes, learn_sigma=True).to(device)
    ema = make_ema(model)
    diffusion = create_diffusion("", args.noise_schedule, learn_sigma=True)
    T = diffusion.num_timesteps
    t_lo, t_hi = args.t_range or (0, T - 1)
    intervals = (uniform_intervals(T, k) if run.resume_path  # replaced by the checkpoint's: no new affinity
                 else choose_intervals(args, diffusion, model, dataset, run, device))
    clusters = ClusterLoss(intervals, T).to(device)
    state = mtl_state(args.mtl, k, args.seed, device) if args.mtl != "none" else {}
    groups = [{"params": model.parameters()}] + ([state["uw"].param_group(lr=args.uw_lr)] if "uw" in state else [])
    opt = adamw(groups, lr=args.lr)
    step = resume_training(run, model, ema, opt, clusters=clusters, uw=state.get("uw"), nash=state.get("nash"))
    ddp = training_module(wrap_ddp(model, device, run.world_size), args)
    loader = infinite_loader(dataset, batch_size, run.rank, run.world_size, args.seed, step, args.num_workers, device)
    run.log(f"{args.model}, {args.clustering} clustering k={k}: {format_intervals(clusters.interval_list)}; "
            f"mtl={args.mtl}, loss weight={args.loss_weight}, timesteps [{t_lo}, {t_hi}]; "
            f"{sum(p.numel() for p in model.parameters()):,} parameters; {len(dataset):,} training items; "
            f"world size {run.world_size}, batch {batch_size}/rank; results in {run.dir}")
    sample = sample_grid_writer(sampling_module(ema, args), args, device)
    params = list(model.parameters())
    # summed on-device, synced only when logging: loss, steps, per-cluster mean losses, per-cluster presence
    running = torch.zeros(2 + 2 * k, device=device)
    weights = torch.ones(k)

    def metrics():
        total = all_reduce_mean(running).tolist()
        running.zero_()
        row = {"loss": total[0] / total[1]}
        row.update({f"loss_c{i}": total[2 + i] / total[2 + k + i] for i in range(k) if total[2 + k + i] > 0})
        if args.mtl != "none":  # Fig. 3 / 7: the method's weight of every cluster over training
            row.update({f"weight_c{i}": w for i, w in enumerate(weights.tolist())})
        return row

    def checkpoint():
        extra = {name: state[name].state_dict() for name in ("uw", "nash") if name in state}
        return dict(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                    clusters=clusters.state_dict(), **extra)

    model.train()
    bar = tqdm(total=args.steps, initial=step, disable=run.rank != 0, desc="train", dynamic_ncols=True)
    while step < args.steps:
        x, y = training_batch(loader, model, args, run.rank, step, device)
        if args.mtl == "none":  # vanilla, or an interval specialist (--t-range): t uniform on [t_lo, t_hi]
            t = torch.randint(t_lo, t_hi + 1, (batch_size,), device=device)
        else:
            t = clusters.sample_timesteps(batch_size)
        weight = mse_weight(args.loss_weight, diffusion, t, args.min_snr_gamma, 1.0, args.p2_gamma)
        loss_fn = functools.partial(batch_cluster_losses, diffusion, ddp, x, y, t, clusters, weight=weight,
                                    bf16=args.bf16)
        counts = cluster_counts(clusters.cluster_of[t], k)
        opt.zero_grad(set_to_none=True)
        if args.mtl == "none":
            losses, present = loss_fn(False)
            (losses * (k * counts / batch_size)).sum().backward()  # sum_i (n_i / B) * mean_i = the batch mean, Eq. 2
            losses = losses.detach()
        else:
            losses, weights = mtl_backward(args.mtl, loss_fn, params, state, step)
        opt.step()
        update_ema(ema, model, args.ema_decay)  # in every branch (upstream's PCGrad branch forgets it)
        cluster_means = losses * k  # cluster_losses divides by k
        running += torch.cat([(cluster_means * counts).sum()[None] / batch_size, torch.ones(1, device=device),
                              cluster_means, (counts > 0).float()])
        step += 1
        bar.update(1)
        if end_of_step(run, args, step, device, metrics, checkpoint, sample):
            break
    finish_training(run, model, bar)
    cleanup_distributed()
    return run.dir


#################################################################################
#             Sampler: negative transfer gap (Sec. 3.2, Eq. 3), .npz            #
#################################################################################

def refuse_routing(model, targs, masks):
    """model_from_checkpoint's `prepare`: ANT trains plain DiTs, so weights with DTR routing masks (other than
    all-ones, i.e. vanilla) belong to dtr.py."""
    if masks is not None and not bool((masks == 1).all()):
        fail("this DTR checkpoint routes channels per timestep: sample it with dtr.py --sample-only --ckpt ...")


class IntervalSwitch(nn.Module):
    """eps-model of the negative-transfer-gap experiment: the interval specialist denoises x_t for t in [t1, t2]
    (training timesteps, 0-indexed, inclusive: the paper's D[1, 200] is [0, 199]), the generalist elsewhere."""

    def __init__(self, generalist, specialist, t1, t2):
        super().__init__()
        self.generalist, self.specialist, self.t1, self.t2 = generalist, specialist, t1, t2
        self.null_class = generalist.null_class  # classifier-free guidance reads it

    def forward(self, x, t, y):
        inside = (t >= self.t1) & (t <= self.t2)
        if bool(inside.all()):
            return self.specialist(x, t, y)
        if not bool(inside.any()):
            return self.generalist(x, t, y)
        return torch.where(inside.view(-1, *[1] * (x.ndim - 1)), self.specialist(x, t, y), self.generalist(x, t, y))


def negative_transfer_gap(args):
    """Eq. (3): sample the generalist and the generalist with the specialist inside [t1, t2] from the same noise
    and labels (.npz each); with --ref and --inception-weights also print NTG = FID(switched) - FID(generalist)."""
    rank, world_size, device = init_distributed()
    generalist, targs, step = model_from_checkpoint(args.ckpt, device, args, "ant_clustering", refuse_routing)
    specialist, sargs, _ = model_from_checkpoint(args.specialist, device, args, "ant_clustering", refuse_routing)
    for key in ("input_shape", "num_classes", "noise_schedule", "latent"):
        if getattr(targs, key) != getattr(sargs, key):
            fail(f"--specialist was trained with {key}={getattr(sargs, key)}, the generalist with "
                 f"{getattr(targs, key)}; both must share data and noise schedule")
    t1, t2 = args.t_range
    switched = IntervalSwitch(generalist, specialist, t1, t2)
    paths = [sample_checkpoint(args, model, targs, args.ckpt, step, rank, world_size, device, tag)
             for model, tag in ((generalist, ""), (switched, f"-ntg{t1}-{t2}"))]
    if rank == 0 and args.ref:
        from eval.fid import compute_statistics, frechet_distance
        from eval.inception import FIDInception
        if not args.inception_weights:
            fail("--ref needs --inception-weights PATH (pt_inception-2015-12-05-6726825d.pth)")
        net = FIDInception(args.inception_weights)
        ref = compute_statistics(args.ref, net, device=device)
        fid = [frechet_distance(*compute_statistics(p, net, device=device), *ref) for p in paths]
        print(f"FID generalist {fid[0]:.3f}, with the specialist on [{t1}, {t2}] {fid[1]:.3f}: "
              f"NTG = {fid[1] - fid[0]:+.3f} (negative: D[{t1}, {t2}] suffers negative transfer)")
    cleanup_distributed()
    return paths


#################################################################################
#                                     main                                      #
#################################################################################

# Real data: upstream's DiT-S run (T = 1000, cosine, learn_sigma, k = 5, EMA 0.9999, cfg 1.5, batch 50, 800K iters);
# --data synthetic: a CPU demo that measures the initial model's affinity and clusters by gradient.
PAPER = dict(steps=800_000, global_batch_size=50, lr=1e-4, ema_decay=0.9999, num_workers=4, log_every=100,
             ckpt_every=50_000, sample_every=10_000, image_size=256, num_sampling_steps=250, clustering="timestep",
             affinity_timesteps=100, affinity_images=1000, proj_dim=4096)
DEMO = dict(steps=2000, global_batch_size=30, lr=2e-3, ema_decay=0.99, num_workers=0, log_every=100,
            ckpt_every=2000, sample_every=2000, image_size=16, num_sampling_steps=50, clustering="gradient",
            affinity_timesteps=20, affinity_images=64, proj_dim=0)  # dtr.py's demo; batch divisible by k = 5


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_model_data_args(p)
    p.add_argument("--clustering", choices=CLUSTERINGS, default=None,
                   help="interval clustering objective (Sec. 4.1); default gradient on synthetic, else timestep")
    p.add_argument("--k", type=int, default=5, help="number of timestep clusters")
    p.add_argument("--size-bounds", choices=["paper", "none"], default="paper",
                   help="interval sizes in [T/2k, 2T/k] (App. G) or unbounded")
    p.add_argument("--log-snr", action="store_true", help="SNR objective on log-SNR instead of raw SNR")
    p.add_argument("--affinity", default=None, help="(T, T) task-affinity .npy for --clustering gradient")
    p.add_argument("--task-affinity", nargs="+", metavar="CKPT", default=None,
                   help="measure the task affinity averaged over these checkpoints (Fig. 1), print the 3 clusterings")
    p.add_argument("--affinity-timesteps", type=int, default=None, help="timesteps measured (interpolated to T)")
    p.add_argument("--affinity-images", type=int, default=None, help="training images per gradient (paper: 1000)")
    p.add_argument("--affinity-micro-batch", type=int, default=64)
    p.add_argument("--proj-dim", type=int, default=None,
                   help="random projection of the gradients (JL; default 4096); 0 = exact (small models)")
    p.add_argument("--mtl", choices=MTL_METHODS + ("none",), default="uw", help="MTL method over the clusters")
    p.add_argument("--uw-lr", type=float, default=0.025, help="lr of the UW log-variances (upstream)")
    p.add_argument("--loss-weight", choices=["none", "min-snr", "p2"], default="none")
    p.add_argument("--min-snr-gamma", type=float, default=5.0)
    p.add_argument("--p2-gamma", type=float, default=1.0, help="P2 exponent (paper: 0.5 or 1), k = 1")
    p.add_argument("--t-range", type=int, nargs=2, metavar=("T1", "T2"), default=None,
                   help="train an interval specialist on D[T1, T2] (0-indexed, inclusive; needs --mtl none); "
                        "with --ntg, the interval where the specialist samples")
    add_sampling_args(p, cfg_channels="3")
    p.add_argument("--ntg", action="store_true", help="negative transfer gap: sample --ckpt with --specialist")
    p.add_argument("--specialist", default=None, help="interval-specialist checkpoint for --ntg")
    p.add_argument("--ref", default=None, help="reference images/statistics .npz: --ntg then prints FIDs and NTG")
    p.add_argument("--inception-weights", default=None, help="FID Inception weights for --ref")
    add_run_args(p)
    add_compare_args(p)
    args = finish_args(p, p.parse_args(argv), DEMO, PAPER)
    args.compare = comparison_requested(args, argv) and not (args.sample_only or args.ntg or args.task_affinity)
    if args.compare and (args.mtl == "none" or args.t_range):
        p.error("--compare trains vanilla beside an MTL method: pick --mtl uw|pcgrad|nash|ls|rlw, no --t-range")
    if args.t_range is not None:
        t1, t2 = args.t_range
        if not 0 <= t1 <= t2 <= 999:
            p.error(f"--t-range {t1} {t2}: need 0 <= T1 <= T2 <= 999 (0-indexed training timesteps)")
        if args.mtl != "none" and not args.ntg:
            p.error("--t-range trains an interval specialist with the plain loss: add --mtl none")
    if args.ntg and not (args.ckpt and args.specialist and args.t_range):
        p.error("--ntg needs --ckpt GENERALIST --specialist SPECIALIST --t-range T1 T2")
    if args.sample_only and not args.ckpt:
        p.error("--sample-only needs --ckpt PATH")
    if args.k < 1:
        p.error(f"--k must be >= 1, got {args.k}")
    return args


def affinity_analysis(args):
    """Fig. 1 for a run: task affinity averaged over its checkpoints' training weights (App. B: every 10K iterations,
    1000 training images), saved as affinity.npy / affinity.png next to the checkpoints; prints the 3 clusterings."""
    _, _, device = init_distributed()
    targs = argparse.Namespace(**load_checkpoint(args.task_affinity[0])["args"])
    dataset, *_ = create_dataset(targs.data, targs.image_size, targs.num_classes, targs.latent)
    x, y = fixed_batch(dataset, args.affinity_images, device, targs.latent)
    diffusion = create_diffusion("", targs.noise_schedule, learn_sigma=True)

    def training_weights(path):  # of each checkpoint, not its EMA: as upstream task_affinity_score.py
        model = create_model(targs.model, targs.input_shape[1], targs.input_shape[0], targs.num_classes)
        load_model_state(model, load_checkpoint(path)["model"], path)
        return model.to(device)

    affinity = measure_affinity(map(training_weights, args.task_affinity), diffusion, x, y, args)
    out = run_dir_of(args.task_affinity[0])
    save_affinity(affinity, os.path.join(out, "affinity.npy"), os.path.join(out, "affinity.png"))
    print(f"task affinity over {len(args.task_affinity)} checkpoint(s), {len(x)} images: "
          f"{os.path.join(out, 'affinity.npy')}")
    for kind in CLUSTERINGS:
        intervals = clustering_intervals(kind, args.k, diffusion.alphas_cumprod, affinity, args.size_bounds == "paper",
                                         args.log_snr)
        print(f"{kind} clustering, k={args.k}: {format_intervals(intervals)}")
    return affinity


def compare(args):
    """The demo: this MTL method over the clusters and vanilla DiT (--mtl none) trained alike, their samples judged
    by the shape classifier (eval/demo_comparison.py); returns the comparison folder."""
    variants = [(f"ANT-{args.mtl.upper()}", dict(mtl=args.mtl)), ("vanilla", dict(mtl="none"))]
    return run_comparison(train, args, variants, "ant_clustering", refuse_routing, setting="mtl")


@one_line_errors
def main(argv=None):
    args = parse_args(argv)
    if args.task_affinity:
        return affinity_analysis(args)
    if args.ntg:
        return negative_transfer_gap(args)
    if args.sample_only:
        return sample_main(args, "ant_clustering", refuse_routing)
    return compare(args) if args.compare else train(args)


if __name__ == "__main__":
    main()
