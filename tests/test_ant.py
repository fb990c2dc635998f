"""Tests for ant_clustering.py sections 1-3: first-principles checks of the DP, cost builders and MTL methods."""
import itertools
import math
import time

import numpy as np
import pytest
import torch
from PIL import Image

import ant_clustering as ant


def cosine_alphas_cumprod(T=1000, s=0.008):
    """Nichol & Dhariwal cosine schedule written out here, independent of common.diffusion."""
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    betas = np.array([min(1 - f(i + 1) / f(i), 0.999) for i in range(T)])
    return np.cumprod(1 - betas)


def brute_force(cost, k, lo=1, hi=None):
    """Minimum total cost over all compositions of T into k interval sizes in [lo, hi]."""
    T = cost.shape[0]
    hi = T if hi is None else hi
    best = math.inf
    for cuts in itertools.combinations(range(1, T), k - 1):
        bounds = (0,) + cuts + (T,)
        sizes = [b - a for a, b in zip(bounds, bounds[1:])]
        if all(lo <= n <= hi for n in sizes):
            best = min(best, sum(cost[a, b - 1] for a, b in zip(bounds, bounds[1:])))
    return best


def partition_cost(cost, intervals):
    return sum(cost[l, r] for l, r in intervals)


def assert_partition(intervals, T, k, lo=1, hi=None):
    hi = T if hi is None else hi
    assert len(intervals) == k and intervals[0][0] == 0 and intervals[-1][1] == T - 1
    for (l, r), (l2, _) in zip(intervals, intervals[1:]):
        assert l2 == r + 1
    assert all(lo <= r - l + 1 <= hi for l, r in intervals)


#################################################################################
#                               Interval clustering                             #
#################################################################################

def random_upper_cost(T, rng):
    cost = rng.uniform(0, 10, size=(T, T))
    return np.where(np.triu(np.ones((T, T), bool)), cost, np.nan)  # lower triangle must be ignored


@pytest.mark.parametrize("T", [7, 9])
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("bounds", [(None, None), (2, None), (None, 5), (2, 5)])
def test_dp_matches_brute_force_random_costs(T, k, bounds):
    rng = np.random.default_rng(T * 10 + k)
    lo, hi = bounds
    for _ in range(5):
        cost = random_upper_cost(T, rng)
        intervals = ant.interval_clustering(cost, k, min_size=lo, max_size=hi)
        assert_partition(intervals, T, k, lo or 1, hi)
        assert partition_cost(cost, intervals) == pytest.approx(brute_force(cost, k, lo or 1, hi), abs=1e-9)


def direct_cost(per_step_value):
    """C[l, r] = sum_t |v_t - v_c| by explicit loops (c = (l + r) // 2)."""
    T = len(per_step_value)
    cost = np.full((T, T), np.inf)
    for l in range(T):
        for r in range(l, T):
            c = (l + r) // 2
            cost[l, r] = sum(abs(per_step_value[t] - per_step_value[c]) for t in range(l, r + 1))
    return cost


