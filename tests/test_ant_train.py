"""ANT (ant_clustering.py) sections 4-6: the per-step MTL logic against first-principles gradients, the training loop
for every --mtl method, exact resume, DDP, the interval specialist and the negative-transfer-gap sampler."""
import csv
import functools
import math
import os

import numpy as np
import pytest
import torch

import ant_clustering as ant
from common.dit import DiT
from common.sampling import sample_images
from common.training_run import latest_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


#################################################################################
#                 mtl_backward against hand-computed gradients                  #
#################################################################################

class ToyDiffusion:
    """training_losses without randomness: per-sample loss = mean((model(x, t) - 1)^2) * (1 + t / 1000)."""

    def training_losses(self, model, x, t, model_kwargs=None, mse_weight=None):
        out = model(x, t, **(model_kwargs or {}))
        return {"loss": ((out - 1) ** 2).flatten(1).mean(1) * (1 + t.float() / 1000)}


class ToyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)
        self.scale = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x, t, y=None):
        return self.lin(x) * self.scale + torch.sin(t.float())[:, None]


def toy_problem(k=3, per_cluster=2):
    torch.manual_seed(0)
    model = ToyModel()
    clusters = ant.ClusterLoss(ant.uniform_intervals(1000, k))
    x, y = torch.randn(k * per_cluster, 3), torch.zeros(k * per_cluster, dtype=torch.long)
    t = clusters.sample_timesteps(k * per_cluster, torch.Generator().manual_seed(1))
    loss_fn = functools.partial(ant.batch_cluster_losses, ToyDiffusion(), model, x, y, t, clusters, bf16=False)
    return model, list(model.parameters()), loss_fn


def reference_cluster_grads(params, loss_fn):
    """[k, D] cluster gradients from the shared graph (no separate forwards)."""
    losses, present = loss_fn(False)
    return ant.per_cluster_grads(losses, params, present), losses.detach()


def flat_grad(params):
    return torch.cat([p.grad.reshape(-1) for p in params])


def test_separate_graphs_give_the_same_cluster_losses_and_gradients():
    model, params, loss_fn = toy_problem()
    shared, losses = reference_cluster_grads(params, loss_fn)
    separate_losses, present = loss_fn(True)
    torch.testing.assert_close(torch.stack(separate_losses).detach(), losses)
    torch.testing.assert_close(ant.per_cluster_grads(separate_losses, params, present), shared)
    assert losses.sum().item() > 0 and not torch.allclose(shared[0], shared[1])


def test_each_cluster_backward_runs_through_its_own_samples_only():
    model, params, loss_fn = toy_problem(k=3, per_cluster=2)
    seen = []  # batch size of every backward through the model's linear layer

    def record_backward_batch(module, inputs, out):
        out.register_hook(lambda grad: seen.append(len(grad)))
    model.lin.register_forward_hook(record_backward_batch)
    losses, present = loss_fn(True)
    ant.per_cluster_grads(losses, params, present)
    assert seen == [2, 2, 2]  # k backwards of B/k samples: one batch backward in all
    seen.clear()
    losses, present = loss_fn(False)
    ant.per_cluster_grads(losses, params, present)
    assert seen == [6, 6, 6]  # shared graph: every backward runs through the whole batch


def test_mtl_backward_pcgrad_ls_rlw_match_closed_forms():
    model, params, loss_fn = toy_problem()
    grads, losses = reference_cluster_grads(params, loss_fn)
    step = 7
    expected = {"pcgrad": ant.pcgrad(grads, torch.Generator().manual_seed(3 * 1_000_003 + step)),
                "ls": grads.sum(0),
                "rlw": ant.rlw_weights(3, torch.Generator().manual_seed(3 * 1_000_003 + step)) @ grads}
    for method, want in expected.items():
        model.zero_grad(set_to_none=True)
        got_losses, weights = ant.mtl_backward(method, loss_fn, params, ant.mtl_state(method, 3, seed=3), step)
        torch.testing.assert_close(flat_grad(params), want)
        torch.testing.assert_close(got_losses, losses)
        assert weights.shape == (3,)


