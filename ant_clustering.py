"""ANT: Go et al., "Addressing Negative Transfer in Diffusion Models" (NeurIPS 2023).

Diffusion training is multi-task learning over the T denoising tasks. This file holds the task affinity score
(Sec. 3.2: cosine similarity of per-timestep loss gradients, through a fixed random projection), interval
clustering of the timesteps into k contiguous task clusters by exact dynamic programming (Sec. 4.1, App. G) with
the timestep / SNR / affinity costs, stratified batch construction, and the MTL methods applied to the k cluster
losses (Sec. 4.2): uncertainty weighting, PCGrad, Nash-MTL, RLW / LS, and the Min-SNR / P2 loss-weight baselines.
Where the paper text lost Section 4, /work/shared/SPEC.md ("ANT") is followed; upstream is gohyojun15/ANT_diffusion.
"""
import math
import os

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from scipy.optimize import minimize

# Loss-weight baselines (Sec. 5.2), re-exported for the training loop: Min-SNR-gamma weights the eps-MSE term only
# (gamma = 5), P2 is 1 / (k + SNR)^gamma with k = 1, gamma in {0.5, 1} (SPEC "ANT").
from common.diffusion import min_snr_weight, p2_weight, snr  # noqa: F401


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


def task_affinity(loss_fn, params, timesteps, num_batches, proj_dim=4096, seed=0, max_block_elems=2**24):
    """Task affinity A[i, j] = cos(grad L_{t_i}, grad L_{t_j}) averaged over batches (Sec. 3.2, App. B).

    loss_fn(t, batch_index) returns the scalar loss of timestep t on that batch (the caller owns data, model,
    diffusion; the paper's protocol: one "batch" per checkpoint, 1000 images each). proj_dim=None uses the exact
    flattened gradients (small models only; upstream keeps T full gradients, ~130 GB for DiT-S). Each projection
    regenerates R (D x proj_dim draws), so for big models pass a timestep subsample and use interpolate_affinity.
    """
    params = [p for p in params]
    timesteps = [int(t) for t in timesteps]
    if not params:
        raise ValueError("task_affinity needs at least one parameter; pass model.parameters()")
    if not timesteps:
        raise ValueError("task_affinity needs at least one timestep; pass e.g. range(0, 1000, 10)")
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    if proj_dim is not None and proj_dim < 1:
        raise ValueError(f"proj_dim must be a positive int or None (exact gradients), got {proj_dim}")
    # Johnson-Lindenstrauss: for a Gaussian R with N(0, 1/m) entries, <R^T g_i, R^T g_j> preserves every pairwise
    # inner product (hence cosine) up to O(1/sqrt(m)) relative error, whatever the number of parameters D, so
    # m = 4096 numbers per timestep replace the D-dim gradient. R must be the same for all timesteps and batches.
    affinity = torch.zeros(len(timesteps), len(timesteps), dtype=torch.float64)
    for batch_index in range(num_batches):
        vectors = []
        for t in timesteps:
            loss = loss_fn(t, batch_index)
            if not torch.is_tensor(loss) or loss.numel() != 1:
                raise ValueError("loss_fn(t, batch_index) must return a scalar loss tensor (reduce with .mean())")
            grads = torch.autograd.grad(loss, params, allow_unused=True)
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
    if affinity.shape != (len(timesteps), len(timesteps)):
        raise ValueError(f"affinity {affinity.shape} does not match {len(timesteps)} timesteps")
    if np.any(np.diff(timesteps) <= 0):
        raise ValueError("timesteps must be strictly increasing")
    grid = np.arange(num_timesteps, dtype=np.float64)
    along_s = np.stack([np.interp(grid, timesteps, row) for row in affinity])  # (n, T): [i, s] = A(t_i, s)
    return np.stack([np.interp(grid, timesteps, col) for col in along_s.T], axis=1)  # (T, T): [t, s] = A(t, s)


def save_affinity(affinity, path_npy, path_png, min_pixels=256):
    """Save the matrix (.npy) and a blue-white-red heat map (.png, -1 blue, 0 white, +1 red, row 0 at the top)."""
    affinity = np.asarray(affinity, dtype=np.float64)
    if affinity.ndim != 2:
        raise ValueError(f"affinity must be a 2-D matrix, got shape {affinity.shape}")
    for path in (path_npy, path_png):
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
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
    if affinity.ndim != 2 or affinity.shape[0] != affinity.shape[1]:
        raise ValueError(f"affinity must be a square (T, T) matrix, got {affinity.shape}; "
                         f"use interpolate_affinity for a timestep subsample")
    if not np.all(np.isfinite(affinity)):
        raise ValueError("affinity contains NaN/inf; recompute it or replace them (np.nan_to_num)")
    return _centre_cost(-affinity)


def paper_size_bounds(num_timesteps, k):
    """Paper's interval size bounds (m_I, M_I) = (T / 2k, 2T / k) (App. G)."""
    return num_timesteps // (2 * k), 2 * num_timesteps // k


