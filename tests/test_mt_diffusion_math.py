"""MT-Diffusion math (sections 1-2 of mt_diffusion.py) checked from first principles."""
import math

import numpy as np
import pytest
import torch

from common.diffusion import get_beta_schedule
from mt_diffusion import (MTSchedule, aggregation_coefficients, forward_step, posterior_mean_variance,
                          predict_z0_from_eps, prior_sample, q_mean_variance, q_posterior, q_sample, reverse_step,
                          sample_loop, task_weight_schedule, task_weights)

T = 50


def _random_weights(T, M, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).uniform(0.2, 1.5, size=(T, M)))


def _atilde_double_loop(alphas, w):
    """atilde_t = sum_{s=1..t} w_s prod_{r=s..t} sqrt(alpha_r), by brute force (1-based t as in the paper)."""
    alphas, w = np.asarray(alphas, dtype=np.float64), np.asarray(w, dtype=np.float64)
    out = np.zeros_like(w)
    for t in range(1, len(alphas) + 1):
        for s in range(1, t + 1):
            out[t - 1] += w[s - 1] * np.prod(np.sqrt(alphas[s - 1:t]))
    return out


def _atilde_theorem2_typo(alphas, w):
    """Theorem 2 as printed: atilde_t = sqrt(abar_t) (w_t + atilde_{t-1}); used to show the tests can fail."""
    alphas, w = np.asarray(alphas, dtype=np.float64), np.asarray(w, dtype=np.float64)
    out, prev = np.zeros_like(w), 0.0
    for i in range(len(alphas)):
        prev = np.sqrt(np.prod(alphas[: i + 1])) * (w[i] + prev)
        out[i] = prev
    return out


#################################################################################
#                         Task weights and atilde                               #
#################################################################################

def test_paper_task_weights_respect_clamp():
    T_big = 1000
    t = np.arange(1, T_big + 1, dtype=np.float64)
    w = task_weight_schedule("paper", T_big, clamp=1.0).numpy()
    assert np.all(np.isfinite(w)) and w.max() == 1.0 and w[-1] == 1.0
    ratio = t[:-1] / (T_big - t[:-1])  # t/(T - t) for t < T
    below = ratio < 1.0
    assert below.sum() == 499  # t/(T-t) < 1 exactly for t < T/2
    np.testing.assert_allclose(w[:-1][below], ratio[below], rtol=0, atol=1e-15)
    w3 = task_weight_schedule("paper", T_big, clamp=3.0).numpy()
    np.testing.assert_allclose(w3[:750], ratio[:750], rtol=1e-15)
    assert w3.max() == 3.0
    assert np.all(task_weight_schedule("zero", 10).numpy() == 0)
    assert np.all(task_weight_schedule("constant", 10, value=0.3).numpy() == 0.3)
    with pytest.raises(ValueError, match="clamp"):
        task_weight_schedule("paper", 10, clamp=None)
    with pytest.raises(ValueError, match="paper"):
        task_weight_schedule("papr", 10)


def test_task_weight_flags():
    # --task-weight paper is App. E's t/(T-t) itself (clamped at 1), whose atilde reaches ~270 (cosine, T = 1000);
    # paper-rescaled has the same shape with max atilde = atilde_max; constant is w_t = value unscaled
    betas = get_beta_schedule("cosine", 1000)
    t = np.arange(1, 1000, dtype=np.float64)
    paper = task_weights("paper", betas).numpy()
    np.testing.assert_allclose(paper[:-1], np.minimum(t / (1000 - t), 1.0), rtol=1e-15)
    assert paper[-1] == 1.0
    atilde = _atilde_double_loop(1 - betas, paper)
    assert 200 < atilde.max() < 300
    rescaled = task_weights("paper-rescaled", betas, atilde_max=0.5).numpy()
    np.testing.assert_allclose(rescaled / paper, rescaled[0] / paper[0], rtol=1e-12)  # one factor throughout
    np.testing.assert_allclose(_atilde_double_loop(1 - betas, rescaled).max(), 0.5, rtol=1e-12)
    assert np.all(task_weights("constant", betas, value=0.3).numpy() == 0.3)
    assert np.all(task_weights("zero", betas).numpy() == 0)


@pytest.mark.parametrize("M", [None, 3])
def test_aggregation_coefficients_match_closed_form_sum(M):
    alphas = 1 - get_beta_schedule("cosine", T)
    w = _random_weights(T, M or 1)
    w = w[:, 0] if M is None else w
    atilde = aggregation_coefficients(torch.from_numpy(alphas), w)
    assert atilde.shape == w.shape and atilde.dtype == torch.float64
    np.testing.assert_allclose(atilde.numpy(), _atilde_double_loop(alphas, w.numpy()), rtol=1e-12, atol=1e-12)
    # the Theorem 2 typo (sqrt(abar_t) in the recursion) gives a different sequence: the check can fail
    assert not np.allclose(_atilde_theorem2_typo(alphas, w.numpy()), atilde.numpy(), rtol=1e-3)