def test_mtl_backward_uw_gradients_and_weights():
    model, params, loss_fn = toy_problem()
    state = ant.mtl_state("uw", 3)
    with torch.no_grad():
        state["uw"].log_vars.copy_(torch.tensor([0.3, -0.2, 1.0]))
    grads, losses = reference_cluster_grads(params, loss_fn)
    model.zero_grad(set_to_none=True)
    _, weights = ant.mtl_backward("uw", loss_fn, params, state, 0)
    w = torch.exp(-torch.tensor([0.3, -0.2, 1.0]))
    torch.testing.assert_close(weights, w)
    torch.testing.assert_close(flat_grad(params), 0.5 * w @ grads)  # d/dtheta sum_i 0.5 exp(-s_i) L_i
    torch.testing.assert_close(state["uw"].log_vars.grad, 0.5 * (1 - w * losses))  # d/ds_i: 0.5 (1 - e^-s L)


def test_mtl_backward_nash_update_and_reuse_steps():
    model, params, loss_fn = toy_problem()
    state = ant.mtl_state("nash", 3)
    grads, _ = reference_cluster_grads(params, loss_fn)
    model.zero_grad(set_to_none=True)
    _, alpha = ant.mtl_backward("nash", loss_fn, params, state, 0)  # step 0: alpha solved from G G^T
    gtg = (grads.double() @ grads.double().T).numpy()
    ghat = gtg / np.linalg.norm(gtg)  # ANT's scale: the condition on the normalised Gram
    np.testing.assert_allclose(alpha.numpy() * (ghat @ alpha.double().numpy()), np.ones(3), rtol=1e-3)
    combined = alpha @ grads
    clip = min(1.0, 1.0 / (combined.norm().item() + 1e-6))  # clip_grad_norm_(1)
    torch.testing.assert_close(flat_grad(params), combined * clip)
    model.zero_grad(set_to_none=True)
    calls = []
    state["nash"].solve_weights = lambda gtg: calls.append(1)  # must not be called between updates
    _, again = ant.mtl_backward("nash", loss_fn, params, state, 1)
    assert not calls and torch.equal(again, alpha)
    torch.testing.assert_close(flat_grad(params), combined * clip)  # same batch, same alpha -> same update


def test_cluster_loss_state_round_trip_and_errors():
    a = ant.ClusterLoss([(0, 9), (10, 29), (30, 99)])
    b = ant.ClusterLoss(ant.uniform_intervals(100, 3))
    b.load_state_dict(a.state_dict())
    assert b.interval_list == [(0, 9), (10, 29), (30, 99)] and torch.equal(b.cluster_of, a.cluster_of)
    t = b.sample_timesteps(6)
    assert torch.equal(b.cluster_of[t], torch.tensor([0, 0, 1, 1, 2, 2]))
    with pytest.raises(ValueError, match="divisible"):
        b.sample_timesteps(7)
    with pytest.raises(ValueError, match="unknown MTL method"):
        ant.mtl_state("mgda", 3)


def test_timestep_clustering_is_the_uniform_dp_optimum():
    cost = ant.timestep_cost(1000)
    for k in (2, 5, 7):
        uniform = ant.clustering_intervals("timestep", k, np.linspace(0.999, 0.001, 1000))
        assert uniform == ant.uniform_intervals(1000, k)
        best = ant.interval_clustering(cost, k)  # ties: the DP may return other sizes, at the same cost
        assert sum(cost[l, r] for l, r in uniform) == sum(cost[l, r] for l, r in best)


#################################################################################
#                       Negative transfer gap sampler (Eq. 3)                   #
#################################################################################

def tiny_dit(seed):
    torch.manual_seed(seed)
    model = DiT(input_size=8, patch_size=4, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=3)
    for p in model.parameters():  # leave adaLN-Zero's identity init so the models really differ
        torch.nn.init.normal_(p, std=0.05)
    model.null_class = 3  # as create_model sets it
    return model.eval()


