"""Discrete-time Gaussian diffusion (DDPM / ADM / DiT conventions) shared by the paper scripts."""
import math

import numpy as np
import torch


#################################################################################
#                              Noise schedules                                  #
#################################################################################

def get_beta_schedule(name, num_timesteps=1000):
    """Betas of the `linear` (ADM, rescaled to T) or `cosine` (Nichol & Dhariwal 2021) schedule, float64."""
    if name == "linear":
        scale = 1000 / num_timesteps  # ADM: the 1e-4..0.02 range is defined for T = 1000
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "cosine":
        # abar(t) = cos^2((t/T + s) / (1 + s) * pi/2), s = 0.008; beta_t = 1 - abar(t+1)/abar(t), clipped at 0.999
        f = lambda t: math.cos((t / num_timesteps + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - f(i + 1) / f(i), 0.999) for i in range(num_timesteps)], dtype=np.float64)
    raise ValueError(f"unknown noise schedule '{name}'; choose 'linear' or 'cosine'")


def snr(alphas_cumprod):
    """SNR(t) = abar_t / (1 - abar_t)."""
    return alphas_cumprod / (1.0 - alphas_cumprod)


def min_snr_weight(snr_t, gamma=5.0):
    """Min-SNR-gamma weight for the eps-prediction MSE: min(SNR, gamma) / SNR (Hang et al. 2023)."""
    return torch.clamp(snr_t, max=gamma) / snr_t


def p2_weight(snr_t, k=1.0, gamma=1.0):
    """P2 weight 1 / (k + SNR)^gamma (Choi et al. 2022), applied to the eps-prediction MSE."""
    return 1.0 / (k + snr_t) ** gamma


