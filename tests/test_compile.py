"""The fast path: torch.compile of a routed DiT compiles once whatever the timesteps, the training loops read
nothing back from the device between log steps, and gradient checkpointing leaves the gradients unchanged."""
import importlib
import os
import shutil
import subprocess
import traceback

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils._python_dispatch import TorchDispatchMode

import ant_clustering as ant
import dtr
from common.diffusion import create_diffusion
from common.dit import DiT, LabelEmbedder
from common.training_run import set_grad_checkpoint
from common.unet import UNetModel
from common.vit import VisionTransformer

#################################################################################
#                 torch.compile: one graph for every timestep batch              #
#################################################################################


def tiny_routed_dit():
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    return dtr.add_task_routing(model, "dtr")


def compile_counts(backend, grad_checkpoint=False, batches=4):
    """(frames compiled, graph breaks) of torch.compile(tiny DiT + DTR) over `batches` training steps with new
    timesteps each, then a 4-step DDPM loop of the compiled model in eval mode."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = tiny_routed_dit().train()
    model.grad_checkpoint = grad_checkpoint
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter)
    diffusion = create_diffusion("", "cosine")
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 4, 8, 8, generator=gen), torch.randint(0, 10, (4,), generator=gen)
    for _ in range(batches):
        t = torch.randint(0, 1000, (4,), generator=gen)
        diffusion.training_losses(compiled, x, t, dict(y=y))["loss"].mean().backward()
    training_frames = counter.frame_count
    compiled.eval()
    with torch.no_grad():
        create_diffusion("4", "cosine").p_sample_loop(compiled, x.shape, noise=x, model_kwargs=dict(y=y))
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    return training_frames, counter.frame_count - training_frames, breaks


@pytest.mark.parametrize("grad_checkpoint", [False, True])
def test_routed_dit_compiles_once_for_all_timesteps(grad_checkpoint):
    # aot_eager runs dynamo + AOT autograd (what decides recompiles and graph breaks) without a C++ compiler
    train_frames, eval_frames, breaks = compile_counts("aot_eager", grad_checkpoint)
    assert (train_frames, breaks) == (1, 0)  # 4 batches of new timesteps: one graph, no break
    assert eval_frames == 1  # eval mode (no label dropout) is a new graph, once, for all 4 sampler steps


def cxx_compiler_works():
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        return False
    probe = subprocess.run([cxx, "-x", "c++", "-", "-fsyntax-only"], input=b"int main(){}", capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not cxx_compiler_works(), reason="inductor on CPU needs a working C++ compiler")
def test_routed_dit_compiles_once_with_inductor():
    train_frames, eval_frames, breaks = compile_counts("inductor", batches=3)
    assert (train_frames, eval_frames, breaks) == (1, 1, 0)


#################################################################################
#          No host-device sync between log steps of the training loops           #
#################################################################################

aten = torch.ops.aten
# ops that make the host wait for a CUDA device: reading a value back, or output shapes that depend on the data
SYNCING_OPS = {aten._local_scalar_dense, aten.is_nonzero, aten.nonzero, aten.masked_select, aten.bincount,
               aten.unique_consecutive, aten._unique2, aten.unique_dim, aten.masked_scatter, aten.equal}


class SyncCounter(TorchDispatchMode):
    """Counts on CPU what would be a host-device sync on CUDA: the ops above, a bool-mask index (its shape depends on
    the data), and .tolist() / .numpy() / .cpu() (which read on CPU without an aten op). Not counted: reads made by
    the data loader and data sets, and by torch.optim (its step counts), which stay on the host in a GPU run too.
    `paused` stops counting."""

    HOST_SIDE = ("/torch/optim/", "/torch/utils/data/", f"{os.sep}data{os.sep}")

    def __init__(self):
        super().__init__()
        self.count, self.paused, self.where = 0, False, []

    def hit(self, what):
        if self.paused:
            return
        stack = traceback.extract_stack()[:-2]
        if any(part in f.filename for f in stack for part in self.HOST_SIDE):
            return
        self.count += 1
        frame = next((f for f in reversed(stack) if "/torch/" not in f.filename), None)
        self.where.append(f"{what} at {frame.filename}:{frame.lineno}" if frame else what)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bool_index = func is aten.index.Tensor and any(
            i is not None and i.dtype == torch.bool for i in args[1])
        if func.overloadpacket in SYNCING_OPS or func in SYNCING_OPS or bool_index:
            self.hit(str(func))
        return func(*args, **kwargs)


@pytest.fixture
def sync_counter(monkeypatch):
    counter = SyncCounter()
    for name in ("tolist", "numpy", "cpu"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            counter.hit(f"Tensor.{_name}")
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    # DiT's label range check runs on CPU only (skipped on CUDA, where it would be a sync): not the loop's
    monkeypatch.setattr(LabelEmbedder, "check_labels", lambda self, labels: None)
    return counter


def syncs_per_step(module, argv, counter, monkeypatch):
    """Run module.main(argv); returns [(step, syncs in the step outside end_of_step, syncs inside it)] over every
    training run main makes (task_diffusion trains the model and its baseline). end_of_step does the log-step and
    checkpoint reads; a run's step 1 also holds its set-up."""
    rows = []
    real = module.end_of_step

    def counted_end_of_step(run, args, step, *rest, **kwargs):
        outside, counter.count = counter.count, 0
        try:
            return real(run, args, step, *rest, **kwargs)
        finally:
            rows.append((step, outside, counter.count))
            counter.count = 0
    monkeypatch.setattr(module, "end_of_step", counted_end_of_step)
    with counter:
        module.main(argv)
    return rows