def recording(model, log, name):
    forward = model.forward

    def wrapped(x, t, y):
        log.append((name, sorted(set(t.tolist()))))
        return forward(x, t, y)
    model.forward = wrapped
    return model


def ntg_samples(model, seed=0, steps=10):
    labels = torch.tensor([0, 1, 2])
    return sample_images(model, labels, (3, 8, 8), num_steps=steps, cfg_scale=1.5, noise_schedule="cosine",
                         generator=torch.Generator().manual_seed(seed))


def test_ntg_switch_with_itself_equals_generalist():
    gen = tiny_dit(0)
    assert torch.equal(ntg_samples(ant.IntervalSwitch(gen, gen, 200, 399)), ntg_samples(gen))


def test_ntg_switch_uses_specialist_only_inside_the_interval():
    log = []
    gen, spec = recording(tiny_dit(0), log, "generalist"), recording(tiny_dit(1), log, "specialist")
    switched = ntg_samples(ant.IntervalSwitch(gen, spec, 200, 399))
    assert {name for name, _ in log} == {"generalist", "specialist"}
    for name, ts in log:
        assert all((200 <= t <= 399) == (name == "specialist") for t in ts), (name, ts)
    assert not torch.equal(switched, ntg_samples(tiny_dit(0)))
    # a mixed batch (not produced by the samplers, but allowed) takes each sample from its own model
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([250, 600]), torch.tensor([0, 1])
    out = ant.IntervalSwitch(tiny_dit(0), tiny_dit(1), 200, 399)(x, t, y)
    torch.testing.assert_close(out[0], tiny_dit(1)(x, t, y)[0])
    torch.testing.assert_close(out[1], tiny_dit(0)(x, t, y)[1])


#################################################################################
#                                Training runs                                  #
#################################################################################

def run_args(results, steps, extra=()):
    return ["--results-dir", str(results), "--steps", str(steps), "--image-size", "16", "--global-batch-size", "4",
            "--k", "2", "--clustering", "timestep", "--log-every", "1", "--ckpt-every", "2", "--sample-every", "1000",
            "--num-sampling-steps", "2", "--lr", "1e-3", *extra]


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("method", ["uw", "pcgrad", "nash", "ls", "rlw", "none"])
def test_every_mtl_method_trains_and_logs_cluster_columns(tmp_path, method):
    run_dir = ant.main(run_args(tmp_path, 2, ["--mtl", method]))
    rows = read_metrics(run_dir)
    assert len(rows) == 2
    for row in rows:
        assert math.isfinite(float(row["loss"]))
        # stratified batches fill every cluster; vanilla's uniform t may leave one empty in a step (blank cell)
        values = [row[f"loss_c{i}"] for i in range(2)]
        assert all(math.isfinite(float(v)) for v in values if v or method != "none")
        assert ("weight_c1" in row) == (method != "none")
    assert os.path.exists(os.path.join(run_dir, "samples", "0000002.png"))
    ckpt = torch.load(latest_checkpoint(run_dir), map_location="cpu", weights_only=False)
    assert ckpt["clusters"]["intervals"].tolist() == [[0, 499], [500, 999]]
    assert ("uw" in ckpt) == (method == "uw") and ("nash" in ckpt) == (method == "nash")
    # the logged weights are the method's own, read back from its state where it has one
    weights = [[float(row[f"weight_c{i}"]) for i in range(2)] for row in rows] if method != "none" else None
    if method in ("ls", "pcgrad"):
        assert weights == [[1.0, 1.0]] * 2
    elif method == "rlw":  # a fresh softmax draw every step
        assert all(sum(w) == pytest.approx(1.0) for w in weights) and weights[0] != weights[1]
    elif method == "uw":  # a row logs the weights exp(-s) its step used: s = 0 first, then after one AdamW step
        assert weights[0] == [1.0, 1.0]
        # Adam's first two steps move each s_i by the uw lr (0.025) in its gradient's direction
        np.testing.assert_allclose(np.log(weights[1]), 0.5 * (-ckpt["uw"]["log_vars"]).numpy(), rtol=1e-3)
        np.testing.assert_allclose(np.abs(np.log(weights[1])), 0.025, rtol=1e-3)
    elif method == "nash":
        np.testing.assert_allclose(weights[-1], ckpt["nash"]["alpha"].tolist(), rtol=1e-5)
        assert weights[0] == weights[1]  # solved at step 0, reused until step 25


