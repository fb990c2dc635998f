"""eval/bench.py: the FLOP formula against PyTorch's FLOP counter, the CPU memory probe, and a tiny end-to-end run."""
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from common.diffusion import create_diffusion
from common.dit import DiT
from common.named_models import create_model
from eval import bench


@pytest.mark.parametrize("patch,depth,width", [(2, 3, 64), (4, 2, 96)])
def test_dit_forward_flops_match_flop_counter(patch, depth, width):
    model = DiT(input_size=16, patch_size=patch, in_channels=4, hidden_size=width, depth=depth, num_heads=4,
                num_classes=10).eval()
    x, t, y = torch.randn(3, 4, 16, 16), torch.randint(0, 1000, (3,)), torch.randint(0, 10, (3,))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # math SDPA = countable bmm's
        model(x, t, y)
    assert bench.dit_forward_flops(model, 3) == counter.get_total_flops()


def test_cpu_peak_memory_counts_saved_activations():
    x = torch.randn(1000, requires_grad=True)
    assert bench.peak_memory(lambda: x.exp().sum().backward(), torch.device("cpu")) == 1000 * 4  # exp saves its output
    assert bench.peak_memory(lambda: (x * x).sum().backward(), torch.device("cpu")) == 2 * 1000 * 4  # both operands


def test_quick_run_prints_every_ratio(capsys):
    results = bench.main(["--quick", "--model", "DiT-Ti/4", "--latent-size", "8", "--batch-size", "2", "--iters", "1",
                          "--warmup", "0", "--sampling-steps", "2"])
    out = capsys.readouterr().out
    for key in ["anchor_speedup", "anchor_dtr_ratio", "anchor_ant_uw_ratio", "anchor_ours_tflops", "dtr_step_ratio", "dtr_memory_ratio", "images_per_s", "tflops", "dp_seconds", "sampler_steps_per_s",
                "ant_uw_ratio", "ant_pcgrad_ratio", "ant_nash_ratio", "taskdiffusion_3step_ratio"]:
        assert math.isfinite(results[key]) and results[key] > 0, key
    assert 0.99 < results["dtr_memory_ratio"] < 1.01  # DTR saves one (B, 1, C) mask per block: no real extra memory
    assert "ours / official" in out and "MFU n/a" in out and results["anchor_ours_mfu"] is None  # no peak on CPU
    assert "ratio dtr/vanilla" in out and "[dp]" in out and "[sampler]" in out and "ratio pcgrad/vanilla" in out


def test_unknown_section_is_one_line_error(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "dtr,nope"])
    assert "unknown --only section" in capsys.readouterr().err


def test_official_recipe_is_our_model_with_written_out_attention(monkeypatch):
    """The anchor's 'official' side must be the same model: same loss and gradients on the same inputs (fp32), only
    the attention computed as softmax(QK^T / sqrt(d)) V instead of by SDPA."""
    torch.manual_seed(0)
    ours = create_model("DiT-Ti/4", 8, 4, 10)
    with torch.no_grad():  # adaLN-Zero would make every block the identity: give the attention something to do
        for p in ours.parameters():
            p.normal_(0, 0.1)
    official = bench.official_recipe(ours)
    diffusion = create_diffusion("", "cosine", learn_sigma=True)
    x, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 10])
    t, noise = torch.tensor([0, 400, 999]), torch.randn(3, 4, 8, 8)
    losses, grads = [], []
    for model in (ours, official):
        torch.manual_seed(1)  # the same label-dropout draws
        loss = bench.recipe_loss(model, diffusion, x, y, t, noise, bf16=True)  # autocast is a no-op on CPU
        loss.backward()
        losses.append(loss)
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # fp32 reassociation: SDPA vs softmax(QK^T)V
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", None)  # official never calls it
    bench.recipe_loss(official, diffusion, x, y, t, noise, bf16=False)


def test_gpu_check_tiny_runs_every_part_and_writes_the_table(tmp_path, capsys):
    out = tmp_path / "gpu_check.md"
    results = bench.main(["--gpu-check", "--tiny", "--gpu-check-out", str(out)])
    table = out.read_text()
    assert table.strip() in capsys.readouterr().out
    assert "FAILED" not in table and "skipped" not in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 11 and sum("n/a" in row for row in rows) == 1  # MFU alone: no bf16 peak on CPU
    for key in ["anchor_speedup", "smoke_start_loss", "smoke_end_loss", "sampler_images_per_s", "td_train_step_s",
                "td_infer_3step_ms_per_image"]:
        assert math.isfinite(results[key]) and results[key] > 0, key
    assert results["torchrun"] == "ok, replicas in sync"


def test_gpu_check_stops_starting_parts_after_its_budget(tmp_path):
    out = tmp_path / "gpu_check.md"
    results = bench.main(["--gpu-check", "--tiny", "--gpu-check-budget", "0", "--gpu-check-out", str(out)])
    table = out.read_text()
    assert "anchor_speedup" in results and "smoke_start_loss" not in results  # the first part, then nothing
    assert table.count("skipped (time)") == 4


def test_gpu_check_without_a_gpu_is_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit):
        bench.main(["--gpu-check"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tiny" in err
