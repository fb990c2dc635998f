"""First-principles checks of common/diffusion.py (closed forms vs. Monte-Carlo and Gaussian conditioning)."""
import hashlib
import json
import os
import math

import numpy as np
import pytest
import torch

from common.diffusion import (cfg_combine, classifier_free_guidance, create_diffusion,
                              discretized_gaussian_log_likelihood, get_beta_schedule, min_snr_weight, normal_kl,
                              p2_weight, space_timesteps)


def test_linear_schedule_endpoints_scale_with_T():
    b = get_beta_schedule("linear", 1000)
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    b = get_beta_schedule("linear", 250)
    assert b[0] == pytest.approx(4e-4) and b[-1] == pytest.approx(0.08)


def test_cosine_schedule_matches_alpha_bar_formula():
    T, s = 1000, 0.008
    abar = np.cumprod(1 - get_beta_schedule("cosine", T))
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    for t in [0, 10, 500, 900]:  # before the 0.999 clip kicks in
        assert abar[t] == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert get_beta_schedule("cosine", T).max() <= 0.999


def test_unknown_schedule_message():
    with pytest.raises(ValueError, match="linear' or 'cosine"):
        get_beta_schedule("quadratic")


def test_q_sample_statistics_monte_carlo():
    d = create_diffusion(noise_schedule="linear", learn_sigma=False)
    x0 = torch.full((200_000, 1), 0.7)
    for t_int in [0, 250, 999]:
        t = torch.full((x0.shape[0],), t_int, dtype=torch.long)
        xt = d.q_sample(x0, t)
        abar = d.alphas_cumprod[t_int]
        se = math.sqrt((1 - abar) / x0.shape[0])
        assert abs(xt.mean().item() - math.sqrt(abar) * 0.7) < 5 * se
        assert xt.var().item() == pytest.approx(1 - abar, rel=0.02, abs=1e-5)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_posterior_equals_gaussian_conditioning(schedule):
    """q(x_{t-1} | x_t, x_0) from conditioning the joint Gaussian of (x_{t-1}, x_t) given x_0."""
    d = create_diffusion(noise_schedule=schedule, learn_sigma=False)
    x0, xt = torch.tensor([[0.3]]), torch.tensor([[-1.1]])
    for t_int in [1, 10, 500, 998]:
        ab_prev, a_t = d.alphas_cumprod[t_int - 1], 1 - d.betas[t_int]
        m_prev, v_prev = math.sqrt(ab_prev) * 0.3, 1 - ab_prev
        m_t, v_t = math.sqrt(a_t) * m_prev, a_t * v_prev + (1 - a_t)
        cov = math.sqrt(a_t) * v_prev
        cond_mean = m_prev + cov / v_t * (-1.1 - m_t)
        cond_var = v_prev - cov ** 2 / v_t
        mean, var, _ = d.q_posterior_mean_variance(x0, xt, torch.tensor([t_int]))
        assert mean.item() == pytest.approx(cond_mean, rel=1e-5, abs=1e-6)
        assert var.item() == pytest.approx(cond_var, rel=1e-5)


def test_space_timesteps_as_adm():
    kept = sorted(space_timesteps(1000, "250"))
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999 and kept[1] == 4
    assert sorted(space_timesteps(1000, "ddim50")) == list(range(0, 1000, 20))
    with pytest.raises(ValueError):
        space_timesteps(10, "20")


RESPACING = json.load(open(os.path.join(os.path.dirname(__file__), "fixtures", "respacing_guided_diffusion.json")))


def test_space_timesteps_equals_guided_diffusion_for_every_count():
    """Fixture: openai/guided-diffusion respace.space_timesteps run on counts 1..1000, sections and ddimN."""
    for count, digest in RESPACING["md5_of_sorted_kept"].items():
        kept = sorted(space_timesteps(1000, count))
        assert hashlib.md5(",".join(map(str, kept)).encode()).hexdigest() == digest, f"count {count}"
    assert sorted(space_timesteps(1000, "21")) == RESPACING["examples"]["21"]
    assert 499 in space_timesteps(1000, "21") and 500 not in space_timesteps(1000, "21")
    for sections, kept in RESPACING["sections"].items():
        assert sorted(space_timesteps(1000, sections)) == kept, sections
    assert sorted(space_timesteps(300, "10,15,20")) == RESPACING["sections_300"]["10,15,20"]
    for ddim, kept in RESPACING["ddim"].items():
        assert sorted(space_timesteps(1000, ddim)) == kept, ddim


def test_respaced_betas_reproduce_alpha_bar_at_kept_steps():
    base = create_diffusion(noise_schedule="cosine")
    sp = create_diffusion("50", noise_schedule="cosine")
    kept = sp.timestep_map.numpy()
    np.testing.assert_allclose(sp.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-10)


def _oracle(diffusion_for_abar, x0, learn_sigma=False):
    """A denoiser that returns the true eps implied by x_t and the known x_0 (abar of the training process)."""
    def model(x, t, **_):
        abar = torch.as_tensor(diffusion_for_abar.alphas_cumprod, dtype=x.dtype)[t].view(-1, 1, 1, 1)
        eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
        return torch.cat([eps, -torch.ones_like(eps)], 1) if learn_sigma else eps
    return model