def test_aggregation_coefficients_bad_shapes():
    with pytest.raises(ValueError, match=r"\[T\]"):
        aggregation_coefficients(torch.ones(5) * 0.9, torch.ones(4))


#################################################################################
#                     Forward chain vs. closed-form marginal                    #
#################################################################################

@pytest.mark.slow  # ~2 s idle, > 5 s on a loaded 2-core machine
def test_forward_chain_monte_carlo_matches_marginal():
    # 200k independent chains of a 1-D variable, stored as one batch element of shape (1, n) so that every step
    # broadcasts a single timestep; z_0 and the two modality encodings are fixed scalars
    n, M = 200_000, 2
    sched = MTSchedule(get_beta_schedule("linear", T), _random_weights(T, M, seed=1))
    gen = torch.Generator().manual_seed(123)
    scalar = lambda a: torch.full((1, n), a, dtype=torch.float64)
    z0, encodings = scalar(0.7), [scalar(1.0), scalar(-0.5)]
    abar = sched.alphas_cumprod
    typo = _atilde_theorem2_typo(sched.alphas.numpy(), sched.w.numpy()) @ np.array([1.0, -0.5])
    z, checked = z0, 0
    for i in range(T):
        t = torch.tensor([i])
        z = forward_step(sched, z, encodings, t, noise=torch.randn(1, n, generator=gen, dtype=torch.float64))
        if i + 1 in (1, 5, 20, 35, T):  # paper t
            mean, var = (x[0, 0] for x in q_mean_variance(sched, z0, encodings, t))
            se_mean, se_var = (var / n).sqrt(), var * math.sqrt(2.0 / (n - 1))
            assert abs(z.mean() - mean) < 5 * se_mean, (i, z.mean(), mean)
            assert abs(z.var() - var) < 5 * se_var, (i, z.var(), var)
            # the typo'd recursion (sqrt(abar_t) instead of sqrt(alpha_t)) predicts a mean far outside the MC error
            if i >= 4:
                assert abs(z.mean() - (abar[i].sqrt() * z0[0, 0] + typo[i])) > 5 * se_mean
            checked += 1
    assert checked == 5
    # q_sample draws from the same Gaussian
    t = torch.tensor([19])
    zs = q_sample(sched, z0, encodings, t, noise=torch.randn(1, n, generator=gen, dtype=torch.float64))
    mean, var = (x[0, 0] for x in q_mean_variance(sched, z0, encodings, t))
    assert abs(zs.mean() - mean) < 5 * (var / n).sqrt()
    assert abs(zs.var() - var) < 5 * var * math.sqrt(2.0 / (n - 1))


def test_zero_weights_reduce_to_ddpm():
    betas = get_beta_schedule("linear", T)
    sched = MTSchedule(betas, task_weight_schedule("zero", T))
    abar = np.cumprod(1 - betas)
    z0, e, eps = (torch.randn(4, 3, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0, 7, 30, 49])
    expected = torch.from_numpy(np.sqrt(abar))[t, None] * z0 + torch.from_numpy(np.sqrt(1 - abar))[t, None] * eps
    torch.testing.assert_close(q_sample(sched, z0, [e], t, eps), expected, rtol=1e-12, atol=1e-12)


#################################################################################
#                                Posterior                                      #
#################################################################################

@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_posterior_equals_gaussian_conditioning(schedule):
    betas = get_beta_schedule(schedule, T)
    w = _random_weights(T, 2, seed=2).numpy()
    sched = MTSchedule(betas, torch.from_numpy(w))
    alphas = 1 - betas
    abar = np.cumprod(alphas)
    atilde = _atilde_double_loop(alphas, w)  # independent of the module's recursion
    rng = np.random.default_rng(3)
    for t in [2, 3, 10, 25, 50]:  # paper t >= 2 so that z_{t-1} is random
        z0, e1, e2, zt = rng.normal(size=4)
        # joint Gaussian of (z_{t-1}, z_t) given z_0, X, in 1-D, from Eq. (4) and Eq. (3)
        m1 = math.sqrt(abar[t - 2]) * z0 + atilde[t - 2] @ [e1, e2]
        m2 = math.sqrt(abar[t - 1]) * z0 + atilde[t - 1] @ [e1, e2]
        v1, v2 = 1 - abar[t - 2], 1 - abar[t - 1]
        cov = math.sqrt(alphas[t - 1]) * v1  # Cov(z_{t-1}, sqrt(alpha_t)(z_{t-1} + w E) + noise)
        cond_mean, cond_var = m1 + cov / v2 * (zt - m2), v1 - cov ** 2 / v2
        as_t = lambda x: torch.tensor([[x]], dtype=torch.float64)
        idx = torch.tensor([t - 1])
        mean, var = q_posterior(sched, as_t(z0), as_t(zt), [as_t(e1), as_t(e2)], idx)
        assert abs(mean.item() - cond_mean) < 1e-10 and abs(var.item() - cond_var) < 1e-12, (t, mean, cond_mean)