def space_timesteps(num_timesteps, section_counts):
    """Timesteps to keep when respacing, as ADM: "250" keeps 250 evenly strided steps, "ddim50" a DDIM stride."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} DDIM steps with an integer stride of {num_timesteps}")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, kept = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot take {count} steps out of a section of {size} timesteps")
        stride = (size - 1) / (count - 1) if count > 1 else 1
        # Accumulate the float stride as ADM's respace.py does: round(j * stride) differs from it at .5 ties
        # (e.g. "21" keeps 499 there, not 500), and published samplers use ADM's steps.
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return set(kept)


#################################################################################
#                Gaussian helpers for the variational bound (ADM)               #
#################################################################################

def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of 8-bit data x in [-1, 1] under a Gaussian discretised into 256 bins (Ho et al. 2020)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def mean_flat(x):
    return x.mean(dim=list(range(1, x.ndim)))


#################################################################################
#                             Gaussian diffusion                                #
#################################################################################

class GaussianDiffusion:
    """DDPM forward process, eps-prediction loss (+ ADM's vb term when learn_sigma) and DDPM/DDIM samplers.

    Follows openai/guided-diffusion `gaussian_diffusion.py` as configured by DiT: eps prediction, MSE loss,
    learned-range variance when learn_sigma else the fixed-large variance. `timestep_map` translates the index
    of a respaced process back to the training timestep the model was trained on.
    """

    def __init__(self, betas, learn_sigma=True, timestep_map=None):
        self.betas = betas = np.asarray(betas, dtype=np.float64)
        assert betas.ndim == 1 and (betas > 0).all() and (betas <= 1).all()
        self.num_timesteps = len(betas)
        self.learn_sigma = learn_sigma
        self.timestep_map = torch.as_tensor(
            np.arange(self.num_timesteps) if timestep_map is None else np.asarray(timestep_map), dtype=torch.long)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.snr = snr(self.alphas_cumprod)
        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta_tilde_t)   (DDPM Eq. 6-7)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta_tilde_0 = 0: clip its log to beta_tilde_1 as ADM does
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        # fixed-large variance: beta_t, with beta_tilde_1 at t = 0 so the decoder step is sensible (ADM)
        self.log_variance_fixed_large = np.log(np.append(self.posterior_variance[1], betas[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self._cache = {}

    def _extract(self, name, t, ndim):
        """Gather the schedule array `name` at integer timesteps t (B,) and shape it to broadcast over (B, ...)."""
        key = (name, t.device)
        if key not in self._cache:  # one host->device copy per array and device, not one per call
            self._cache[key] = torch.as_tensor(getattr(self, name), device=t.device)
        return self._cache[key][t].float().view(-1, *([1] * (ndim - 1)))

    # ----- forward process ---------------------------------------------------
    def q_sample(self, x_start, t, noise=None):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps   (DDPM Eq. 4)."""
        noise = torch.randn_like(x_start) if noise is None else noise
        return (self._extract("sqrt_alphas_cumprod", t, x_start.ndim) * x_start
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start.ndim) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (self._extract("posterior_mean_coef1", t, x_t.ndim) * x_start
                + self._extract("posterior_mean_coef2", t, x_t.ndim) * x_t)
        return (mean, self._extract("posterior_variance", t, x_t.ndim),
                self._extract("posterior_log_variance_clipped", t, x_t.ndim))

    def predict_x0_from_eps(self, x_t, t, eps):
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t.ndim) * x_t
                - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.ndim) * eps)

    def predict_eps_from_x0(self, x_t, t, x0):
        return ((self._extract("sqrt_recip_alphas_cumprod", t, x_t.ndim) * x_t - x0)
                / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.ndim))

    # ----- model outputs -----------------------------------------------------
    def _run_model(self, model, x, t, model_kwargs):
        key = ("timestep_map", t.device)
        if key not in self._cache:  # copied once per device: a copy per call would be a host-device sync per step
            self._cache[key] = self.timestep_map.to(t.device)
        return model(x, self._cache[key][t], **(model_kwargs or {})).float()

    def p_mean_variance(self, model, x, t, clip_denoised=False, model_kwargs=None, model_output=None):
        """p(x_{t-1} | x_t): mean, variance, log-variance and the predicted x_0 / eps."""
        if model_output is None:
            model_output = self._run_model(model, x, t, model_kwargs)
        C = x.shape[1]
        if self.learn_sigma:
            eps, var_values = model_output[:, :C], model_output[:, C:2 * C]
            # learned range (Nichol & Dhariwal Eq. 15): interpolate log beta_tilde_t and log beta_t
            min_log = self._extract("posterior_log_variance_clipped", t, x.ndim)
            max_log = torch.log(self._extract("betas", t, x.ndim))
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
        else:
            eps = model_output[:, :C]
            log_variance = self._extract("log_variance_fixed_large", t, x.ndim)
        pred_x0 = self.predict_x0_from_eps(x, t, eps)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x, t)
        return {"mean": mean, "log_variance": log_variance, "pred_x0": pred_x0, "eps": eps}

    # ----- training loss -----------------------------------------------------
    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None, mse_weight=None):
        """Per-sample losses {"loss", "mse", "vb"}: eps-MSE (optionally weighted per sample) + ADM's vb term.

        The vb term trains only the variance channels (the eps half is detached), exactly as ADM/DiT.
        """
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise)
        model_output = self._run_model(model, x_t, t, model_kwargs)
        C = x_start.shape[1]
        mse = mean_flat((noise - model_output[:, :C]) ** 2)
        terms = {"mse": mse, "vb": torch.zeros_like(mse)}
        if self.learn_sigma:
            frozen = torch.cat([model_output[:, :C].detach(), model_output[:, C:]], dim=1)
            terms["vb"] = self._vb_terms_bpd(x_start, x_t, t, frozen)
        weighted = mse if mse_weight is None else mse_weight * mse
        terms["loss"] = weighted + terms["vb"]
        return terms

    def _vb_terms_bpd(self, x_start, x_t, t, model_output):
        """L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) in bits/dim; decoder NLL at t = 0 (DDPM Eq. 5)."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(None, x_t, t, model_output=model_output)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    # ----- samplers ----------------------------------------------------------
    def _timesteps(self, progress):
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm
            indices = tqdm(indices, desc="sampling", leave=False)
        return indices

    @torch.no_grad()
    def p_sample_loop(self, model, shape, noise=None, clip_denoised=False, model_kwargs=None,
                      device=None, progress=False, generator=None):
        """DDPM ancestral sampling: x_{t-1} = mu_theta(x_t) + sigma_t z, no noise at the last step."""
        x = noise if noise is not None else torch.randn(*shape, device=device, generator=generator)
        for i in self._timesteps(progress):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs)
            z = torch.randn(x.shape, device=x.device, generator=generator, dtype=x.dtype) if i > 0 else 0.0
            x = out["mean"] + torch.exp(0.5 * out["log_variance"]) * z
        return x

    @torch.no_grad()
    def ddim_sample_loop(self, model, shape, noise=None, eta=0.0, clip_denoised=False, model_kwargs=None,
                         device=None, progress=False, generator=None):
        """DDIM (Song et al. 2021, Eq. 12): deterministic for eta = 0, DDPM-like variance for eta = 1."""
        x = noise if noise is not None else torch.randn(*shape, device=device, generator=generator)
        for i in self._timesteps(progress):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs)
            eps = self.predict_eps_from_x0(x, t, out["pred_x0"])  # re-derived so clipping is respected
            abar = self._extract("alphas_cumprod", t, x.ndim)
            abar_prev = self._extract("alphas_cumprod_prev", t, x.ndim)
            sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
            x = out["pred_x0"] * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma ** 2) * eps
            if i > 0 and eta > 0:
                x = x + sigma * torch.randn(x.shape, device=x.device, generator=generator, dtype=x.dtype)
        return x


def create_diffusion(timestep_respacing="", noise_schedule="linear", learn_sigma=True, diffusion_steps=1000):
    """DiT's `create_diffusion`: the training process ("" respacing) or a respaced sampling process ("250")."""
    betas = get_beta_schedule(noise_schedule, diffusion_steps)
    if not timestep_respacing:
        return GaussianDiffusion(betas, learn_sigma=learn_sigma)
    kept = sorted(space_timesteps(diffusion_steps, timestep_respacing))
    # keep abar at the kept steps: beta'_i = 1 - abar_{k_i} / abar_{k_{i-1}}   (ADM respace.py)
    abar = np.cumprod(1.0 - betas)[kept]
    new_betas = 1.0 - abar / np.append(1.0, abar[:-1])
    return GaussianDiffusion(new_betas, learn_sigma=learn_sigma, timestep_map=kept)


#################################################################################
#                        Classifier-free guidance                               #
#################################################################################

def cfg_combine(model_out, cfg_scale, guided_channels):
    """Outputs for a [cond; uncond] batch -> [guided; guided], as DiT's forward_with_cfg.

    eps = eps_uncond + s (eps_cond - eps_uncond) (Ho & Salimans 2022) on the first `guided_channels` channels;
    the remaining channels (learned variance) keep each half's own value.
    """
    eps, rest = model_out[:, :guided_channels], model_out[:, guided_channels:]
    cond_eps, uncond_eps = eps.chunk(2)
    half = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    return torch.cat([torch.cat([half, half]), rest], dim=1)


def classifier_free_guidance(model, cfg_scale, null_class, guided_channels):
    """Wrap model(x, t, y) into a guided model(x, t, y) on the conditional batch alone (one doubled forward)."""
    def guided(x, t, y):
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]))
        return cfg_combine(out, cfg_scale, guided_channels)[: x.shape[0]]
    return guided
