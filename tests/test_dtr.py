"""DTR (dtr.py): routing masks against the spec's worked numbers, exactness of the DTR blocks, and runs."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import dtr
from common.diffusion import create_diffusion
from common.dit import DiT
from common.named_models import create_model
from common.training_run import latest_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dtr_mask_matches_spec_example():
    m = dtr.routing_mask("dtr", 1024, 1000, beta=0.8, alpha=4.0)
    assert m.shape == (1000, 1024) and (m.sum(1) == 819).all()
    starts = m.argmax(1)
    for t, s in zip([0, 100, 250, 500, 750, 900, 999], [0, 0, 1, 13, 65, 135, 205]):
        assert starts[t].item() == s
        assert m[t, s:s + 819].all() and m[t].sum() == 819  # one contiguous window
    assert (starts[1:] >= starts[:-1]).all()  # drifts monotonically to the high channels


def test_random_mask_seeded_and_none_is_ones():
    a, b, c = (dtr.routing_mask("random", 64, 50, beta=0.5, seed=s) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c) and (a.sum(1) == 32).all()
    assert torch.equal(dtr.routing_mask("none", 8, 5), torch.ones(5, 8))
    assert torch.equal(dtr.routing_mask("dtr", 8, 5, beta=1.0), torch.ones(5, 8))
    with pytest.raises(ValueError):
        dtr.routing_mask("bogus", 8)


def _tiny_dit(**kw):
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=3, **kw)
    for p in model.parameters():  # leave adaLN-Zero's identity init so blocks actually do something
        torch.nn.init.normal_(p, std=0.05)
    return model.eval()  # eval: no random label dropout, so two forwards are comparable


def test_dit_with_beta_one_equals_vanilla_and_adds_no_parameters():
    vanilla, routed = _tiny_dit(), _tiny_dit()
    dtr.add_task_routing(routed, "dtr", beta=1.0)
    x, t, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 1, 2, 0])
    assert torch.equal(vanilla(x, t, y), routed(x, t, y))
    dtr.add_task_routing(routed, "dtr", beta=0.5)
    assert not torch.allclose(vanilla(x, t, y), routed(x, t, y))
    assert sum(p.numel() for p in routed.parameters()) == sum(p.numel() for p in vanilla.parameters())
    assert routed.state_dict().keys() == vanilla.state_dict().keys()  # masks are non-persistent buffers


def test_dit_router_is_eq8_block_by_block():
    model = dtr.add_task_routing(_tiny_dit(), "dtr", beta=0.5)
    block, x, c, t = model.blocks[0], torch.randn(2, 16, 32), torch.randn(2, 32), torch.tensor([3, 900])
    m = dtr.routing_mask("dtr", 32, beta=0.5)[t].unsqueeze(1)
    expected = block(m * x, c) + (1 - m) * x
    out = model.router(block, x, c, t, 0)
    torch.testing.assert_close(out, expected)
    # the residual branch reads only the active channels: a change on inactive channels passes straight through
    delta = torch.randn_like(x) * (1 - m)
    torch.testing.assert_close(model.router(block, x + delta, c, t, 0), out + delta)


def test_random_routing_draws_one_mask_per_block_rebuilt_from_seed_and_block():
    """R-TR as upstream: an independent mask per block; ours is a function of (mask seed, block index)."""
    def masks(seed):
        model = dtr.add_task_routing(_tiny_dit(), "random", beta=0.5, seed=seed)
        return [model.router.mask_of_block(i) for i in range(len(model.blocks))]
    first, again, other = masks(3), masks(3), masks(4)
    assert not torch.equal(first[0], first[1])  # blocks differ
    for a, b in zip(first, again):
        assert torch.equal(a, b)  # rebuilt, not stored
    assert not torch.equal(first[0], other[0])
    for i, m in enumerate(first):
        assert torch.equal(m, dtr.routing_mask("random", 32, beta=0.5, seed=3, block=i))
        assert (m.sum(1) == 16).all()
    # each block really uses its own mask: block 1 under block 0's mask gives a different output
    model = dtr.add_task_routing(_tiny_dit(), "random", beta=0.5, seed=3)
    block, x, c, t = model.blocks[1], torch.randn(2, 16, 32), torch.randn(2, 32), torch.tensor([3, 900])
    m1 = first[1][t].unsqueeze(1)
    torch.testing.assert_close(model.router(block, x, c, t, 1), block(m1 * x, c) + (1 - m1) * x)
    # ADM: one mask per routed block as well
    adm = dtr.add_task_routing(create_model("ADM-S", 16, 3, 4), "random", beta=0.5, seed=3)
    routers = [m.router for m in adm.modules() if getattr(m, "router", None) is not None]
    assert len({id(r) for r in routers}) == len(routers)
    same_width = [r.mask for r in routers if r.mask.shape[1] == routers[0].mask.shape[1]]
    assert len(same_width) > 1 and not torch.equal(same_width[0], same_width[1])


def test_adm_routing_beta_one_exact_and_masks_shared_per_width():
    torch.manual_seed(0)
    vanilla = create_model("ADM-S", 16, 3, 4)
    routed = create_model("ADM-S", 16, 3, 4)
    routed.load_state_dict(vanilla.state_dict())
    for p in list(vanilla.parameters()):
        torch.nn.init.normal_(p, std=0.05)
    routed.load_state_dict(vanilla.state_dict())
    vanilla.eval(), routed.eval()
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([5, 700]), torch.tensor([1, 3])
    dtr.add_task_routing(routed, "dtr", beta=1.0)
    assert torch.equal(vanilla(x, t, y), routed(x, t, y))
    dtr.add_task_routing(routed, "dtr", beta=0.8)
    assert not torch.allclose(vanilla(x, t, y), routed(x, t, y))
    routed_blocks = [m for m in routed.modules() if getattr(m, "router", None) is not None]
    widths = {(m.in_layers[0] if hasattr(m, "in_layers") else m.norm).num_channels for m in routed_blocks}
    routers = {id(m.router): m.router for m in routed_blocks}
    assert len(routers) == len(widths) > 1  # one shared mask per channel width (skip concats add widths)
    for m in routed_blocks:
        assert m.router.mask.shape == (1000, (m.in_layers[0] if hasattr(m, "in_layers") else m.norm).num_channels)
    assert routed.state_dict().keys() == vanilla.state_dict().keys()


def test_respaced_sampling_routes_with_the_training_timestep():
    seen = []
    model = dtr.add_task_routing(_tiny_dit(), "dtr")
    original = model.router.forward
    model.router.forward = lambda block, x, c, t, i: (seen.append(t.clone()), original(block, x, c, t, i))[1]
    d = create_diffusion("10", "linear", learn_sigma=True)
    d.p_sample_loop(model, (1, 3, 8, 8), model_kwargs=dict(y=torch.tensor([1])))
    used = sorted({int(t) for t in torch.cat(seen)})
    assert used == sorted(d.timestep_map.tolist()) and max(used) == 999


def test_unknown_model_is_one_line_error(capsys):
    with pytest.raises(SystemExit) as e:
        dtr.parse_args(["--model", "DiT-Q/3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown --model 'DiT-Q/3'" in err and "DiT-XL/2" in err and "ADM" in err


def _run_args(tmp_path, steps, extra=()):
    return ["--results-dir", str(tmp_path), "--steps", str(steps), "--image-size", "16", "--global-batch-size", "4",
            "--log-every", "1", "--ckpt-every", "3", "--sample-every", "1000", "--num-sampling-steps", "2",
            "--lr", "1e-3", *extra]


def _final_weights(run_dir):
    return torch.load(latest_checkpoint(run_dir), map_location="cpu", weights_only=False)


def test_training_run_writes_outputs_and_resume_is_exact(tmp_path):
    straight = dtr.main(_run_args(tmp_path / "a", 6))
    for name in ["log.txt", "metrics.csv", "routing_mask.png", "samples/0000006.png", "checkpoints/0000006.pt"]:
        assert os.path.exists(os.path.join(straight, name)), name
    first = dtr.main(_run_args(tmp_path / "b", 3))
    resumed = dtr.main(_run_args(tmp_path / "b", 6, ["--resume", "auto"]))
    assert resumed == first
    a, b = _final_weights(straight), _final_weights(resumed)
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["ema"]:
        assert torch.equal(a["ema"][k], b["ema"][k]), k
    rows = open(os.path.join(resumed, "metrics.csv")).read().strip().splitlines()
    assert len(rows) == 1 + 6  # header + one row per logged step, across the interruption


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_matches_uninterrupted(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "dtr.py"), *_run_args(tmp_path / "k", 100_000)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = tmp_path / "k" / "000-dtr-DiT-Ti-4-dtr-beta0.8-alpha4-none-cosine" / "log.txt"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and "step 0000002" in log.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()[-2000:]
    stopped = _final_weights(str(log.parent))["step"]
    assert stopped >= 2
    resumed = dtr.main(_run_args(tmp_path / "k", stopped + 2, ["--resume", "auto"]))
    straight = dtr.main(_run_args(tmp_path / "s", stopped + 2))
    a, b = _final_weights(resumed), _final_weights(straight)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path, run_script):
    run_script(["dtr.py", *_run_args(tmp_path, 4, ["--loss-weight", "ant-uw", "--ant-k", "2"])], nproc=2)
    run_dir = os.path.join(tmp_path, "000-dtr-DiT-Ti-4-dtr-beta0.8-alpha4-ant-uw-cosine")
    log = open(os.path.join(run_dir, "log.txt")).read()
    assert "world size 2" in log and "replicas in sync: True" in log
    assert "uw_weight_1" in open(os.path.join(run_dir, "metrics.csv")).readline()


def test_sample_only_writes_adm_npz(tmp_path):
    import numpy as np
    run_dir = dtr.main(_run_args(tmp_path, 2))
    ckpt = torch.load(latest_checkpoint(run_dir), map_location="cpu", weights_only=False)
    torch.manual_seed(1)  # EMA weights of a model past adaLN-Zero's identity start, so the routing shows
    ckpt["ema"] = {k: torch.randn_like(v) * 0.05 if k != "pos_embed" else v for k, v in ckpt["ema"].items()}
    torch.save(ckpt, latest_checkpoint(run_dir))
    path = dtr.main(["--sample-only", "--ckpt", latest_checkpoint(run_dir), "--num-samples", "5",
                     "--sample-batch-size", "3", "--num-sampling-steps", "3", "--sampler", "ddim"])
    arr = np.load(path)["arr_0"]
    assert arr.shape == (5, 16, 16, 3) and arr.dtype == np.uint8
    assert os.path.exists(os.path.join(os.path.dirname(path), "samples.png"))
    assert os.path.exists(dtr.main(["--cka", "--ckpt", latest_checkpoint(run_dir)]))
    # = the EMA weights with the DTR routing rebuilt, sampled by hand with the same draws (and not without routing)
    from common.adm_npz import to_uint8
    from common.sampling import sample_images
    ema = _final_weights(run_dir)["ema"]
    expected = []
    for routing in ("dtr", "none"):
        model = dtr.add_task_routing(create_model("DiT-Ti/4", 16, 3, 4), routing)
        model.load_state_dict(ema)
        gen = torch.Generator().manual_seed(0)
        chunks = []
        for n in (3, 2):  # --sample-batch-size 3
            labels = torch.randint(0, 4, (n,), generator=gen)
            chunks.append(to_uint8(sample_images(model.eval(), labels, (3, 16, 16), sampler="ddim", num_steps=3,
                                                 cfg_scale=1.5, noise_schedule="cosine", latent=False,
                                                 generator=gen)))
        expected.append(torch.cat(chunks).numpy())
    np.testing.assert_array_equal(arr, expected[0])
    assert not np.array_equal(arr, expected[1])


def test_linear_cka_properties():
    X = torch.randn(64, 10, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64))
    assert dtr.linear_cka(X, X).item() == pytest.approx(1.0)
    assert dtr.linear_cka(X, 3.0 * X @ Q + 5.0).item() == pytest.approx(1.0)  # orthogonal + scale + shift invariant
    assert dtr.linear_cka(X, torch.randn(64, 10, dtype=torch.float64)).item() < 0.4


def test_timestep_cka_equals_block_output_cka_by_hand():
    """CKA[b, i, j] = linear CKA (d x d form, Kornblith et al. Eq. 4) of block b's outputs at t_i and t_j."""
    model, d = _tiny_dit(), create_diffusion("", "linear", learn_sigma=True)
    x0, y, ts = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2]), [0, 300, 999]
    torch.manual_seed(7)
    cka = dtr.timestep_cka(model, d, x0, y, ts)
    torch.manual_seed(7)
    noise = torch.randn_like(x0)
    feats = []  # feats[i][b]: (n, tokens * width) output of block b at t_i
    for t in ts:
        outs = []
        hooks = [blk.register_forward_hook(lambda m, i, o: outs.append(o.flatten(1).double())) for blk in model.blocks]
        tt = torch.full((6,), t)
        with torch.no_grad():
            model(d.q_sample(x0, tt, noise), tt, y)
        for h in hooks:
            h.remove()
        feats.append(outs)

    def cka_d_by_d(X, Y):
        X, Y = X - X.mean(0), Y - Y.mean(0)
        return (Y.T @ X).norm() ** 2 / ((X.T @ X).norm() * (Y.T @ Y).norm())
    for b in range(len(model.blocks)):
        for i in range(3):
            for j in range(3):
                assert cka[b, i, j].item() == pytest.approx(cka_d_by_d(feats[i][b], feats[j][b]).item(), abs=1e-5)
    assert cka[:, 0, 2].max() < 0.999  # distinct timesteps really differ