def test_gradient_clustering_measures_affinity_on_the_synthetic_set(tmp_path):
    extra = ["--clustering", "gradient", "--affinity-timesteps", "3", "--affinity-images", "4", "--mtl", "ls"]
    run_dir = ant.main(run_args(tmp_path, 1, extra))
    affinity = np.load(os.path.join(run_dir, "affinity.npy"))
    assert affinity.shape == (1000, 1000) and os.path.exists(os.path.join(run_dir, "affinity.png"))
    np.testing.assert_allclose(np.diag(affinity)[[0, 500, 999]], 1.0, atol=1e-6)  # measured points: cos(g, g) = 1
    log = open(os.path.join(run_dir, "log.txt")).read()
    for kind in ("timestep", "snr", "gradient"):
        assert f"{kind} clustering, k=2:" in log
    # the same affinity file drives --clustering gradient on its own, and --task-affinity re-measures it
    ckpt = latest_checkpoint(run_dir)
    expected = ant.interval_clustering(ant.affinity_cost(affinity), 2, *ant.paper_size_bounds(1000, 2))
    again = ant.main(run_args(tmp_path / "b", 1, ["--clustering", "gradient", "--affinity",
                                                   os.path.join(run_dir, "affinity.npy"), "--mtl", "ls"]))
    saved = torch.load(latest_checkpoint(again), map_location="cpu", weights_only=False)["clusters"]["intervals"]
    assert [tuple(i) for i in saved.tolist()] == expected
    measured = ant.main(["--task-affinity", ckpt, ckpt, "--affinity-timesteps", "3", "--affinity-images", "4",
                         "--proj-dim", "0", "--k", "2"])
    assert measured.shape == (1000, 1000)
    # = the exact affinity of the checkpoint's training weights (not its EMA) on the first 4 images, by hand
    from common.named_models import create_model
    from data.labelled_images import create_dataset, fixed_batch
    from common.diffusion import create_diffusion
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    model = create_model("DiT-Ti/4", 16, 3, 4)
    model.load_state_dict(state["model"])
    x, y = fixed_batch(create_dataset("synthetic", 16)[0], 4, "cpu", False)
    ts = [0, 500, 999]
    direct = ant.diffusion_affinity(model, create_diffusion("", "cosine"), x, y, ts, proj_dim=None)
    np.testing.assert_allclose(measured[np.ix_(ts, ts)], direct, atol=1e-6)
    assert abs(direct[0, 2]) < 0.999  # distinct timesteps: not trivially 1


@pytest.mark.parametrize("method", ["nash", "uw"])
def test_resume_is_exact_with_mtl_state(tmp_path, method):
    straight = ant.main(run_args(tmp_path / "a", 4, ["--mtl", method]))
    first = ant.main(run_args(tmp_path / "b", 2, ["--mtl", method]))
    resumed = ant.main(run_args(tmp_path / "b", 4, ["--mtl", method, "--resume", "auto"]))
    assert resumed == first
    a, b = (torch.load(latest_checkpoint(d), map_location="cpu", weights_only=False) for d in (straight, resumed))
    assert a["step"] == b["step"] == 4
    for key in ("model", "ema", method):
        for name, value in a[key].items():
            if torch.is_tensor(value):
                assert torch.equal(value, b[key][name]), (key, name)
            else:
                np.testing.assert_array_equal(value, b[key][name])
    assert len(read_metrics(resumed)) == 4


