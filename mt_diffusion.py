"""MT-Diffusion: "Diffusion Models for Multi-Task Generative Modeling" (Chen et al., ICLR 2024).

A DDPM whose forward chain also injects encoded task data X = {x_1..x_N}: every step adds
sum_i w_t^(i) E_i(x_i) to the mean (Eq. 3), so the marginal z_t carries atilde_t^(i) E_i(x_i) (Eq. 4) and the
reverse mean subtracts w_t^(i) E_i(x_i) again (Eq. 5). Notation: alpha_t = 1 - beta_t, abar_t = prod_{s<=t} alpha_s,
the paper's timestep t runs 1..T; in code every table and every `t` tensor holds the 0-based index t - 1 (as in
ADM / DiT), so `sched.alphas[i]` is alpha_{i+1} and index 0 is the paper's first noising step t = 1. Theorem 2 has
typos; the closed forms here follow the project SPEC ("MT-Diffusion" section), and each comment names the equation it
implements. This file holds (1) the forward aggregation: task-weight schedules, the atilde recursion, q(z_t | z_0, X)
and one Markov step, and (2) the reverse process: the posterior in x0- and eps-form, one ancestral step, the prior
at T and the sampling loop with optional constrained restoration. No official code exists; this is the reference.
"""
import sys

import torch


#################################################################################
#                 1. Forward aggregation: Eq. (3), Eq. (4)                      #
#################################################################################

def task_weight_schedule(kind, num_timesteps, clamp=1.0, value=1.0):
    """Task weights w with w[t-1] = w_t for t = 1..T (float64): 'paper', 'constant' (w_t = value) or 'zero' (DDPM)."""
    T = num_timesteps
    if kind == "paper":
        # Appendix E: w_t = t / (T - t) keeps heterogeneous tasks out of the small-t (nearly clean) steps. It reaches
        # 1 at t = T/2, is T - 1 at t = T - 1 and T/0 at t = T, so it must be clamped. Default clamp = 1.0: the task
        # term then never outweighs z_{t-1} in the mean sqrt(alpha_t) (z_{t-1} + w_t E) and the tail equals the
        # appendix's own special case w_t = 1 (Eq. 8), so atilde_t stays below the w = 1 value, roughly
        # sqrt(alpha)/(1 - sqrt(alpha)) ~ 2/beta_t. Measured at T = 1000, max_t atilde_t (t of the max):
        #   clamp     0.01      0.1       1.0        10
        #   linear    2.4(415)  22(446)   147(672)   845(1000)
        #   cosine    4.2(629)  40(645)   268(746)   726(927)
        # atilde is O(100) mid-chain even for t <= T/2, where no clamp acts: the injection accumulates over the
        # ~2/beta_t steps the chain remembers. The clamp only bounds the tail; smaller values shrink everything.
        if clamp is None or not 0 < clamp < float("inf"):
            raise ValueError(f"clamp={clamp}: the 'paper' task weights t/(T-t) are infinite at t = T; pass a finite "
                             f"clamp > 0, e.g. clamp=1.0")
        t = torch.arange(1, T + 1, dtype=torch.float64)
        ratio = torch.where(t < T, t / (T - t).clamp(min=1), torch.full_like(t, float("inf")))
        return ratio.clamp(max=clamp)
    if kind == "constant":
        return torch.full((T,), float(value), dtype=torch.float64)
    if kind == "zero":
        return torch.zeros(T, dtype=torch.float64)  # no task injection: plain DDPM
    raise ValueError(f"unknown task weight schedule '{kind}'; choose 'paper', 'constant' or 'zero'")


def aggregation_coefficients(alphas, w):
    """atilde[t-1] = atilde_t from alphas[t-1] = alpha_t and task weights w[t-1] = w_t shaped [T] or [T, M] (Eq. 4)."""
    alphas = torch.as_tensor(alphas, dtype=torch.float64)
    w = torch.as_tensor(w, dtype=torch.float64, device=alphas.device)
    if alphas.dim() != 1:
        raise ValueError(f"alphas must be 1-D [T], got shape {tuple(alphas.shape)}")
    if w.dim() not in (1, 2) or w.shape[0] != alphas.shape[0]:
        raise ValueError(f"w must be shaped [T] or [T, M] with T = {alphas.shape[0]}, got {tuple(w.shape)}")
    atilde = torch.empty_like(w)
    atilde_prev = torch.zeros_like(w[0])  # atilde_0 = 0
    for i in range(alphas.shape[0]):  # i = t - 1
        # Eq. (4), corrected as in the appendix derivation (Theorem 2 writes sqrt(abar_t), a typo; SPEC):
        # atilde_t = sqrt(alpha_t) * (w_t + atilde_{t-1})  <=>  atilde_t = sum_{s<=t} w_s prod_{r=s..t} sqrt(alpha_r)
        atilde_prev = alphas[i].sqrt() * (w[i] + atilde_prev)
        atilde[i] = atilde_prev
    return atilde