def test_timestep_cka_shape_and_diagonal(tmp_path):
    model = dtr.add_task_routing(_tiny_dit(), "dtr")
    d = create_diffusion("", "linear", learn_sigma=True)
    cka = dtr.timestep_cka(model, d, torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2]), [0, 300, 999])
    assert cka.shape == (2, 3, 3)
    torch.testing.assert_close(torch.diagonal(cka, dim1=1, dim2=2), torch.ones(2, 3, dtype=cka.dtype))
    assert torch.equal(cka, cka.transpose(1, 2))
    dtr.save_cka_png(cka, str(tmp_path / "cka.png"))
    assert (tmp_path / "cka.png").exists()


#################################################################################
#            Protocol fidelity: unconditional runs, eta, resume safety          #
#################################################################################

@pytest.mark.parametrize("model_name", ["DiT-Ti/4", "ADM-S"])
def test_one_class_is_an_unconditional_run_sampled_without_guidance(tmp_path, model_name, capsys):
    """As the DTR authors for FFHQ: no label dropout, a 1-row label table, no guidance at sampling."""
    run_dir = dtr.main(_run_args(tmp_path, 2, ["--num-classes", "1", "--model", model_name]))
    ckpt = _final_weights(run_dir)
    assert ckpt["args"]["unconditional"] and ckpt["args"]["num_classes"] == 1
    table = "y_embedder.embedding_table.weight" if model_name.startswith("DiT") else "label_emb.weight"
    assert ckpt["ema"][table].shape[0] == 1
    path = dtr.main(["--sample-only", "--ckpt", latest_checkpoint(run_dir), "--num-samples", "2",
                     "--num-sampling-steps", "2"])
    assert "cfg1.0" in path
    with pytest.raises(SystemExit) as e:
        dtr.main(["--sample-only", "--ckpt", latest_checkpoint(run_dir), "--num-samples", "2",
                  "--num-sampling-steps", "2", "--cfg-scale", "1.5"])
    assert e.value.code == 2 and "unconditional" in capsys.readouterr().err