def test_interval_specialist_draws_only_inside_its_range(tmp_path, monkeypatch):
    seen, original = [], ant.batch_cluster_losses

    def recording_losses(*args, **kwargs):  # args[4]: the batch's timesteps
        seen.append(args[4].clone())
        return original(*args, **kwargs)
    monkeypatch.setattr(ant, "batch_cluster_losses", recording_losses)
    run_dir = ant.main(run_args(tmp_path, 3, ["--mtl", "none", "--t-range", "600", "699"]))
    t = torch.cat(seen)
    assert len(t) == 12 and t.min() >= 600 and t.max() <= 699 and len(set(t.tolist())) > 3
    assert {"loss_c1"} <= set(read_metrics(run_dir)[0]) and "loss_c0" not in read_metrics(run_dir)[0]
    with pytest.raises(SystemExit):
        ant.parse_args(["--t-range", "600", "699"])  # --t-range needs --mtl none


def test_ntg_command_writes_both_sample_sets(tmp_path):
    generalist = latest_checkpoint(ant.main(run_args(tmp_path / "g", 1, ["--mtl", "uw"])))
    specialist = latest_checkpoint(ant.main(run_args(tmp_path / "s", 1, ["--mtl", "none", "--t-range", "0", "499"])))
    paths = ant.main(["--ntg", "--ckpt", generalist, "--specialist", specialist, "--t-range", "0", "499",
                      "--num-samples", "3", "--num-sampling-steps", "2", "--sample-batch-size", "3"])
    first, switched = (np.load(p)["arr_0"] for p in paths)
    assert first.shape == switched.shape == (3, 16, 16, 3) and not np.array_equal(first, switched)
    # the same noise and labels through a generalist / specialist switch built by hand (Eq. 3's sampler)
    from common.adm_npz import to_uint8
    from common.named_models import create_model
    from common.sampling import sample_images
    models = []
    for path in (generalist, specialist):
        m = create_model("DiT-Ti/4", 16, 3, 4)
        m.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["ema"])
        models.append(m.eval())

    class HandSwitch(torch.nn.Module):
        null_class = 4

        def forward(self, x, t, y):
            inside = ((t >= 0) & (t <= 499)).view(-1, 1, 1, 1)
            return torch.where(inside, models[1](x, t, y), models[0](x, t, y))
    for model, got in ((models[0], first), (HandSwitch(), switched)):
        gen = torch.Generator().manual_seed(0)
        labels = torch.randint(0, 4, (3,), generator=gen)
        images = sample_images(model, labels, (3, 16, 16), num_steps=2, cfg_scale=1.5, cfg_channels=3,
                               noise_schedule="cosine", latent=False, generator=gen)
        np.testing.assert_array_equal(got, to_uint8(images).numpy())


def test_batch_not_divisible_by_k_is_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ant.main(run_args(tmp_path, 1, ["--global-batch-size", "5"]))
    assert e.value.code == 2
    assert "not divisible by --k 2" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_processes_pcgrad_stay_in_sync(tmp_path, run_script):
    run_script(["ant_clustering.py", *run_args(tmp_path, 3, ["--mtl", "pcgrad", "--global-batch-size", "8"])], nproc=2)
    run_dir = os.path.join(tmp_path, "000-ant-DiT-Ti-4-timestep-k2-pcgrad-none-cosine")
    log = open(os.path.join(run_dir, "log.txt")).read()
    assert "world size 2, batch 4/rank" in log and "replicas in sync: True" in log
    assert len(read_metrics(run_dir)) == 3


def test_one_class_trains_and_samples_unconditionally(tmp_path, capsys):
    """As dtr.py (shared plumbing): a 1-row label table, no label dropout, no guidance at sampling."""
    run_dir = ant.main(run_args(tmp_path, 1, ["--num-classes", "1"]))
    ckpt = torch.load(latest_checkpoint(run_dir), map_location="cpu", weights_only=False)
    assert ckpt["args"]["unconditional"] and ckpt["ema"]["y_embedder.embedding_table.weight"].shape[0] == 1
    path = ant.main(["--sample-only", "--ckpt", latest_checkpoint(run_dir), "--num-samples", "2",
                     "--num-sampling-steps", "2"])
    assert "cfg1.0" in path