class MTSchedule:
    """Float64 tables of the forward process, indexed by 0-based t (index i <-> paper t = i + 1)."""

    def __init__(self, betas, w):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.dim() != 1 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a 1-D array with 0 < beta < 1; use common.diffusion.get_beta_schedule")
        w = torch.as_tensor(w, dtype=torch.float64)
        w = w[:, None] if w.dim() == 1 else w  # [T] = one weight shared by every modality
        self.num_timesteps = betas.shape[0]
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)  # abar_t
        abar_0 = torch.ones(1, dtype=torch.float64)
        self.alphas_cumprod_prev = torch.cat([abar_0, self.alphas_cumprod[:-1]])  # abar_{t-1}
        self.w = w  # (T, M)
        self.atilde = aggregation_coefficients(self.alphas, w)  # (T, M), Eq. (4)
        self.atilde_prev = torch.cat([torch.zeros_like(w[:1]), self.atilde[:-1]])  # atilde_{t-1}, atilde_0 = 0
        # Eq. (5): beta_tilde_t = (1 - alpha_t)(1 - abar_{t-1}) / (1 - abar_t); zero at t = 1
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    @property
    def num_modalities(self):
        return self.w.shape[1]


def _extract(table, t, like):
    """table[t] for 0-based indices t (B,), cast to like's dtype and shaped (B, 1, ..., 1) to broadcast (ADM style)."""
    values = table.to(t.device)[t].to(like.dtype)
    return values.reshape(t.shape[0], *([1] * (like.dim() - 1)))


def _aggregate(table, t, encodings, like):
    """sum_i table[t, i] * E_i for a (T, M) table (w, atilde, ...); zero when there are no encodings."""
    encodings = list(encodings)
    num_columns = table.shape[1]
    if encodings and num_columns != 1 and len(encodings) != num_columns:
        raise ValueError(f"got {len(encodings)} encodings but the task weights have {num_columns} columns; pass one "
                         f"encoding per modality or a [T] weight shared by all")
    total = torch.zeros_like(like)
    for i, encoding in enumerate(encodings):
        if encoding.shape != like.shape:
            raise ValueError(f"encoding {i} has shape {tuple(encoding.shape)}, expected {tuple(like.shape)} (E_i(x_i) "
                             f"must live in the diffusion space of z)")
        total = total + _extract(table[:, i if num_columns > 1 else 0], t, like) * encoding
    return total


def q_mean_variance(sched, z0, encodings, t):
    """Mean and variance of q(z_t | z_0, X), Eq. (4): N(sqrt(abar_t) z_0 + sum_i atilde_t^(i) E_i, (1 - abar_t) I)."""
    mean = _extract(sched.alphas_cumprod.sqrt(), t, z0) * z0 + _aggregate(sched.atilde, t, encodings, z0)
    return mean, _extract(1.0 - sched.alphas_cumprod, t, z0).expand_as(z0)


def q_sample(sched, z0, encodings, t, noise=None):
    """z_t = sqrt(abar_t) z_0 + sum_i atilde_t^(i) E_i + sqrt(1 - abar_t) eps, Eq. (4); t is the 0-based index (B,)."""
    noise = torch.randn_like(z0) if noise is None else noise
    return (_extract(sched.alphas_cumprod.sqrt(), t, z0) * z0
            + _aggregate(sched.atilde, t, encodings, z0)
            + _extract((1.0 - sched.alphas_cumprod).sqrt(), t, z0) * noise)