def test_unconditional_flag_drops_labels_of_a_labelled_set(tmp_path):
    run_dir = dtr.main(_run_args(tmp_path, 1, ["--unconditional"]))
    ckpt = _final_weights(run_dir)
    assert ckpt["args"]["num_classes"] == 1 and ckpt["ema"]["y_embedder.embedding_table.weight"].shape[0] == 1


def test_ddim_eta_reaches_the_sampler(tmp_path):
    import numpy as np
    ckpt = latest_checkpoint(dtr.main(_run_args(tmp_path, 1)))
    outs = []
    for eta in ("0", "1", "0"):
        path = dtr.main(["--sample-only", "--ckpt", ckpt, "--num-samples", "2", "--num-sampling-steps", "4",
                         "--sampler", "ddim", "--ddim-eta", eta])
        outs.append(np.load(path)["arr_0"].copy())
    assert np.array_equal(outs[0], outs[2]) and not np.array_equal(outs[0], outs[1])


def test_resume_refuses_other_training_settings_and_names_runs_by_them(tmp_path, capsys):
    first = dtr.main(_run_args(tmp_path, 2))
    assert os.path.basename(first) == "000-dtr-DiT-Ti-4-dtr-beta0.8-alpha4-none-cosine"
    ckpt = latest_checkpoint(first)
    with pytest.raises(SystemExit) as e:
        dtr.main(_run_args(tmp_path, 4, ["--resume", ckpt, "--beta", "0.5", "--loss-weight", "min-snr"]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--beta 0.8 (now 0.5)" in err and "--loss-weight none (now min-snr)" in err
    with pytest.raises(SystemExit):  # same folder name, other global batch: refused too
        dtr.main(_run_args(tmp_path, 4, ["--resume", "auto", "--global-batch-size", "8"]))
    assert "--global-batch-size 4 (now 8)" in capsys.readouterr().err
    # a sweep point with another beta gets its own folder instead of resuming the first
    other = dtr.main(_run_args(tmp_path, 1, ["--resume", "auto", "--beta", "0.5"]))
    assert os.path.basename(other) == "001-dtr-DiT-Ti-4-dtr-beta0.5-alpha4-none-cosine"


def test_resume_applies_the_new_lr_and_logs_it(tmp_path):
    run_dir = dtr.main(_run_args(tmp_path, 3))
    dtr.main(_run_args(tmp_path, 6, ["--resume", "auto", "--lr", "5e-4"]))
    ckpt = _final_weights(run_dir)
    assert ckpt["step"] == 6 and ckpt["opt"]["param_groups"][0]["lr"] == 5e-4
    assert "lr 0.001 -> 0.0005" in open(os.path.join(run_dir, "log.txt")).read()


def test_ant_uw_batch_not_divisible_by_k_is_an_error_at_start(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        dtr.main(_run_args(tmp_path, 2, ["--loss-weight", "ant-uw", "--ant-k", "3"]))
    assert e.value.code == 2 and "not divisible by --ant-k 3" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(tmp_path, "000-dtr-DiT-Ti-4-dtr-beta0.8-alpha4-ant-uw-cosine",
                                           "checkpoints", "0000002.pt"))


#################################################################################
#                    Reliability: one-line errors, no silent mix-ups            #
#################################################################################

def _write_images(folder, n):
    from PIL import Image
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (16, 16), (i * 9 % 256, 40, 90)).save(folder / f"{i}.png")


@pytest.mark.parametrize("case", ["image-size", "not-images", "too-small", "data-is-a-file"])
def test_bad_inputs_are_one_line_errors(tmp_path, case, capsys):
    extra = {"image-size": ["--image-size", "33"], "data-is-a-file": ["--data", str(tmp_path / "a.txt")],
             "not-images": ["--data", str(tmp_path / "texts")], "too-small": ["--data", str(tmp_path / "few")]}[case]
    (tmp_path / "a.txt").write_text("not a folder")
    (tmp_path / "texts" / "c").mkdir(parents=True)
    (tmp_path / "texts" / "c" / "readme.txt").write_text("hello")
    _write_images(tmp_path / "few" / "c", 3)  # 3 images < one global batch of 4
    with pytest.raises(SystemExit) as e:
        dtr.main(_run_args(tmp_path / "r", 2, extra))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert {"image-size": "divisible by its patch size", "data-is-a-file": "is a file, not a folder",
            "not-images": "no images", "too-small": "fewer than one global batch"}[case] in err


def test_a_failed_start_leaves_no_run_folder(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "dtr.py"), *_run_args(tmp_path, 2),
                           "--loss-weight", "ant-uw", "--ant-k", "3"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "not divisible by --ant-k 3" in proc.stderr
    assert os.listdir(tmp_path) == []


def test_a_checkpoint_of_the_other_script_is_refused(tmp_path, capsys):
    import ant_clustering as ant
    dtr_ckpt = latest_checkpoint(dtr.main(_run_args(tmp_path / "d", 1)))
    with pytest.raises(SystemExit) as e:
        ant.main(["--sample-only", "--ckpt", dtr_ckpt, "--num-samples", "2", "--num-sampling-steps", "2"])
    assert e.value.code == 2 and "trained by dtr.py, not ant_clustering.py" in capsys.readouterr().err
    ant_ckpt = latest_checkpoint(ant.main(_run_args(tmp_path / "a", 1, ["--k", "2", "--clustering", "timestep"])))
    with pytest.raises(SystemExit) as e:
        dtr.main(["--sample-only", "--ckpt", ant_ckpt, "--num-samples", "2", "--num-sampling-steps", "2"])
    assert e.value.code == 2 and "trained by ant_clustering.py, not dtr.py" in capsys.readouterr().err
    assert not any(n.startswith("samples-") for n in os.listdir(os.path.dirname(os.path.dirname(dtr_ckpt))))


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_both_ranks_within_a_step(tmp_path):
    """Under torchrun the ranks agree on a stop after every step (a slow step must not outlast torchrun's grace):
    the checkpoint is written at most two steps after the signal, not at the next multiple of 10."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "dtr.py"), *_run_args(tmp_path, 100_000, ["--model", "DiT-S/4", "--image-size", "32",
                                                                        "--global-batch-size", "8"])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = tmp_path / "000-dtr-DiT-S-4-dtr-beta0.8-alpha4-none-cosine" / "log.txt"
    deadline = time.time() + 240
    while time.time() < deadline and not (log.exists() and "step 0000002" in log.read_text()):
        time.sleep(0.1)
    signalled_after = max(int(line.split("step ")[1][:7]) for line in log.read_text().splitlines()
                          if line.split("] ", 1)[-1].startswith("step "))
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    stopped = _final_weights(str(log.parent))["step"]
    assert signalled_after <= stopped <= signalled_after + 2, (signalled_after, stopped)
    assert "stop signal received" in log.read_text()
