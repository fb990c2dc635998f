"""eval/bench.py: the FLOP formula against PyTorch's FLOP counter, the CPU memory probe, and a tiny end-to-end run."""
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from common.dit import DiT
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
    for key in ["dtr_step_ratio", "dtr_memory_ratio", "images_per_s", "tflops", "dp_seconds", "sampler_steps_per_s",
                "ant_uw_ratio", "ant_pcgrad_ratio", "ant_nash_ratio", "taskdiffusion_3step_ratio"]:
        assert math.isfinite(results[key]) and results[key] > 0, key
    assert 0.99 < results["dtr_memory_ratio"] < 1.01  # DTR saves one (B, 1, C) mask per block: no real extra memory
    assert "ratio dtr/vanilla" in out and "[dp]" in out and "[sampler]" in out and "ratio pcgrad/vanilla" in out


def test_unknown_section_is_one_line_error(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "dtr,nope"])
    assert "unknown --only section" in capsys.readouterr().err