def test_eps_form_equals_x0_form_with_true_noise():
    sched = MTSchedule(get_beta_schedule("cosine", T), _random_weights(T, 2, seed=4))
    shape = (6, 2, 4, 4)
    z0 = torch.randn(shape, dtype=torch.float64)
    encodings = [torch.randn(shape, dtype=torch.float64) for _ in range(2)]
    eps = torch.randn(shape, dtype=torch.float64)
    t = torch.tensor([0, 1, 5, 17, 33, 49])
    zt = q_sample(sched, z0, encodings, t, eps)
    mean_eps, var_eps = posterior_mean_variance(sched, zt, eps, encodings, t)
    mean_x0, var_x0 = q_posterior(sched, z0, zt, encodings, t)
    torch.testing.assert_close(mean_eps, mean_x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(var_eps, var_x0)
    torch.testing.assert_close(predict_z0_from_eps(sched, zt, eps, encodings, t), z0, rtol=1e-9, atol=1e-9)
    # dropping the "- sum_i w_t E_i" term breaks the equality
    assert not torch.allclose(mean_eps + sched.w[t, 0].reshape(-1, 1, 1, 1) * encodings[0], mean_x0)


#################################################################################
#                                 Sampling                                      #
#################################################################################

def _oracle(sched, z0, encodings):
    """eps_fn giving the true noise in z_t: (z_t - sqrt(abar) z_0 - sum atilde E) / sqrt(1 - abar)."""
    def eps_fn(z_t, t):
        mean, var = q_mean_variance(sched, z0, encodings, t)
        return (z_t - mean) / var.sqrt()
    return eps_fn


def _check_marginals(seen, mean_var, n, what):
    """Every recorded z_t (a batch of n independent chains per coordinate) has the mean and variance of
    mean_var(index) = q(z_t | z_0, X) within 5 standard errors."""
    for index, z in seen:
        mean, var = mean_var(index)
        se_mean, se_var = (var / n).sqrt(), var * math.sqrt(2.0 / (n - 1))
        assert torch.all((z.mean(0) - mean).abs() < 5 * se_mean), (what, index, z.mean(0), mean)
        assert torch.all((z.var(0) - var).abs() < 5 * se_var), (what, index, z.var(0), var)


def _recording_oracle(sched, z0, encodings, seen, index_of=lambda i: i):
    """The oracle eps of _oracle, recording each z_t it is given as (original-chain index, z_t)."""
    oracle = _oracle(sched, z0, encodings)

    def eps_fn(z_t, t):
        seen.append((index_of(int(t[0])), z_t.clone()))
        return oracle(z_t, torch.full_like(t, index_of(int(t[0]))))
    return eps_fn


@pytest.mark.parametrize("clip", [False, True])
def test_oracle_sampler_follows_every_forward_marginal(clip):
    # with the true noise, each reverse step draws z_{t-1} from q(z_{t-1} | z_t, z_0, X), so starting from the
    # marginal at T every z_t on the way is distributed as q(z_t | z_0, X) (Eq. 4), and z_0 is hit exactly;
    # 20k chains per coordinate, two coordinates with different z_0 and E (inside [-1, 1], so the clip is inactive)
    n = 20_000
    sched = MTSchedule(get_beta_schedule("linear", T), _random_weights(T, 1, seed=7))
    z0 = torch.tensor([[0.7, -0.4]], dtype=torch.float64).expand(n, 2)
    encodings = [torch.tensor([[1.0, -0.8]], dtype=torch.float64).expand(n, 2)]
    seen = []
    out = sample_loop(sched, _recording_oracle(sched, z0, encodings, seen), encodings, (n, 2),
                      generator=torch.Generator().manual_seed(0), clip_denoised=clip)
    assert [i for i, _ in seen] == list(range(T - 1, -1, -1))
    t = lambda i: torch.tensor([i])
    _check_marginals(seen, lambda i: [x[0] for x in q_mean_variance(sched, z0[:1], [encodings[0][:1]], t(i))], n,
                     "oracle")
    torch.testing.assert_close(out, z0, rtol=0, atol=1e-9)


def test_clipped_sampler_lands_in_the_data_range():
    # clip_denoised clamps the predicted z_0 to [-1, 1]; the last step (t = 1, abar_0 = 1) returns that clamped
    # z_0 itself, so an oracle aiming at z_0 = +-3 ends at +-1 with the clip and at +-3 without
    sched = MTSchedule(get_beta_schedule("cosine", T), _random_weights(T, 1, seed=6))
    z0 = 3 * torch.sign(torch.randn(5, 3, dtype=torch.float64))
    encodings = [torch.randn(5, 3, dtype=torch.float64)]
    for clip, expected in ((True, z0.clamp(-1, 1)), (False, z0)):
        out = sample_loop(sched, _oracle(sched, z0, encodings), encodings, (5, 3), torch.Generator().manual_seed(1),
                          clip_denoised=clip)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)