def forward_step(sched, z_prev, encodings, t, noise=None):
    """One step z_{t-1} -> z_t of Eq. (3), SPEC form: N(sqrt(alpha_t)(z_{t-1} + sum_i w_t^(i) E_i), (1 - alpha_t) I)."""
    noise = torch.randn_like(z_prev) if noise is None else noise
    mean = _extract(sched.alphas.sqrt(), t, z_prev) * (z_prev + _aggregate(sched.w, t, encodings, z_prev))
    return mean + _extract((1.0 - sched.alphas).sqrt(), t, z_prev) * noise


#################################################################################
#                  2. Reverse process: Eq. (5), Algorithm 1                     #
#################################################################################

def q_posterior(sched, z0, z_t, encodings, t):
    """Mean and variance of q(z_{t-1} | z_t, z_0, X) (x0-form of Eq. 5), by Gaussian conditioning."""
    # Prior z_{t-1} ~ N(m, (1 - abar_{t-1}) I) with m = sqrt(abar_{t-1}) z_0 + atilde_{t-1} E (Eq. 4), likelihood
    # z_t | z_{t-1} ~ N(sqrt(alpha_t) (z_{t-1} + w_t E), (1 - alpha_t) I) (Eq. 3). Precisions add:
    #   1/(1 - abar_{t-1}) + alpha_t/(1 - alpha_t) = (1 - abar_t) / ((1 - alpha_t)(1 - abar_{t-1}))
    #   =>  var = beta_tilde_t
    #   mean = [ sqrt(abar_{t-1}) (1 - alpha_t) z_0 + sqrt(alpha_t) (1 - abar_{t-1}) z_t
    #            + sum_i ((1 - alpha_t) atilde_{t-1}^(i) - alpha_t (1 - abar_{t-1}) w_t^(i)) E_i ] / (1 - abar_t)
    # With atilde_{t-1} = atilde_t / sqrt(alpha_t) - w_t the E coefficient is Eq. (5)'s
    # (1 - alpha_t) atilde_t / sqrt(alpha_t) - (1 - abar_t) w_t; Eq. (5)'s z_t coefficient sqrt(abar_t)(1 - abar_{t-1})
    # is a typo for sqrt(alpha_t)(1 - abar_{t-1}). With E = 0 this is the DDPM posterior (Ho et al. Eq. 7).
    alpha, abar, abar_prev = sched.alphas, sched.alphas_cumprod, sched.alphas_cumprod_prev
    coef_z0 = abar_prev.sqrt() * (1.0 - alpha) / (1.0 - abar)
    coef_zt = alpha.sqrt() * (1.0 - abar_prev) / (1.0 - abar)
    coef_e = ((1.0 - alpha)[:, None] * sched.atilde_prev
              - (alpha * (1.0 - abar_prev))[:, None] * sched.w) / (1.0 - abar)[:, None]
    mean = _extract(coef_z0, t, z0) * z0 + _extract(coef_zt, t, z_t) * z_t + _aggregate(coef_e, t, encodings, z_t)
    return mean, _extract(sched.posterior_variance, t, z_t).expand_as(z_t)


def predict_z0_from_eps(sched, z_t, eps, encodings, t):
    """z_0 = (z_t - sum_i atilde_t^(i) E_i - sqrt(1 - abar_t) eps) / sqrt(abar_t): Eq. (4) solved for z_0 (Eq. 10)."""
    noise_part = _extract((1.0 - sched.alphas_cumprod).sqrt(), t, z_t) * eps
    residual = z_t - _aggregate(sched.atilde, t, encodings, z_t) - noise_part
    return residual / _extract(sched.alphas_cumprod.sqrt(), t, z_t)


def posterior_mean_variance(sched, z_t, eps, encodings, t):
    """Eps-form of Eq. (5): mean (z_t - (1 - alpha_t)/sqrt(1 - abar_t) eps) / sqrt(alpha_t) - sum_i w_t^(i) E_i,
    variance beta_tilde_t."""
    alpha, abar = sched.alphas, sched.alphas_cumprod
    mean = (z_t - _extract((1.0 - alpha) / (1.0 - abar).sqrt(), t, z_t) * eps) / _extract(alpha.sqrt(), t, z_t)
    mean = mean - _aggregate(sched.w, t, encodings, z_t)
    return mean, _extract(sched.posterior_variance, t, z_t).expand_as(z_t)