RUN = ["--steps", "6", "--global-batch-size", "4", "--log-every", "3", "--ckpt-every", "1000", "--sample-every", "1000"]
CLASS_CONDITIONAL = ["--image-size", "16", "--num-sampling-steps", "2", "--lr", "1e-3"]
LOOPS = {
    "dtr": (dtr, CLASS_CONDITIONAL),
    "dtr-ant-uw": (dtr, CLASS_CONDITIONAL + ["--loss-weight", "ant-uw", "--ant-k", "2"]),
    "ant-uw": (ant, CLASS_CONDITIONAL + ["--k", "2", "--clustering", "timestep", "--mtl", "uw"]),
    "ant-vanilla": (ant, CLASS_CONDITIONAL + ["--k", "2", "--clustering", "timestep"]),
    "ant-pcgrad": (ant, CLASS_CONDITIONAL + ["--k", "2", "--clustering", "timestep", "--mtl", "pcgrad"]),
    "mt-image-label": ("mt_diffusion", ["--setting", "image-label", "--image-size", "16", "--num-sampling-steps", "2",
                                        "--eval-samples", "4", "--eval-batch-size", "4"]),
    "taskdiffusion": ("task_diffusion", ["--image-size", "32", "--embed-dim", "32", "--num-eval", "2",
                                         "--decay-steps", "6"]),
}


@pytest.mark.parametrize("loop", list(LOOPS))
def test_training_loop_reads_nothing_back_between_log_steps(loop, tmp_path, sync_counter, monkeypatch):
    module, extra = LOOPS[loop]
    module = importlib.import_module(module) if isinstance(module, str) else module
    rows = syncs_per_step(module, ["--results-dir", str(tmp_path)] + RUN + extra, sync_counter, monkeypatch)
    assert [step for step, _, _ in rows][:6] == [1, 2, 3, 4, 5, 6]
    # steps 2..6 of every run: no read-back outside end_of_step
    assert [outside for step, outside, _ in rows if step > 1] == [0] * (len(rows) - len(rows) // 6), \
        sync_counter.where
    # the counter sees the log steps' reads (metrics() reads `running` at steps 3 and 6) and nothing else
    assert all((inside > 0) == (step % 3 == 0) for step, _, inside in rows), rows


#################################################################################
#                Gradient checkpointing: the same gradients                      #
#################################################################################

def gradients(model, loss_fn, seed=0):
    model.zero_grad()
    torch.manual_seed(seed)  # the same dropout / drop-path draws in both runs
    loss_fn(model).backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("kind", ["dit", "vit", "unet"])
def test_grad_checkpoint_gives_the_same_gradients(kind):
    torch.manual_seed(0)
    if kind == "dit":
        model = tiny_routed_dit().train()
        x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([3, 500, 999]), torch.tensor([1, 2, 3])
        loss_fn = lambda m: m(x, t, y).square().mean()
    elif kind == "vit":  # drop path on: the recomputation must replay the forward's random masks
        model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5,
                                  drop_path_rate=0.5).train()
        x = torch.randn(3, 3, 32, 32)
        loss_fn = lambda m: m(x).square().mean() + m.forward_features(x, layers=(2, 3))[0].square().mean()
    else:
        model = UNetModel(image_size=8, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
                          attention_resolutions=(2,), dropout=0.3, channel_mult=(1, 2), num_head_channels=8,
                          num_classes=4, use_scale_shift_norm=True).train()
        x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([10, 900]), torch.tensor([0, 3])
        loss_fn = lambda m: m(x, t, y).square().mean()
    with torch.no_grad():  # DiT's adaLN-Zero and the U-Net's zero convolutions would leave most gradients at 0
        for p in model.parameters():
            p.normal_(0, 0.2)
    plain = gradients(model, loss_fn)
    assert set_grad_checkpoint(model) > 0
    checkpointed = gradients(model, loss_fn)
    assert len(plain) == len(checkpointed) > 0
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