@pytest.mark.parametrize("respacing", ["", "25", "ddim20"])
def test_ddim_with_oracle_recovers_x0(respacing):
    base = create_diffusion(noise_schedule="linear", learn_sigma=False)
    d = create_diffusion(respacing, noise_schedule="linear", learn_sigma=False)
    x0 = torch.rand(3, 2, 4, 4, dtype=torch.float64) * 2 - 1
    noise = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    out = d.ddim_sample_loop(_oracle(base, x0), x0.shape, noise=noise)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_ddpm_with_oracle_recovers_x0(learn_sigma):
    base = create_diffusion(noise_schedule="cosine", learn_sigma=learn_sigma)
    d = create_diffusion("30", noise_schedule="cosine", learn_sigma=learn_sigma)
    x0 = torch.rand(2, 3, 4, 4, dtype=torch.float64) * 2 - 1
    out = d.p_sample_loop(_oracle(base, x0, learn_sigma), x0.shape, noise=torch.randn_like(x0),
                          generator=torch.Generator().manual_seed(0))
    # the last step has no noise and coef1(t=0) = 1, coef2(t=0) = 0, so an exact eps gives x0 exactly
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)


def test_training_loss_zero_for_oracle_and_vb_only_trains_variance():
    d = create_diffusion(noise_schedule="linear", learn_sigma=True)
    x0 = torch.rand(4, 3, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 1, 400, 999])
    var_values = torch.full_like(x0, -1.0, requires_grad=True)  # frac = 0 -> log beta_tilde_t (the true posterior)

    def model(x, t_, **_):
        return torch.cat([noise.clone().requires_grad_(True), var_values], 1)

    terms = d.training_losses(model, x0, t, noise=noise)
    assert terms["mse"].abs().max() < 1e-10
    assert terms["vb"][1:].abs().max() < 1e-4  # exact mean + exact variance -> KL = 0 for t >= 1
    terms["vb"].sum().backward()
    assert var_values.grad is not None and var_values.grad.abs().sum() > 0


def test_mse_weight_scales_only_mse():
    d = create_diffusion(noise_schedule="linear", learn_sigma=False)
    x0 = torch.randn(3, 1, 2, 2)
    model = lambda x, t, **_: torch.zeros_like(x)
    t = torch.tensor([5, 50, 500])
    a = d.training_losses(model, x0, t, noise=torch.ones_like(x0))
    b = d.training_losses(model, x0, t, noise=torch.ones_like(x0), mse_weight=torch.tensor([1.0, 2.0, 0.5]))
    torch.testing.assert_close(b["loss"], a["mse"] * torch.tensor([1.0, 2.0, 0.5]))


def test_normal_kl_matches_torch_distributions():
    m1, lv1, m2, lv2 = torch.randn(4), torch.randn(4), torch.randn(4), torch.randn(4)
    p = torch.distributions.Normal(m1, (0.5 * lv1).exp())
    q = torch.distributions.Normal(m2, (0.5 * lv2).exp())
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), torch.distributions.kl_divergence(p, q))


def test_discretized_likelihood_is_a_distribution_over_256_bins():
    bins = torch.linspace(-1, 1, 256)
    for mean, log_scale in [(0.0, math.log(0.1)), (0.5, math.log(0.03)), (-0.9, math.log(0.5))]:
        ll = discretized_gaussian_log_likelihood(bins, torch.full_like(bins, mean), torch.full_like(bins, log_scale))
        assert ll.exp().sum().item() == pytest.approx(1.0, abs=2e-3)  # tanh approximation of the normal cdf


def test_learned_range_interpolates_log_variances():
    d = create_diffusion(noise_schedule="linear", learn_sigma=True)
    x, t = torch.zeros(1, 1, 1, 1), torch.tensor([300])
    hi = d.p_mean_variance(None, x, t, model_output=torch.tensor([[[[0.0]], [[1.0]]]]))
    lo = d.p_mean_variance(None, x, t, model_output=torch.tensor([[[[0.0]], [[-1.0]]]]))
    assert hi["log_variance"].item() == pytest.approx(math.log(d.betas[300]), rel=1e-6)
    assert lo["log_variance"].item() == pytest.approx(d.posterior_log_variance_clipped[300], rel=1e-6)


def test_loss_weights():
    s = torch.tensor([0.1, 5.0, 100.0])
    torch.testing.assert_close(min_snr_weight(s, 5.0), torch.tensor([1.0, 1.0, 0.05]))
    torch.testing.assert_close(p2_weight(s, 1.0, 0.5), 1 / (1 + s).sqrt())


def test_classifier_free_guidance_on_eps_channels_only():
    out = torch.randn(4, 8, 2, 2)  # [cond; uncond] halves, 4 eps + 4 variance channels
    g = cfg_combine(out, 3.0, guided_channels=3)
    cond, uncond = out.chunk(2)
    torch.testing.assert_close(g[:2, :3], uncond[:, :3] + 3.0 * (cond[:, :3] - uncond[:, :3]))
    torch.testing.assert_close(g[:2, 3:], cond[:, 3:])
    torch.testing.assert_close(cfg_combine(out, 1.0, 4)[:2], cond)

    seen = {}

    def model(x, t, y):
        seen["y"] = y
        return torch.where(y.view(-1, 1, 1, 1) == 10, torch.zeros_like(x), torch.ones_like(x))

    guided = classifier_free_guidance(model, 4.0, null_class=10, guided_channels=2)
    res = guided(torch.zeros(2, 2, 1, 1), torch.zeros(2, dtype=torch.long), torch.tensor([1, 2]))
    assert seen["y"].tolist() == [1, 2, 10, 10]
    torch.testing.assert_close(res, torch.full((2, 2, 1, 1), 4.0))