@pytest.mark.parametrize("T", [7, 9])
def test_cost_builders_match_loops_and_dp_matches_brute_force(T):
    rng = np.random.default_rng(T)
    abar = np.sort(rng.uniform(0.01, 0.99, size=T))[::-1].copy()
    snr = abar / (1 - abar)
    affinity = rng.uniform(-1, 1, size=(T, T))
    affinity = (affinity + affinity.T) / 2
    affinity_loop = np.full((T, T), np.inf)
    for l in range(T):
        for r in range(l, T):
            affinity_loop[l, r] = -sum(affinity[(l + r) // 2, t] for t in range(l, r + 1))
    cases = [
        (ant.timestep_cost(T), direct_cost(np.arange(T))),
        (ant.snr_cost(abar), direct_cost(snr)),
        (ant.snr_cost(torch.tensor(abar), log=True), direct_cost(np.log(snr))),
        (ant.affinity_cost(affinity), affinity_loop),
    ]
    upper = np.triu(np.ones((T, T), bool))
    for built, expected in cases:
        np.testing.assert_allclose(built[upper], expected[upper], rtol=1e-10, atol=1e-10)
        for k, (lo, hi) in itertools.product([2, 3], [(None, None), (2, None), (2, 5)]):
            intervals = ant.interval_clustering(built, k, lo, hi)
            assert_partition(intervals, T, k, lo or 1, hi)
            assert partition_cost(built, intervals) == pytest.approx(brute_force(built, k, lo or 1, hi), abs=1e-9)


def test_timestep_cost_gives_uniform_intervals_and_runs_fast():
    T = 1000
    cost = ant.timestep_cost(T)
    for k in (3, 5, 7, 8):
        start = time.perf_counter()
        intervals = ant.interval_clustering(cost, k)
        elapsed = time.perf_counter() - start
        assert all(abs((r - l + 1) - T / k) <= 1 for l, r in intervals)
        assert elapsed < 5.0  # measured ~0.15 s on 2 cores; a Python O(k T^2) loop would take minutes
    assert ant.interval_clustering(cost, 8) == ant.uniform_intervals(T, 8)


def test_bounds_respected_at_T1000():
    T = 1000
    costs = [ant.snr_cost(cosine_alphas_cumprod(T)),
             ant.affinity_cost(np.exp(-np.abs(np.subtract.outer(np.arange(T), np.arange(T))) / 50.0))]
    for cost, k in itertools.product(costs, [5, 8]):
        lo, hi = ant.paper_size_bounds(T, k)
        assert (lo, hi) == (T // (2 * k), 2 * T // k)
        intervals = ant.interval_clustering(cost, k, lo, hi)
        assert_partition(intervals, T, k, lo, hi)


def test_raw_snr_cost_degenerates_without_bounds():
    cost = ant.snr_cost(cosine_alphas_cumprod(1000))
    intervals = ant.interval_clustering(cost, 5)
    # SPEC quotes [0],[1,3],[4,11],[12,36],[37,999]; the exact optimum of its own cost (c = (l + r) // 2) is one
    # step earlier on the last three boundaries, and strictly cheaper (checked by exhaustive search offline).
    assert intervals == [(0, 0), (1, 3), (4, 10), (11, 35), (36, 999)]
    spec_quote = [(0, 0), (1, 3), (4, 11), (12, 36), (37, 999)]
    assert partition_cost(cost, intervals) < partition_cost(cost, spec_quote)


def test_infeasible_bounds_raise():
    cost = ant.timestep_cost(100)
    with pytest.raises(ValueError, match="k\\*min_size <= T <= k\\*max_size"):
        ant.interval_clustering(cost, 4, max_size=24)  # 4 * 24 < 100
    with pytest.raises(ValueError, match="k\\*min_size"):
        ant.interval_clustering(cost, 4, min_size=26)  # 4 * 26 > 100
    with pytest.raises(ValueError, match="k must be"):
        ant.interval_clustering(cost, 101)
    with pytest.raises(ValueError, match="square"):
        ant.interval_clustering(np.zeros((3, 4)), 2)


#################################################################################
#                           Cluster index and batches                           #
#################################################################################

def test_stratified_timesteps_lie_in_their_clusters():
    T, k, B = 1000, 5, 40
    intervals = ant.interval_clustering(ant.snr_cost(cosine_alphas_cumprod(T)), k, *ant.paper_size_bounds(T, k))
    index = ant.interval_index(intervals, T)
    assert index.dtype == torch.long and index.shape == (T,)
    assert [int(index[l]) for l, _ in intervals] == list(range(k)) == [int(index[r]) for _, r in intervals]
    t = ant.stratified_timesteps(intervals, B, torch.Generator().manual_seed(0), "cpu")
    assert t.shape == (B,) and t.dtype == torch.long
    assert torch.equal(index[t], torch.arange(k).repeat_interleave(B // k))
    with pytest.raises(ValueError, match="divisible"):
        ant.stratified_timesteps(intervals, 42, torch.Generator(), "cpu")
    with pytest.raises(ValueError, match="contiguous"):
        ant.interval_index([(0, 10), (12, 999)], T)


def test_uniform_intervals_match_upstream():
    # upstream initialize_cluster: [int(T/k*i), int(T/k*(i+1))) half-open
    T, k = 1000, 3
    expected = [(int(T / k * i), int(T / k * (i + 1)) - 1) for i in range(k)]
    assert ant.uniform_intervals(T, k) == expected


#################################################################################
#                                 MTL methods                                   #
#################################################################################

def test_cluster_losses_hand_made():
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    losses, present = ant.cluster_losses(loss, torch.tensor([0, 0, 2, 2]), 3)
    torch.testing.assert_close(losses, torch.tensor([1.5, 0.0, 3.5]) / 3)
    assert present.tolist() == [True, False, True]
    losses.sum().backward()
    torch.testing.assert_close(loss.grad, torch.full((4,), 1 / 6))
    # stratified batch: sum of cluster losses == plain batch mean
    per_sample = torch.rand(12)
    assert ant.cluster_losses(per_sample, torch.arange(3).repeat_interleave(4), 3)[0].sum().item() == \
        pytest.approx(per_sample.mean().item())


def test_uncertainty_weighting_converges_to_log_loss():
    target = torch.tensor([0.1, 1.0, 10.0])
    uw = ant.UncertaintyWeighting(3)
    opt = torch.optim.Adam([uw.param_group(lr=0.05)])
    for _ in range(400):
        opt.zero_grad()
        uw(target).backward()  # d/ds 0.5 (e^-s L + s) = 0  <=>  s = log L
        opt.step()
    torch.testing.assert_close(uw.log_vars.detach(), target.log(), atol=1e-3, rtol=0)
    torch.testing.assert_close(uw.weights(), 1 / target, rtol=1e-3, atol=0)
    group = ant.UncertaintyWeighting(2).param_group()
    assert group["lr"] == 0.025 and group["weight_decay"] == 0.0
    # absent clusters contribute neither loss nor gradient
    uw = ant.UncertaintyWeighting(2)
    out = uw(torch.tensor([2.0, 5.0]), torch.tensor([True, False]))
    assert out.item() == pytest.approx(1.0)
    out.backward()
    assert uw.log_vars.grad[1].item() == 0.0


def test_pcgrad_conflicting_and_non_conflicting():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    # closed form: g1 - (g1.g2)/|g2|^2 g2 = (0.5, 0.5); g2 - (g2.g1)/|g1|^2 g1 = (0, 1)
    for seed in range(3):
        out = ant.pcgrad(torch.stack([g1, g2]), torch.Generator().manual_seed(seed))
        torch.testing.assert_close(out, torch.tensor([0.5, 1.5]), atol=1e-6, rtol=0)
    # list-of-lists input (two "parameters" per cluster) gives the same flat result
    out = ant.pcgrad([[g1[:1], g1[1:]], [g2[:1], g2[1:]]], torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, torch.tensor([0.5, 1.5]), atol=1e-6, rtol=0)
    grads = torch.tensor([[1.0, 0.0, 2.0], [1.0, 1.0, 0.0], [0.0, 3.0, 1.0]])  # pairwise dots >= 0
    torch.testing.assert_close(ant.pcgrad(grads, torch.Generator()), grads.sum(0))


def test_nash_weights_satisfy_the_normalised_condition_at_ants_scale():
    G = np.random.default_rng(0).normal(size=(3, 10))
    gtg = G @ G.T
    ghat = gtg / np.linalg.norm(gtg)
    alpha = ant.NashMTL(3).solve_weights(gtg)
    assert np.all(alpha > 0)
    # ANT / nash-mtl: the condition holds on the Frobenius-normalised Gram, and alpha is used without rescaling
    np.testing.assert_allclose(alpha * (ghat @ alpha), np.ones(3), atol=1e-4)
    # so alpha does not depend on the gradients' scale, and the update sum_i alpha_i g_i scales with them
    np.testing.assert_allclose(ant.NashMTL(3).solve_weights(1e-6 * gtg), alpha, rtol=1e-5)
    # a zero-gradient (absent) cluster gets weight 0, the others still satisfy the condition
    G0 = np.vstack([G[:2], np.zeros((1, 10))])
    gtg0 = G0 @ G0.T
    alpha0 = ant.NashMTL(3).solve_weights(gtg0)
    assert alpha0[2] == 0
    np.testing.assert_allclose(alpha0[:2] * ((gtg0 / np.linalg.norm(gtg0)) @ alpha0)[:2], np.ones(2), atol=1e-4)


def test_nash_update_norm_is_sqrt_k_frobenius_as_ant():
    """Orthogonal gradients of norms n_i: Ghat = diag(n^2) / ||n^2||, so alpha_i = ||n^2||^(1/2) / n_i and the
    update sum_i alpha_i g_i has norm sqrt(k ||G G^T||_F); ANT's (2.2e-3 here) is far below the clip at 1, the
    scale-free weights' (sqrt(5) = 2.24) would always be clipped."""
    n = np.array([1e-3, 2e-3, 5e-4, 1e-3, 3e-3])
    G = np.diag(n)
    alpha = ant.NashMTL(5).solve_weights(G @ G.T)
    np.testing.assert_allclose(alpha, np.sqrt(np.linalg.norm(n ** 2)) / n, rtol=1e-4)
    update = alpha @ G
    np.testing.assert_allclose(np.linalg.norm(update), np.sqrt(5 * np.linalg.norm(G @ G.T)), rtol=1e-4)
    assert np.linalg.norm(update) < ant.NashMTL.max_grad_norm


def test_nash_opposite_gradients_stay_bounded():
    g = np.random.default_rng(1).normal(size=(1, 8))
    for G in (np.vstack([g, -g]), np.vstack([g, -g + 1e-9 * g[:, ::-1]]), np.vstack([g, -g, 2 * g])):
        gtg = G @ G.T
        alpha = ant.NashMTL(len(G)).solve_weights(gtg)
        assert np.all(np.isfinite(alpha)) and alpha.max() <= np.sqrt(len(G) / ant.NashMTL.ridge) * 1.01
        # the update never exceeds sqrt(k ||G G^T||_F), the bound of the well-conditioned case
        assert np.linalg.norm(alpha @ G) <= np.sqrt(len(G) * np.linalg.norm(gtg)) * (1 + 1e-6)


def test_nash_reuses_alpha_between_updates():
    nash = ant.NashMTL(2, update_every=25)
    calls = []

    def grads_fn():
        calls.append(1)
        return torch.randn(2, 5)

    for step in range(60):
        alpha = nash.step_weights(step, grads_fn)
        assert alpha.shape == (2,)
    assert len(calls) == 3  # steps 0, 25, 50
    assert ant.NashMTL.max_grad_norm == 1.0


def test_rlw_and_ls_weights():
    w = ant.rlw_weights(5, torch.Generator().manual_seed(0))
    assert w.shape == (5,) and torch.all(w > 0) and w.sum().item() == pytest.approx(1.0)
    assert not torch.equal(w, ant.rlw_weights(5, torch.Generator().manual_seed(1)))
    assert torch.equal(ant.ls_weights(3), torch.ones(3))


def test_per_cluster_grads_and_write_back():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    b = torch.nn.Parameter(torch.tensor(0.5))
    a = torch.tensor([[1.0, -1.0], [0.0, 3.0], [2.0, 2.0]])
    losses = a @ w + torch.tensor([1.0, 2.0, 0.0]) * b  # dL_i/dw = a_i, dL_i/db = c_i
    grads = ant.per_cluster_grads(losses, [w, b], present_mask=torch.tensor([True, True, False]))
    expected = torch.tensor([[1.0, -1.0, 1.0], [0.0, 3.0, 2.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(grads, expected)
    ant.write_flat_grad([w, b], torch.tensor([7.0, 8.0, 9.0]))
    assert w.grad.tolist() == [7.0, 8.0] and b.grad.shape == () and b.grad.item() == 9.0
    with pytest.raises(ValueError, match="expected"):
        ant.write_flat_grad([w, b], torch.zeros(4))


#################################################################################
#                                 Task affinity                                 #
#################################################################################

def toy_linear_problem():
    """Linear model y = W x + c; loss_t on batch b = 0.5 * |W x_b + c - y_{t,b}|^2 with a known gradient."""
    gen = torch.Generator().manual_seed(0)
    W = torch.nn.Parameter(torch.randn(3, 4, generator=gen))
    c = torch.nn.Parameter(torch.randn(3, generator=gen))
    unused = torch.nn.Parameter(torch.randn(2))  # never touched by the loss: grad None
    timesteps, num_batches = [0, 3, 7, 9], 2
    x = torch.randn(num_batches, 4, generator=gen)
    y = torch.randn(10, num_batches, 3, generator=gen)

    def loss_fn(t, batch_index):
        return 0.5 * ((W @ x[batch_index] + c - y[t, batch_index]) ** 2).sum()

    def expected():
        A = np.zeros((len(timesteps), len(timesteps)))
        for bi in range(num_batches):
            g = []
            for t in timesteps:
                residual = (W @ x[bi] + c - y[t, bi]).detach()
                g.append(torch.cat([torch.outer(residual, x[bi]).reshape(-1), residual, torch.zeros(2)]).numpy())
            g = np.array(g, dtype=np.float64)
            g /= np.linalg.norm(g, axis=1, keepdims=True)
            A += g @ g.T / num_batches
        return A

    return loss_fn, [W, c, unused], timesteps, num_batches, expected()


def test_task_affinity_exact_and_projected():
    loss_fn, params, timesteps, num_batches, expected = toy_linear_problem()
    exact = ant.task_affinity(loss_fn, params, timesteps, num_batches, proj_dim=None)
    np.testing.assert_allclose(exact, expected, atol=1e-5)
    assert not np.allclose(expected, 1.0)  # the toy timesteps really disagree
    # small blocks force several chunks per parameter tensor
    projected = ant.task_affinity(loss_fn, params, timesteps, num_batches, proj_dim=2048, max_block_elems=2048 * 5)
    np.testing.assert_allclose(projected, expected, atol=0.05)  # JL error ~ 1/sqrt(2048) = 0.02
    np.testing.assert_allclose(np.diag(projected), 1.0, atol=1e-6)
    again = ant.task_affinity(loss_fn, params, timesteps, num_batches, proj_dim=2048, max_block_elems=2048 * 5)
    np.testing.assert_array_equal(projected, again)  # fixed seeded projection
    other_seed = ant.task_affinity(loss_fn, params, timesteps, num_batches, proj_dim=2048, seed=1)
    assert not np.array_equal(projected, other_seed)
    np.testing.assert_allclose(other_seed, expected, atol=0.05)


def test_save_affinity_colours(tmp_path):
    A = np.array([[1.0, -1.0], [0.0, 1.0]])
    ant.save_affinity(A, str(tmp_path / "a" / "aff.npy"), str(tmp_path / "a" / "aff.png"), min_pixels=4)
    np.testing.assert_array_equal(np.load(tmp_path / "a" / "aff.npy"), A)
    img = np.asarray(Image.open(tmp_path / "a" / "aff.png"))
    assert img.shape == (4, 4, 3)
    assert img[0, 0].tolist() == [255, 0, 0]  # +1 red
    assert img[0, 3].tolist() == [0, 0, 255]  # -1 blue
    assert img[3, 0].tolist() == [255, 255, 255]  # 0 white


def test_interpolate_affinity_is_exact_on_linear_functions():
    timesteps = np.array([0, 4, 9])
    A = np.add.outer(timesteps, 2 * timesteps).astype(float)
    full = ant.interpolate_affinity(A, timesteps, 10)
    np.testing.assert_allclose(full, np.add.outer(np.arange(10), 2 * np.arange(10)))


def test_pcgrad_matches_the_sequential_projection_on_random_gradients():
    """The Gram-matrix form equals PCGrad written out with D-dimensional projections (Yu et al. 2020, Alg. 1)."""
    grads = torch.randn(5, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grads[1] = -grads[0] + 0.1 * grads[1]  # make sure some pairs conflict
    for seed in range(4):
        projected = grads.clone()
        order = torch.Generator().manual_seed(seed)
        for i in range(5):
            for j in torch.randperm(5, generator=order).tolist():
                dot = projected[i] @ grads[j]
                if dot < 0:
                    projected[i] -= dot / (grads[j] @ grads[j] + 1e-8) * grads[j]
        torch.testing.assert_close(ant.pcgrad(grads, torch.Generator().manual_seed(seed)), projected.sum(0))