def uniform_intervals(num_timesteps, k):
    """k equal intervals, as upstream `initialize_cluster("uniform")` (util/uw_util.py), inclusive ends."""
    if not 1 <= k <= num_timesteps:
        raise ValueError(f"k must be in 1..T={num_timesteps}, got {k}")
    return [(num_timesteps * i // k, num_timesteps * (i + 1) // k - 1) for i in range(k)]


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

def cluster_losses(per_sample_loss, cluster_ids, k):
    """(L[k], present[k]): L_i = mean of cluster i's per-sample losses / k; absent clusters give 0, present False.

    The 1/k lives here (upstream divides each cluster mean by k): with a stratified batch, sum_i L_i equals the
    plain batch mean, so LS reproduces vanilla training and every method below sees the same loss scale.
    """
    if per_sample_loss.shape != cluster_ids.shape or per_sample_loss.ndim != 1:
        raise ValueError(f"per_sample_loss {tuple(per_sample_loss.shape)} and cluster_ids "
                         f"{tuple(cluster_ids.shape)} must both be (B,); reduce the loss per sample first")
    sums = per_sample_loss.new_zeros(k).index_add(0, cluster_ids, per_sample_loss)
    counts = torch.bincount(cluster_ids, minlength=k)
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
    squared_norms = (grads * grads).sum(dim=1) + 1e-8  # 1e-8 keeps a zero gradient from dividing by 0
    projected = grads.clone()
    for i in range(k):
        # j runs over all clusters as in the PCGrad / LibMTL / upstream code; j == i only matters if g_i turned
        # against itself after earlier projections.
        for j in torch.randperm(k, generator=generator).tolist():
            dot = torch.dot(projected[i], grads[j])
            if dot < 0:
                projected[i] -= dot / squared_norms[j] * grads[j]
    return projected.sum(dim=0)


class NashMTL:
    """Nash-MTL (Navon et al. 2022) loss weights alpha with alpha_i (G G^T alpha)_i = 1, refreshed every 25 steps.

    Training loss: sum_i alpha_i L_i, gradient norm clipped to max_grad_norm (the training loop clips).
    """

    max_grad_norm = 1.0

    def __init__(self, k, update_every=25):
        self.k = k
        self.update_every = update_every  # App. C: alpha updated every 25 iterations
        self.alpha = None  # torch tensor, reused between updates
        self._normalised_alpha = np.ones(k)  # warm start of the solver

    def solve_weights(self, gtg):
        """alpha = argmin_{a >= 1e-8} 0.5 a^T (G G^T) a - sum_i log a_i, whose stationarity is a_i (G G^T a)_i = 1."""
        gtg = np.asarray(gtg, dtype=np.float64)
        if gtg.shape != (self.k, self.k):
            raise ValueError(f"gtg must be the ({self.k}, {self.k}) Gram matrix G G^T, got {gtg.shape}")
        alpha = np.zeros(self.k)
        active = np.diag(gtg) > 0  # a cluster with zero gradient (absent) cannot satisfy the condition: weight 0
        norm = np.linalg.norm(gtg[np.ix_(active, active)])
        if not active.any() or not np.isfinite(norm):
            return alpha
        # Normalise by the Frobenius norm for numerics (upstream / LibMTL); a solves the normalised problem, so
        # alpha = a / sqrt(norm) solves the original one: alpha_i (G G^T alpha)_i = a_i (gtg/norm a)_i = 1.
        gram = gtg[np.ix_(active, active)] / norm
        objective = lambda a: (0.5 * a @ gram @ a - np.log(a).sum(), gram @ a - 1.0 / a)
        result = minimize(objective, self._normalised_alpha[active], jac=True, method="L-BFGS-B",
                          bounds=[(1e-8, None)] * int(active.sum()),
                          options={"maxiter": 1000, "ftol": 1e-15, "gtol": 1e-10})
        if np.all(np.isfinite(result.x)):
            self._normalised_alpha[active] = result.x
        alpha[active] = self._normalised_alpha[active] / math.sqrt(norm)
        return alpha

    def step_weights(self, step, grads_fn):
        """alpha for this step: grads_fn() -> [k, D] cluster gradients is called only every update_every steps."""
        if self.alpha is None or step % self.update_every == 0:
            grads = grads_fn().detach()
            gtg = (grads.double() @ grads.double().T).cpu().numpy()
            self.alpha = torch.tensor(self.solve_weights(gtg), dtype=torch.float32, device=grads.device)
        return self.alpha


def rlw_weights(k, generator=None, device="cpu"):
    """Random loss weights: softmax of k standard normals, redrawn every step (LibMTL RLW, dist='Normal')."""
    draw_device = generator.device if generator is not None else device
    return torch.softmax(torch.randn(k, generator=generator, device=draw_device), dim=0).to(device)


def ls_weights(k, device="cpu"):
    """Linear scalarisation: equal weights 1 (LibMTL EW), i.e. the plain batch mean with cluster_losses' 1/k."""
    return torch.ones(k, device=device)


def per_cluster_grads(losses, params, present_mask=None):
    """[k, D] flattened gradients of each cluster loss w.r.t. params (one backward per present cluster)."""
    params = [p for p in params]
    rows = []
    for i in range(losses.shape[0]):
        if (present_mask is not None and not bool(present_mask[i])) or not losses[i].requires_grad:
            rows.append(torch.zeros(sum(p.numel() for p in params), device=params[0].device))
            continue
        grads = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([torch.zeros(p.numel(), device=p.device) if g is None else g.reshape(-1).float()
                               for g, p in zip(grads, params)]))
    return torch.stack(rows)


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


if __name__ == "__main__":
    print("training loop not wired yet")
    raise SystemExit(2)