def test_reverse_step_std_is_sqrt_beta_tilde():
    betas = get_beta_schedule("cosine", T)
    sched = MTSchedule(betas, task_weight_schedule("paper", T))
    abar = np.cumprod(1 - betas)
    beta_tilde = betas[1:] * (1 - abar[:-1]) / (1 - abar[1:])  # paper t = 2..T
    t = torch.tensor([0, 1, 10, 49])
    z, eps, e = (torch.randn(4, 3, dtype=torch.float64) for _ in range(3))
    mean, _ = posterior_mean_variance(sched, z, eps, [e], t)
    noise = torch.full((4, 3), 2.0, dtype=torch.float64)
    std = (reverse_step(sched, z, eps, [e], t, noise=noise) - mean)[:, 0] / 2.0
    expected = torch.tensor([0.0, *np.sqrt(beta_tilde[[0, 9, 48]])], dtype=torch.float64)  # no noise at t = 1
    torch.testing.assert_close(std, expected, rtol=1e-10, atol=1e-12)


def test_prior_sample_matches_forward_marginal_at_T():
    sched = MTSchedule(get_beta_schedule("cosine", T), task_weight_schedule("constant", T, value=0.7))
    n = 200_000
    e = torch.tensor([1.5, -2.0], dtype=torch.float64).expand(n, 2)
    z = prior_sample(sched, [e], (n, 2), generator=torch.Generator().manual_seed(5))
    atilde_T = float(_atilde_double_loop(sched.alphas.numpy(), np.full(T, 0.7))[-1])
    var = 1 - float(np.prod(1 - get_beta_schedule("cosine", T)))
    assert atilde_T > 0.1  # the shift is not negligible, so N(0, I) would fail below
    se_mean, se_var = math.sqrt(var / n), var * math.sqrt(2 / (n - 1))
    assert torch.all((z.mean(0) - atilde_T * e[0]).abs() < 5 * se_mean)
    assert torch.all((z.var(0) - var).abs() < 5 * se_var)
    z_plain = prior_sample(sched, [], (n, 2), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert z_plain.mean().abs() < 5 * se_mean  # no task data: centred


def test_constrained_sampler_replaces_the_known_region_by_its_marginals():
    # known = (mask, z_0): before every step the known coordinates are a fresh draw of q(z_t | z_0, X) whatever
    # the model does (here eps = 0, a bad model); the returned z_0 is the model's own, not pasted back
    n = 20_000
    sched = MTSchedule(get_beta_schedule("cosine", 20), task_weight_schedule("paper", 20))
    z0 = torch.tensor([[0.5, -0.3]], dtype=torch.float64).expand(n, 2)
    mask = torch.tensor([[1.0, 0.0]], dtype=torch.float64).expand(n, 2)
    encodings = [z0 * mask]
    seen = []

    def eps_fn(z, t):
        seen.append((int(t[0]), z[:, :1].clone()))
        return torch.zeros_like(z)
    out = sample_loop(sched, eps_fn, encodings, (n, 2), generator=torch.Generator().manual_seed(1), known=(mask, z0))
    assert len(seen) == 20
    _check_marginals(seen, lambda i: [x[0, :1] for x in q_mean_variance(sched, z0[:1], [encodings[0][:1]],
                                                                           torch.tensor([i]))], n, "known")
    assert (out[:, 0] - z0[:, 0]).abs().mean() > 1e-2  # the bad model's last step: no paste-back in the sampler
    with pytest.raises(ValueError, match="mask"):
        sample_loop(sched, eps_fn, encodings, (n, 2), known=(mask * 0.5, z0))


def test_encoding_count_must_match_weight_columns():
    sched = MTSchedule(get_beta_schedule("cosine", 10), _random_weights(10, 2))
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="encodings"):
        q_sample(sched, z, [z, z, z], torch.tensor([0, 1]))
