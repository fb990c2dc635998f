"""MT-Diffusion beyond the closed forms: respacing of the aggregated chain, patch masks, encoders, heads, variants,
constrained restoration, and each --setting end to end on the synthetic set (tiny shapes)."""
import csv
import glob
import math
import os

import numpy as np
import pytest
import torch

from common.diffusion import get_beta_schedule
from common.unet import EncoderUNetModel, UNetModel
from mt_diffusion import (MTSchedule, build, half_mask, main, parse_args, patch_size, q_mean_variance,
                          random_patch_mask, respace, restore, sample_loop, sdedit_minus, training_losses,
                          unet_label_encoder)

TINY = ["--image-size", "16", "--global-batch-size", "4", "--num-sampling-steps", "2", "--eval-samples", "4",
        "--eval-batch-size", "4", "--log-every", "1"]


def _weights(T, M, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).uniform(0.2, 1.5, size=(T, M)))


#################################################################################
#                  Respacing the aggregated chain (first principles)            #
#################################################################################

def _composed_transition(sched, start, end):
    """Compose Eq. (3) one step at a time from 0-based index start (-1 = z_0) to end:
    z_end = A z_start + B E + N(0, V)."""
    A, B, V = 1.0, torch.zeros(sched.w.shape[1], dtype=torch.float64), 0.0
    for r in range(start + 1, end + 1):
        a = sched.alphas[r]
        A, B, V = A * a.sqrt(), a.sqrt() * (B + sched.w[r]), a * V + (1 - a)
    return A, B, V


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_respaced_chain_composes_the_original_steps(schedule):
    T = 60
    sched = MTSchedule(get_beta_schedule(schedule, T), _weights(T, 2))
    chain, kept = respace(sched, 7)
    kept = kept.tolist()
    assert len(kept) == 7 and kept[-1] == T - 1
    torch.testing.assert_close(chain.alphas_cumprod, sched.alphas_cumprod[kept], rtol=1e-12, atol=0)
    torch.testing.assert_close(chain.atilde, sched.atilde[kept], rtol=1e-12, atol=1e-12)
    # every respaced one-step transition equals the original steps between two kept indices composed
    naive_w = sched.w[kept]  # DDPM-style respacing would keep w_t: it misses the skipped steps' injection
    naive_fails = False
    for i, (start, end) in enumerate(zip([-1] + kept[:-1], kept)):
        A, B, V = _composed_transition(sched, start, end)
        alpha = chain.alphas[i]
        torch.testing.assert_close(alpha.sqrt(), A, rtol=1e-12, atol=0)
        torch.testing.assert_close(alpha.sqrt() * chain.w[i], B, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(1 - alpha, torch.as_tensor(V, dtype=torch.float64), rtol=1e-12, atol=0)
        naive_fails |= not torch.allclose(alpha.sqrt() * naive_w[i], B, rtol=1e-3)
    assert naive_fails
    with pytest.raises(ValueError, match="2 sampling steps"):
        respace(sched, 1)


def test_oracle_sampler_on_respaced_chain_follows_the_original_marginals():
    # sampling the 9-step respaced chain with the true noise, the z_t seen at chain index i is distributed as the
    # ORIGINAL chain's q(z_{kept[i]} | z_0, X): respacing that kept w_t at the kept steps (DDPM-style) would not be
    T, n = 100, 20_000
    sched = MTSchedule(get_beta_schedule("cosine", T), _weights(T, 1, seed=3))
    chain, kept = respace(sched, 9)
    z0 = torch.tensor([[0.6, -0.2]], dtype=torch.float64).expand(n, 2)
    encodings = [torch.tensor([[0.9, -0.7]], dtype=torch.float64).expand(n, 2)]
    seen = []

    def oracle(z_t, i):  # the true noise under the ORIGINAL chain's marginal at the kept timestep
        seen.append((int(kept[i[0]]), z_t.clone()))
        mean, var = q_mean_variance(sched, z0, encodings, kept[i])
        return (z_t - mean) / var.sqrt()
    out = sample_loop(chain, oracle, encodings, (n, 2), torch.Generator().manual_seed(0))
    assert [k for k, _ in seen] == kept.tolist()[::-1]
    for k, z in seen:
        mean, var = (x[0] for x in q_mean_variance(sched, z0[:1], [encodings[0][:1]], torch.tensor([k])))
        se_mean, se_var = (var / n).sqrt(), var * math.sqrt(2.0 / (n - 1))
        assert torch.all((z.mean(0) - mean).abs() < 5 * se_mean), (k, z.mean(0), mean)
        assert torch.all((z.var(0) - var).abs() < 5 * se_var), (k, z.var(0), var)
    torch.testing.assert_close(out, z0, rtol=0, atol=1e-9)


#################################################################################
#                          Masks, encoders, heads, variants                     #
#################################################################################

def test_patch_mask_count_distribution():
    # 1-px patches in a 64 x 64 image: holes = m up to rare collisions (<= 1.1% at m = 10), so the number of
    # zeroed pixels shows the distribution of m, which App. E.2 makes uniform on {0..10}
    gen, n = torch.Generator().manual_seed(0), 4400
    holes = torch.cat([(1 - random_patch_mask(400, 10, 64, 1, gen)).sum(dim=(1, 2, 3)) for _ in range(n // 400)])
    freq = torch.bincount(holes.long(), minlength=11).double() / n
    assert len(freq) == 11
    assert torch.all((freq - 1 / 11).abs() < 5 * math.sqrt((1 / 11) * (10 / 11) / n)), freq
    # one patch: an axis-aligned p x p square with its corner uniform over the image, clipped at the border
    keep = random_patch_mask(3000, 1, 8, 4, gen, counts=torch.ones(3000, dtype=torch.long))
    corners = set()
    for hole in (1 - keep[:, 0]).bool():
        ys, xs = hole.nonzero(as_tuple=True)
        y0, x0 = int(ys.min()), int(xs.min())
        assert hole.sum() == min(4, 8 - y0) * min(4, 8 - x0) and hole[y0:y0 + 4, x0:x0 + 4].all()
        corners.add((y0, x0))
    assert len(corners) == 64
    assert patch_size(64) == 16 and patch_size(32) == 8 and patch_size(32, 5) == 5


def _tiny(setting, *extra):
    args = parse_args(["--setting", setting, *TINY, *extra])
    return (args, *build(args, torch.device("cpu")))


def _unzero(model):
    """ADM zero-initialises its output convolutions (the output ignores every input, no gradient flows): perturb."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def test_label_encoder_has_no_gradient_and_is_deterministic():
    args, _, _, task, model, sched = _tiny("image-label")
    z0, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    _unzero(model).train()
    e = task.encode(y, model.unet)
    assert not e.requires_grad and model.unet.training  # no_grad, and the training mode is restored
    loss = training_losses(model, sched, z0, [e], y, torch.tensor([0, 300, 600, 999]), "ce")["loss"].mean()
    loss.backward()
    grad = model.unet.label_emb.weight.grad
    assert grad[:task.num_classes].abs().max() == 0  # the label rows reach the loss only through E: stop-gradient
    assert grad[task.num_classes].abs().max() > 0  # the null row, used by eps, does get a gradient
    # with dropout the encoder still is a function of y (eval mode inside)
    unet = UNetModel(16, 3, 32, 3, 1, (2,), dropout=0.5, channel_mult=(1, 2), num_classes=5).train()
    torch.testing.assert_close(unet_label_encoder(unet, y, (4, 3, 16, 16)), unet_label_encoder(unet, y, (4, 3, 16, 16)))
    assert unet.training


def test_variants_x_and_u_and_heads():
    z, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 500])
    e1, e2 = torch.randn_like(z), torch.randn_like(z)
    for variant, channels in (("X", 6), ("U", 3)):
        model = _unzero(_tiny("masked-image", "--variant", variant)[4]).eval()
        assert model.unet.input_blocks[0][0].in_channels == channels
        with torch.no_grad():
            same = torch.equal(model(z, t, [e1])[0], model(z, t, [e2])[0])
        assert same == (variant == "U")  # -U: eps(z_t, t) ignores X; -X: eps(z_t, X, t) reads it
    model = _tiny("masked-image")[4]  # image modality: a replica of the output block (GroupNorm, SiLU, conv)
    assert [isinstance(m, c) for m, c in zip(model.head, (torch.nn.GroupNorm, torch.nn.SiLU, torch.nn.Conv2d))] == \
        [True] * 3 and len(model.head) == 3 and model.head_input == "penultimate" and model.head[-1].out_channels == 3
    with torch.no_grad():  # its own weights: changing them moves the head output, not eps
        eps, pred = model(z, t, [e1])
        model.head[-1].weight.add_(1.0)
        eps2, pred2 = model(z, t, [e1])
    assert torch.equal(eps, eps2) and not torch.equal(pred, pred2) and pred.shape == z.shape
    model = _tiny("image-label")[4]  # -M: one linear layer on the pooled middle block
    assert isinstance(model.head, torch.nn.Linear) and model.head_input == "middle" and model.head.out_features == 4
    *_, model, sched = _tiny("image-label", "--label-head", "E")  # -E: the guided-diffusion classifier on the output
    assert isinstance(model.head, EncoderUNetModel) and model.head_input == "output"
    y = torch.tensor([1, 3])
    terms = training_losses(model, sched, z, [torch.zeros_like(z)], y, t, "ce")
    terms["loss"].mean().backward()
    assert torch.isfinite(terms["loss"]).all() and all(p.grad is not None for p in model.head.parameters())
    model = _tiny("image-representation", "--embed-dim", "7")[4]  # 2-layer MLP 1024-ReLU-(embedding size)
    assert [type(m).__name__ for m in model.head] == ["Linear", "ReLU", "Linear"]
    assert model.head[0].out_features == 1024 and model.head[2].out_features == 7


class _NoisyModel(torch.nn.Module):
    """A stand-in reverse model that predicts random noise: restoration must keep the known pixels anyway."""
    unet = None

    def forward(self, z, t, encodings):
        return torch.randn_like(z) * 3, None


class _PoolVAE:
    """A stand-in 'VAE': 8x average pooling to 4 channels and nearest upsampling back."""

    def encode_to_latent(self, x):
        return torch.cat([torch.nn.functional.avg_pool2d(x, 8), x[:, :1, ::8, ::8]], dim=1)

    def decode_from_latent(self, z):
        return torch.nn.functional.interpolate(z[:, :3], scale_factor=8).clamp(-1, 1)


class _OracleModel(torch.nn.Module):
    """A perfect eps_theta for one known z_0: the true noise in z_t under the full chain (Eq. 4 solved for eps)."""
    unet = None

    def __init__(self, sched, z0):
        super().__init__()
        self.sched, self.z0 = sched, z0

    def forward(self, z, t, encodings):
        mean, var = q_mean_variance(self.sched, self.z0, encodings, t)
        return (z - mean) / var.sqrt(), None


class _ScaledVAE:
    """A stand-in 'VAE' whose latents span [-3, 3] like SD-VAE latents: z = 3 x, x = z / 3."""

    def encode_to_latent(self, x):
        return 3 * x

    def decode_from_latent(self, z):
        return z / 3


def test_latent_restoration_does_not_clamp_latents():
    # an oracle denoiser recovers latents outside [-1, 1] exactly; clamping the predicted z_0 (pixel mode's ADM
    # clip) would cut them to [-1, 1] and return a third of the image in the masked region
    args, _, _, task, _, sched = _tiny("restoration")
    task.vae = _ScaledVAE()
    images = torch.rand(3, 3, 16, 16, dtype=torch.float64) * 2 - 1
    keep = random_patch_mask(3, 3, 16, 4, torch.Generator().manual_seed(1), counts=torch.tensor([1, 2, 3])).double()
    model = _OracleModel(sched, task.vae.encode_to_latent(images))
    out, raw = restore(model, task, respace(sched, 5), images, keep, torch.Generator().manual_seed(2))
    torch.testing.assert_close(raw, images, rtol=0, atol=1e-6)


@pytest.mark.parametrize("latent", [False, True])
def test_restoration_reports_the_model_before_paste_back(latent):
    # restore returns (restored, raw): raw is the model's own output, restored pastes the known pixels back. An
    # oracle model fills the masked region with the original and is consistent on the known pixels; a model
    # predicting noise is not, and only the paste-back keeps its known pixels
    args, _, _, task, _, sched = _tiny("restoration")
    images = torch.rand(3, 3, 16, 16, dtype=torch.float64) * 2 - 1
    if latent:  # a 'VAE' that is exact on these images: decode(encode(x)) = x
        task.vae, task.z_shape = _PoolVAE(), (4, 2, 2)
        images = task.vae.decode_from_latent(task.vae.encode_to_latent(images))
    keep = torch.ones(3, 1, 16, 16, dtype=torch.float64)  # holes of whole 8 x 8 latent cells
    keep[0, :, :8, :8], keep[1, :, 8:], keep[2, ..., 8:] = 0, 0, 0
    known, chain = keep.bool().expand_as(images), respace(sched, 5)
    z0 = task.vae.encode_to_latent(images) if latent else images
    restored, raw = restore(_OracleModel(sched, z0), task, chain, images, keep, torch.Generator().manual_seed(2))
    torch.testing.assert_close(raw, images, rtol=0, atol=1e-6)
    torch.testing.assert_close(restored, images, rtol=0, atol=1e-6)
    assert (images * keep - images)[~known].abs().mean() > 0.02  # the masked input differs: the model filled it in
    restored, raw = restore(_NoisyModel(), task, chain, images, keep, torch.Generator().manual_seed(2))
    assert torch.equal(restored[known], images[known]) and torch.equal(restored[~known], raw[~known])
    assert (raw[known] - images[known]).abs().mean() > 1e-3


def test_sdedit_minus_starts_from_the_noised_masked_image():
    # SDEdit-: the masked image noised to t0 = strength * T, then the reverse chain from there given E = 0
    args, _, _, task, _, sched = _tiny("restoration")
    chain = respace(sched, 10)
    images = torch.rand(2, 3, 16, 16, dtype=torch.float64) * 2 - 1
    keep = torch.ones(2, 1, 16, 16, dtype=torch.float64)
    keep[..., 8:] = 0
    calls = []

    class Recorder(_OracleModel):
        def forward(self, z, t, encodings):
            calls.append((int(t[0]), all(float(e.abs().max()) == 0 for e in encodings)))
            return super().forward(z, t, encodings)
    out = sdedit_minus(Recorder(sched, images * keep), task, chain, images, keep, torch.Generator().manual_seed(0),
                       strength=0.5)
    kept = chain[1].tolist()
    assert [t for t, _ in calls] == [k for k in kept if k <= 0.5 * 999][::-1] and all(blank for _, blank in calls)
    torch.testing.assert_close(out, images * keep, rtol=0, atol=1e-6)  # the oracle of the masked image: itself


def test_half_masks_zero_one_half():
    keep = half_mask(400, 8, torch.Generator().manual_seed(0))
    assert keep.shape == (400, 1, 8, 8) and torch.all(keep.sum(dim=(1, 2, 3)) == 32)
    halves = {(int(k[0, :, :4].sum()), int(k[0, :4].sum())) for k in keep}  # kept pixels in the left / top half
    assert halves == {(0, 16), (32, 16), (16, 0), (16, 32)}  # left, right, top, bottom zeroed: all four occur


#################################################################################
#                      End to end: every setting on the synthetic set           #
#################################################################################

def _run(tmp_path, *argv):
    run_dir = main([*TINY, "--results-dir", str(tmp_path), *argv])
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    return run_dir, rows


def _check_run(run_dir, rows, steps, metric):
    """metrics.csv has finite losses at every step, the final checkpoint, grid and evaluation exist."""
    assert [int(r["step"]) for r in rows] == list(range(1, steps + 1))
    assert all(math.isfinite(float(r[k])) for r in rows for k in ("loss", "mse", "decoder"))
    ckpt = torch.load(os.path.join(run_dir, "checkpoints", f"{steps:07d}.pt"), weights_only=False)
    assert ckpt["step"] == steps and {"model", "ema", "opt", "args"} <= set(ckpt)
    assert os.path.isfile(os.path.join(run_dir, "samples", f"{steps:07d}.png"))
    with open(os.path.join(run_dir, "eval.csv")) as f:
        metrics = {r["metric"]: float(r["value"]) for r in csv.DictReader(f)}
    assert math.isfinite(metrics[metric])
    return ckpt, metrics


@pytest.mark.slow  # masked-image runs in test_exact_resume
@pytest.mark.parametrize("setting,extra,metric", [
    ("restoration", (), "known_error_m5"), ("image-label", (), "generated_label_accuracy"),
    ("translation", (), "psnr_translation"), ("translation", ("--direction", "BtoA"), "class_iou"),
    ("image-representation", (), "embedding_cosine")])
def test_setting_trains_and_evaluates(tmp_path, setting, extra, metric):
    run_dir, rows = _run(tmp_path, "--setting", setting, "--steps", "2", *extra)
    _, metrics = _check_run(run_dir, rows, 2, metric)
    if setting == "restoration":  # Table 1 protocol, m = 5/10/15/20 patches and half masks, with SDEdit-
        with open(os.path.join(run_dir, "restoration.csv")) as f:
            table = list(csv.DictReader(f))
        assert [r["mask"] for r in table] == ["m5", "m10", "m15", "m20", "half"]
        # a 2-step model is not consistent on the known pixels before paste-back (pasted output would give 0)
        assert all(float(r["known_error"]) > 1e-3 and float(r["sdedit_known_error"]) > 1e-3 for r in table)
        assert all(0 <= float(r["judge_accuracy"]) <= 1 for r in table)
    if setting == "image-label":  # the judge reads the generated labels; the heads' top-1 on held-out images
        assert 0 <= metrics["generated_label_accuracy"] <= 1 and 0 <= metrics["label_top1"] <= 1
        assert math.isfinite(metrics["fd_synthetic"])
    if extra:  # image -> colour-coded label map: Table 4's label metrics
        assert all(0 <= metrics[k] <= 1 for k in ("pixel_accuracy", "class_accuracy", "class_iou"))


@pytest.mark.slow
def test_exact_resume(tmp_path):
    """masked-image (the default setting): 4 steps straight == 2 steps, then --resume auto to 4."""
    straight, rows = _run(tmp_path / "a", "--steps", "4", "--ckpt-every", "2")
    a, metrics = _check_run(straight, rows, 4, "psnr_masked_m10")
    assert metrics["known_error_half"] > 1e-3 and math.isfinite(metrics["fd_synthetic"])
    _run(tmp_path / "b", "--steps", "2")
    resumed, rows = _run(tmp_path / "b", "--steps", "4", "--resume", "auto")
    assert resumed == glob.glob(str(tmp_path / "b" / "*"))[0]  # the same run folder, metrics.csv appended
    b, _ = _check_run(resumed, rows, 4, "psnr_masked_m10")
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert all(torch.equal(a["opt"]["state"][i]["exp_avg"], b["opt"]["state"][i]["exp_avg"])
               for i in a["opt"]["state"])


@pytest.mark.slow
def test_latent_mode_with_a_small_random_vae(tmp_path):
    """--latent: E and z_0 are SD-VAE latents (4 channels, 8x smaller), restored and decoded."""
    from common.safetensors_io import save_safetensors
    from common.vae import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 32, 32, 32), layers_per_block=1)  # 3 downsamplings: 8x
    save_safetensors(vae.state_dict(), str(tmp_path / "vae.safetensors"))
    run_dir, rows = _run(tmp_path, "--steps", "1", "--latent", "--vae", str(tmp_path / "vae.safetensors"),
                         "--image-size", "32")
    ckpt, metrics = _check_run(run_dir, rows, 1, "psnr_masked_m10")
    assert ckpt["model"]["unet.input_blocks.0.0.weight"].shape[1] == 8  # -X: z_t and E(X), 4 latent channels each
    assert metrics["known_error_m10"] > 1e-3  # decoded before paste-back: the model and the VAE are not exact


@pytest.mark.slow
def test_image_representation_with_given_embeddings(tmp_path, capsys):
    """--embeddings: row i of an (N, D) .npy is item i's embedding, the target of the 1024-ReLU-D head."""
    table = np.random.default_rng(0).normal(size=(10_000, 6)).astype(np.float32)
    np.save(tmp_path / "emb.npy", table)
    run_dir, rows = _run(tmp_path / "run", "--setting", "image-representation", "--steps", "1",
                         "--embeddings", str(tmp_path / "emb.npy"))
    ckpt, _ = _check_run(run_dir, rows, 1, "embedding_mse_train")  # no held-out rows given: named for it
    assert ckpt["model"]["head.2.weight"].shape == (6, 1024)
    np.save(tmp_path / "held_out.npy", table[::-1].copy())  # rows of the --eval-data items
    run_dir, rows = _run(tmp_path / "held", "--setting", "image-representation", "--steps", "1", "--embeddings",
                         str(tmp_path / "emb.npy"), "--eval-data", "synthetic", "--eval-embeddings",
                         str(tmp_path / "held_out.npy"))
    _, metrics = _check_run(run_dir, rows, 1, "embedding_cosine")
    assert "embedding_cosine_train" not in metrics
    args = parse_args(["--setting", "image-representation", *TINY, "--embeddings", str(tmp_path / "emb.npy"),
                       "--eval-data", "synthetic", "--eval-embeddings", str(tmp_path / "held_out.npy")])
    _, eval_set, task, *_ = build(args, torch.device("cpu"))
    batch = next(iter(torch.utils.data.DataLoader(eval_set, batch_size=3)))
    _, x = task.prepare(batch, torch.device("cpu"), flip=False, held_out=True)  # the held-out items' own rows
    torch.testing.assert_close(x, torch.from_numpy(table[::-1][:3].copy()))
    np.save(tmp_path / "bad.npy", table[:10])
    with pytest.raises(SystemExit):
        _run(tmp_path / "run", "--setting", "image-representation", "--embeddings", str(tmp_path / "bad.npy"))
    assert "(10000, D)" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_only_writes_adm_npz_samples(tmp_path):
    """--eval-only --num-fid-samples: translations of held-out sources as an ADM .npz, and the held-out targets
    they translate (in the same order) as the reference batch."""
    from common.adm_npz import to_uint8
    run_dir, _ = _run(tmp_path, "--setting", "translation", "--steps", "1")
    out = main(["--eval-only", "--ckpt", os.path.join(run_dir, "checkpoints", "0000001.pt"), *TINY,
                "--num-fid-samples", "5", "--eval-batch-size", "2"])
    samples = np.load(os.path.join(out, "fid-samples-2", "samples.npz"))["arr_0"]
    targets = np.load(os.path.join(out, "fid-samples-2", "targets", "samples.npz"))["arr_0"]
    assert samples.shape == targets.shape == (5, 16, 16, 3) and samples.dtype == np.uint8
    eval_set = build(parse_args(["--setting", "translation", *TINY]), torch.device("cpu"))[1]
    expected = to_uint8(torch.stack([eval_set[i][1] for i in range(5)])).numpy()
    assert np.array_equal(targets, expected)