def reverse_step(sched, z_t, eps, encodings, t, noise=None):
    """Algorithm 1 line 12: z_{t-1} = mu(z_t, eps) + sqrt(beta_tilde_t) * noise, no noise at the last step (t = 1)."""
    # The paper writes "+ beta_tilde_t eps" and (1 - alpha_t)/sqrt(1 - alpha_t); SPEC: the std is sqrt(beta_tilde_t)
    # and the eps coefficient is (1 - alpha_t)/sqrt(1 - abar_t), as in Eq. (5).
    mean, variance = posterior_mean_variance(sched, z_t, eps, encodings, t)
    noise = torch.randn_like(z_t) if noise is None else noise
    not_last = (t != 0).to(z_t.dtype).reshape(t.shape[0], *([1] * (z_t.dim() - 1)))  # Algorithm 1 line 6
    return mean + not_last * variance.sqrt() * noise


def prior_sample(sched, encodings, shape, generator=None, device=None, dtype=None):
    """z_T ~ N(atilde_T E(X), (1 - abar_T) I), the forward marginal at T (SPEC; N(0, I) only when E(X) = 0)."""
    # Algorithm 1 line 1 starts from N(0, I), which mismatches Eq. (4) at T whenever E(X) != 0. sqrt(abar_T) z_0 is
    # dropped: z_0 is unknown and abar_T ~ 4e-5 (linear, T = 1000), as in DDPM.
    encodings = list(encodings)
    if encodings:
        device = encodings[0].device if device is None else device
        dtype = encodings[0].dtype if dtype is None else dtype
    noise = torch.randn(shape, generator=generator, device=device, dtype=dtype or torch.get_default_dtype())
    t_last = torch.full((shape[0],), sched.num_timesteps - 1, dtype=torch.long, device=noise.device)
    mean = _aggregate(sched.atilde, t_last, encodings, noise)
    return mean + _extract((1.0 - sched.alphas_cumprod).sqrt(), t_last, noise) * noise


def sample_loop(sched, eps_fn, encodings, shape, generator=None, progress=False, known=None):
    """Algorithm 1: ancestral sampling z_T -> z_0 with eps_fn(z_t, t_index) -> eps_hat; returns z_0.

    eps_fn may instead return (eps_hat, new_encodings) to re-estimate E(X) from the model's task heads
    (Algorithm 1 lines 7-10); the step itself uses the encodings from before the update, the next step the new ones.
    known = (mask, z0_known) does constrained restoration ("keep unmasked pixels", Section 4.1): mask is 1 where z0
    is known. After every step the known region of z_{t-1} is replaced by a fresh forward sample
    q(z_{t-1} | z0_known, X) (Eq. 4) and, after the last step, by z0_known itself, so it is kept exactly.
    """
    encodings = list(encodings)
    if known is not None:
        mask, z0_known = known
        if tuple(z0_known.shape) != tuple(shape):
            raise ValueError(f"known z0 has shape {tuple(z0_known.shape)}, expected the sample shape {tuple(shape)}")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("known mask must hold only 0 (generate) and 1 (keep); threshold it first")
        mask = mask.to(torch.bool)
        device, dtype = z0_known.device, z0_known.dtype
    else:
        device = encodings[0].device if encodings else None
        dtype = encodings[0].dtype if encodings else None
    z = prior_sample(sched, encodings, shape, generator=generator, device=device, dtype=dtype)
    randn = lambda: torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)

    def keep_known(z, index):  # replace the known region by its forward marginal at 0-based `index` (-1 = z_0)
        if known is None:
            return z
        if index < 0:
            return torch.where(mask, z0_known, z)
        level = torch.full((shape[0],), index, dtype=torch.long, device=z.device)
        return torch.where(mask, q_sample(sched, z0_known, encodings, level, noise=randn()), z)

    z = keep_known(z, sched.num_timesteps - 1)
    indices = range(sched.num_timesteps - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm  # optional dependency, only for the progress bar
        indices = tqdm(indices)
    for i in indices:
        t = torch.full((shape[0],), i, dtype=torch.long, device=z.device)
        out = eps_fn(z, t)
        eps, new_encodings = out if isinstance(out, tuple) else (out, None)
        z = reverse_step(sched, z, eps, encodings, t, noise=randn())
        if new_encodings is not None:
            encodings = list(new_encodings)
        z = keep_known(z, i - 1)
    return z


if __name__ == "__main__":
    print("training loop not wired yet")
    sys.exit(2)
