"""TaskDiffusion (task_diffusion.py): schedule, time pairs and DDIM re-encoding from first principles, label encoder,
losses against hand-written formulas, module shapes per ablation flag, one training step per task set, resume, DDP."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import task_diffusion as td
from test_dense_data import pascal_root  # noqa: F401 (a fixture: the fake PASCAL-Context tree)
from data import dense
from data.synthetic import SyntheticShapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--image-size", "32", "--embed-dim", "32"]  # vit-tiny, 4x4 feature grid, C = 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny shapes: one thread is as fast as two and never spin-waits when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _args(*extra):
    return td.parse_args([*SMALL, *extra])


def _batch(tasks, n=2, size=32):
    """Synthetic images and labels; PASCAL's human_parts made from semseg (background ignored, one image unlabelled
    like PASCAL images without people)."""
    items = [SyntheticShapes(n, size, seed=3, dense=True)[i] for i in range(n)]
    batch = torch.utils.data.default_collate(items)
    if "human_parts" in tasks:
        parts = torch.where(batch["semseg"] == 0, td.IGNORE, batch["semseg"])
        parts[0] = td.IGNORE
        batch["human_parts"] = parts
    return td.to_device(batch, tasks, torch.device("cpu"))


#################################################################################
#                   Noise schedule and Algorithm 2's time pairs                  #
#################################################################################

def test_cosine_log_snr_is_the_cosine_schedule():
    t = torch.linspace(0, 1, 2001, dtype=torch.float64)
    log_snr = td.cosine_log_snr(t)
    alpha, sigma = td.alpha_sigma(log_snr)
    assert torch.allclose(alpha ** 2 + sigma ** 2, torch.ones_like(t), atol=1e-12)
    assert (log_snr[1:] <= log_snr[:-1]).all()  # monotone: more noise as t grows
    # sigmoid(-log(1/c^2 - 1)) = c^2: alpha is the cosine itself wherever the SNR clamp (1e5) is inactive
    c = torch.cos((t + 0.0002) / 1.00025 * math.pi / 2)
    free = c ** -2 - 1 > 1e-5
    assert free.float().mean() > 0.99 and (log_snr[free][1:] < log_snr[free][:-1]).all()
    assert torch.allclose(alpha[free], c[free], atol=1e-10)
    assert log_snr[0].item() == pytest.approx(math.log(1e5)) and alpha[-1] < 1e-3 and sigma[-1] > 0.999


def test_time_pairs_follow_algorithm_2():
    assert sum(td.time_pairs(3), ()) == pytest.approx((1, 1 / 3, 2 / 3, 0, 1 / 3, 0))  # the brief's example
    assert td.time_pairs(1) == [(1, 0)]
    for steps in range(1, 9):
        for t_diff in (0, 1, 2):
            pairs = td.time_pairs(steps, t_diff)
            for k, (t_now, t_next) in enumerate(pairs):
                assert t_now == pytest.approx(1 - k / steps)
                assert t_next == pytest.approx(max(1 - (1 + k + t_diff) / steps, 0))
            if t_diff == 0:  # symmetric DDIM: each step lands where the next one starts
                assert all(a[1] == pytest.approx(b[0]) for a, b in zip(pairs, pairs[1:]))


#################################################################################
#                              Label encoding                                   #
#################################################################################

def _perfect_logits(gt, tasks, scale=30.0):
    """Logits whose re-encoding is the ground truth: one-hot x scale, depth itself, edge +-scale, normals x 3."""
    out = {}
    for t, c in tasks.items():
        if t in td.CLASS_TASKS:
            out[t] = F.one_hot(gt[t].long(), c).permute(0, 3, 1, 2).float() * scale
        elif t == "edge":
            out[t] = (gt[t][:, None] * 2 - 1) * scale
        else:
            out[t] = gt[t] * 3 if t == "normals" else gt[t][:, None]
    return out


def test_label_encoder_range_ignore_index_and_invalid_pixels():
    tasks = td.output_channels("synthetic", td.DATASETS["synthetic"]["tasks"])
    _, gt = _batch(tasks)
    for joint in (True, False):
        enc = td.CrossTaskLabelEncoder(tasks, 32, scale=0.01, joint=joint).double()
        for p in enc.parameters():  # large weights push the sigmoid towards its ends (float64: no rounding to 1)
            nn.init.normal_(p, std=0.5)
        z = enc(td.encode_targets({t: y.double() for t, y in gt.items()}, tasks, (4, 4)))
        assert z.shape[1] == enc.out_channels == (32 + 8 if joint else 5 * 8)  # saliency concatenated separately
        assert 0.005 < z.abs().max() < 0.01  # inside the open interval (-scale, scale), and not trivially small
    # 255 -> the extra embedding row K
    gt_ignored = {**gt, "semseg": torch.full_like(gt["semseg"], td.IGNORE)}
    assert (td.encode_targets(gt_ignored, tasks, (4, 4))["semseg"] == 5).all()
    # ours ("masked"): pixels invalid in two different ways (depth 0 and -3) encode identically, the learned code
    enc = td.CrossTaskLabelEncoder(tasks, 32)
    hole = torch.zeros_like(gt["depth"], dtype=torch.bool)
    hole[:, :16] = True
    a, b = ({**gt, "depth": torch.where(hole, torch.full_like(gt["depth"], v), gt["depth"])} for v in (0.0, -3.0))
    za, zb = (enc(td.encode_targets(x, tasks, (4, 4), "masked")) for x in (a, b))
    assert torch.equal(za, zb) and not torch.equal(za, enc(td.encode_targets(gt, tasks, (4, 4), "masked")))
    # the authors' rule: only 255 is invalid (depth 0 is a value), weighted by the fraction of 255 channels, and the
    # 255s are interpolated as they are
    authors = td.encode_targets(a, tasks, (4, 4))
    assert torch.equal(authors["depth"][1], torch.zeros(2, 1, 4, 4))
    normals = gt["normals"].clone()
    normals[:, :, :, :12] = td.IGNORE  # the bilinear x8 downsampling samples columns 3.5, 11.5, ...
    values, invalid = td.encode_targets({**gt, "normals": normals}, tasks, (4, 4))["normals"]
    assert torch.equal(invalid[:, 0, :, 0], torch.ones(2, 4)) and torch.equal(invalid[:, 0, :, 2], torch.zeros(2, 4))
    assert torch.allclose(invalid[:, 0, :, 1], torch.full((2, 4), 0.5))  # column 11.5: half ignored
    assert (values[:, :, :, 1] > 100).all()  # 255 bled into the half-ignored cells, as theirs


def test_reencoded_perfect_prediction_equals_training_code():
    """Algorithm 2's re-encoding of a perfect prediction gives the same cross-task map as Algorithm 1's encoding."""
    tasks = td.output_channels("synthetic", td.DATASETS["synthetic"]["tasks"])
    _, gt = _batch(tasks, size=8)  # labels at the feature grid itself: no downsampling involved
    enc = td.CrossTaskLabelEncoder(tasks, 32)
    x0_train = enc(td.encode_targets(gt, tasks, (8, 8)))
    x0_sample = enc(td.reencode_predictions(_perfect_logits(gt, tasks), tasks))
    assert torch.allclose(x0_train, x0_sample, atol=1e-7)


#################################################################################
#                       Sampler: DDIM with re-encoding                           #
#################################################################################

class OracleDecoder(nn.Module):
    """Returns the perfect logits of fixed labels whatever z is; records what the sampler passes in."""

    def __init__(self, gt, tasks):
        super().__init__()
        self.gt, self.tasks, self.calls = gt, tasks, []

    def forward(self, z, log_snr, levels, feats, upsample=True):
        self.calls.append((z.clone(), log_snr.clone(), upsample))
        logits = _perfect_logits(self.gt, self.tasks)
        return ({t: F.interpolate(x, scale_factor=4) for t, x in logits.items()} if upsample else logits), None


def test_ddim_sampler_reencodes_predictions_each_step():
    tasks = td.output_channels("synthetic", td.DATASETS["synthetic"]["tasks"])
    model = td.build_model(_args("--image-size", "64")).eval()
    images, _ = _batch(tasks, size=64)
    _, gt = _batch(tasks, size=8)  # labels at the 8x8 feature grid
    model.decoder = oracle = OracleDecoder(gt, tasks)
    logits, _ = td.ddim_sample(model, images, steps=3, generator=torch.Generator().manual_seed(5))
    x0 = model.label_encoder(td.encode_targets(gt, tasks, (8, 8)))  # what a perfect prediction re-encodes to
    zs = [z for z, _, _ in oracle.calls]
    assert len(zs) == 3 and [u for _, _, u in oracle.calls] == [False, False, True]
    assert torch.equal(zs[0], torch.randn(zs[0].shape, generator=torch.Generator().manual_seed(5)))
    pairs = td.time_pairs(3)
    for k, (t_now, t_next) in enumerate(pairs[:-1]):
        a, s = td.alpha_sigma(td.cosine_log_snr(torch.tensor(t_now)))
        a_next, s_next = td.alpha_sigma(td.cosine_log_snr(torch.tensor(t_next)))
        expected = a_next * x0 + s_next * (zs[k] - a * x0) / s  # DDIM: keep the implied noise, swap in x0
        assert torch.allclose(zs[k + 1], expected, atol=1e-6)
        assert torch.allclose(oracle.calls[k][1], td.cosine_log_snr(torch.tensor([t_now])).expand(2))
    # a correct x0 drives z to the clean code at t = 0: the starting noise is scaled down to sigma(0) ~ 3e-3
    assert (zs[-1] - x0).abs().max() < 4e-3 * zs[0].abs().max()
    last = td.resize({t: F.interpolate(x, scale_factor=4) for t, x in _perfect_logits(gt, tasks).items()}, (64, 64))
    assert all(torch.equal(logits[t], last[t]) for t in tasks)  # the output is the last step's logits


#################################################################################
#                         Losses against hand-written formulas                   #
#################################################################################

def test_task_losses_match_upstream_formulas():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 4, 4, generator=g)
    y = (torch.rand(2, 4, 4, generator=g) > 0.7).float()
    y[0, 0] = td.IGNORE
    valid = y != td.IGNORE
    p, w = torch.sigmoid(x[:, 0]), 0.95  # edge: w * positive term + (1 - w) * negative term, mean over valid
    hand = -(w * y * p.log() + (1 - w) * (1 - y) * (1 - p).log())[valid].mean()
    assert td.task_loss("edge", x, y, 0.95).item() == pytest.approx(hand.item(), rel=1e-5)

    logits = torch.randn(2, 2, 4, 4, generator=g)  # saliency: class-balanced CE, w_pos = fraction of negatives
    w_pos = ((y == 0) & valid).sum() / valid.sum()
    nll = -logits.log_softmax(1).gather(1, y.clamp(max=1).long()[:, None])[:, 0]
    hand = (torch.where(y == 1, w_pos, 1 - w_pos) * nll)[valid].sum() / valid.sum()
    assert td.task_loss("sal", logits, y).item() == pytest.approx(hand.item(), rel=1e-5)

    pred, gt = torch.randn(2, 3, 4, 4, generator=g), F.normalize(torch.randn(2, 3, 4, 4, generator=g), dim=1)
    gt[:, :, 0] = 0  # zero normals = invalid
    hand = (F.normalize(pred, dim=1) - gt).abs().sum(1)[:, 1:].mean()  # L1 summed over xyz, mean over pixels
    assert td.task_loss("normals", pred, gt).item() == pytest.approx(hand.item(), rel=1e-5)
    depth = torch.rand(2, 4, 4, generator=g) * 5
    depth[:, 0] = 0
    hand = (x[:, 0] - depth).abs()[:, 1:].mean()
    assert td.task_loss("depth", x, depth).item() == pytest.approx(hand.item(), rel=1e-5)


#################################################################################
#                     Module shapes and one training step                        #
#################################################################################

ABLATIONS = [[], ["--interaction", "concat"], ["--interaction", "cross-attn"], ["--no-level-interaction"],
             ["--label-encoding", "separate"], ["--decoder", "task-specific"], ["--decoder", "none"]]


@pytest.mark.parametrize("flags", ABLATIONS, ids=lambda f: " ".join(f) or "default")
def test_shapes_of_every_ablation(flags):
    args = _args("--dataset", "pascal", "--data-root", "unused", "--backbone", "vit-tiny", *flags)
    tasks = td.output_channels("pascal", args.tasks)
    model = td.build_model(args)
    images, targets = _batch(tasks)
    logits, aux = model(images, targets)
    assert {t: tuple(x.shape) for t, x in logits.items()} == {t: (2, c, 32, 32) for t, c in tasks.items()}
    if args.decoder != "none":
        assert {t: x.shape for t, x in aux.items()} == {t: x.shape for t, x in logits.items()}
        z_channels = 32 + 8 if args.label_encoding == "cross-task" else 5 * 8
        assert model.label_encoder.out_channels == z_channels
    model.eval()
    logits, relations = td.predict(model, images, steps=2)
    assert {t: tuple(x.shape) for t, x in logits.items()} == {t: (2, c, 32, 32) for t, c in tasks.items()}
    if args.decoder == "cross-task" and args.interaction == "task":
        assert len(relations) == 2 and len(relations[0]) == 4  # per step, per level
        A = relations[-1][0]
        assert A.shape == (2, 5, 5, 4, 4) and A.min() > 0 and A.max() < 1  # sigmoid relation maps
    else:
        assert relations is None


TASK_SETS = [("synthetic", [t]) for t in td.DATASETS["synthetic"]["tasks"]] + [("pascal", ["human_parts"]),
    ("synthetic", list(td.DATASETS["synthetic"]["tasks"])),
    ("nyud", list(td.DATASETS["nyud"]["tasks"])),
    ("pascal", list(td.DATASETS["pascal"]["tasks"]))]


@pytest.mark.parametrize("dataset,tasks", TASK_SETS, ids=lambda x: x if isinstance(x, str) else ",".join(x))
def test_training_steps_every_parameter_gets_a_gradient_and_the_loss_drops(dataset, tasks):
    args = _args("--dataset", dataset, "--data-root", "unused", "--backbone", "vit-tiny", "--tasks", ",".join(tasks))
    model = td.build_model(args)
    images, targets = _batch(td.output_channels(dataset, tasks))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for step in range(3):
        torch.manual_seed(0)  # the same noise level and noise each step: the loss must drop on this batch
        loss, per_task = td.training_loss(model, images, targets, dataset, args.aux_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:
            assert set(per_task) == set(tasks)
            # every trainable parameter gets a gradient: DDP (find_unused_parameters=False) would fail otherwise
            assert all(p.grad is not None and torch.isfinite(p.grad).all()
                       for p in model.parameters() if p.requires_grad)
        opt.step()
        losses.append(loss.item())
    assert math.isfinite(losses[0]) and losses[-1] < losses[0]


#################################################################################
#                          Command line and runs                                 #
#################################################################################

def test_paper_defaults_and_bad_data_root(tmp_path, capsys):
    pascal = td.parse_args(["--dataset", "pascal", "--data-root", str(tmp_path)])
    assert (pascal.steps, pascal.global_batch_size, pascal.lr, pascal.weight_decay, pascal.grad_clip) == \
        (40_000, 4, 2e-5, 1e-6, 10.0)
    assert (pascal.backbone, pascal.embed_dim, pascal.aux_weight, pascal.image_size) == ("vit-l", 376, 0.25, 512)
    nyud = td.parse_args(["--dataset", "nyud", "--data-root", str(tmp_path), "--backbone", "vit-b"])
    assert (nyud.lr, nyud.embed_dim, nyud.aux_weight, nyud.image_size) == (1e-5, 576, 0.125, (448, 576))
    # stochastic depth 0.15 in the paper presets (utils/common_config.py get_backbone), 0 in the CPU demo
    assert (pascal.drop_path, nyud.drop_path, td.parse_args([]).drop_path) == (0.15, 0.15, 0.0)
    with torch.device("meta"):  # ViT-L without allocating it
        vit = td.build_model(pascal).encoder.vit
    assert len(vit.blocks) == 24 and vit.blocks[0].drop_path_rate == 0.0
    assert vit.blocks[-1].drop_path_rate == pytest.approx(0.15) and vit.blocks[12].drop_path_rate == pytest.approx(
        0.15 * 12 / 23)
    with pytest.raises(SystemExit):
        td.create_dense_dataset(pascal, "train")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "JPEGImages" in err and "semseg" in err
    with pytest.raises(SystemExit):
        td.parse_args(["--decoder", "task-specific", "--label-encoding", "cross-task"])


def _run_args(root, steps, *extra):
    return _args("--steps", str(steps), "--decay-steps", "4", "--global-batch-size", "4", "--ckpt-every", "2",
                 "--log-every", "1", "--num-eval", "4", "--results-dir", str(root), *extra)


@pytest.mark.slow
def test_resume_is_exact_and_eval_only(tmp_path):
    cpu = torch.device("cpu")
    _, straight, straight_ema = td.train(_run_args(tmp_path / "a", 4), 0, 1, cpu)
    td.train(_run_args(tmp_path / "b", 2), 0, 1, cpu)
    run, resumed, resumed_ema = td.train(_run_args(tmp_path / "b", 4, "--resume", "auto"), 0, 1, cpu)
    for a, b in [(straight, resumed), (straight_ema, resumed_ema)]:
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    rows = open(os.path.join(run.dir, "metrics.csv")).read().strip().splitlines()
    assert len(rows) == 1 + 4  # header + one row per step across the interruption
    results = td.main(["--eval-only", "--ckpt", os.path.join(run.dir, "checkpoints", "0000004.pt"), "--num-eval", "4",
                       "--sampling-steps", "2"])  # the model is rebuilt from the checkpoint's arguments
    assert set(results) == set(td.DATASETS["synthetic"]["tasks"]) and all(map(math.isfinite, results.values()))
    assert os.path.exists(os.path.join(run.dir, "predictions_task_relations_step2.png"))


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path, run_script):
    out = run_script(["task_diffusion.py", *SMALL, "--steps", "2", "--global-batch-size", "4", "--num-eval", "4",
                      "--log-every", "1", "--no-baseline", "--results-dir", tmp_path], nproc=2)
    run_dir = os.path.join(tmp_path, "000-taskdiffusion-synthetic-vit-tiny-cross-task")
    log = open(os.path.join(run_dir, "log.txt")).read()
    assert "world size 2" in log and "replicas in sync: True" in log
    assert "Delta_m" not in out.stdout and "semseg mIoU" in out.stdout  # rank 0 evaluated and printed once
    for name in ["results.txt", "predictions.png", "predictions_task_relations_step3.png", "checkpoints/0000002.pt"]:
        assert os.path.exists(os.path.join(run_dir, name)), name


def test_random_flip_mirrors_image_and_labels_together_and_turns_normals():
    torch.manual_seed(3)
    images = torch.randn(8, 3, 4, 5)
    targets = {"semseg": torch.randint(0, 5, (8, 4, 5)), "normals": F.normalize(torch.randn(8, 3, 4, 5), dim=1)}
    flipped, out = dense.random_flip_batch(images, targets)
    was_flipped = [not torch.equal(flipped[b], images[b]) for b in range(8)]
    assert 0 < sum(was_flipped) < 8
    for b, f in enumerate(was_flipped):
        mirror = (lambda x: x.flip(-1)) if f else (lambda x: x)
        assert torch.equal(flipped[b], mirror(images[b])) and torch.equal(out["semseg"][b], mirror(targets["semseg"][b]))
        n = mirror(targets["normals"][b]).clone()
        n[0] = -n[0] if f else n[0]  # the x component of a mirrored normal changes sign
        assert torch.equal(out["normals"][b], n)


#################################################################################
#          The authors' checkpoints: peer check against their model              #
#################################################################################
# tests/fixtures/taskdiffusion_authors_{pascal,nyud}.json: the state_dict() keys and shapes of the authors' model
# (YuqiYang213/TaskDiffusion: TaskDiffusionWrapper(MLoRE ViT, Crosstask_diffusion_decoder)) built in a scratch
# venv for a tiny config: our vit-tiny ViT (4 blocks, width 96, patch 8, select_list 1/2/3 + the final norm),
# C = 16, their task sets, 16x24 images, module_layer 3, aux heads, bit scale 1; .npz: their outputs in eval
# mode for a seeded image, z_T, targets (their layout, ignore regions as their pipeline marks them), t and noise.

FIXTURES = os.path.join(ROOT, "tests", "fixtures")


def _authors_fixture(name):
    with open(os.path.join(FIXTURES, f"taskdiffusion_authors_{name}.json")) as f:
        meta = json.load(f)
    return meta, dict(np.load(os.path.join(FIXTURES, f"taskdiffusion_authors_{name}.npz")))


def _authors_weights(meta):
    """The fixture's deterministic fill: one generator, keys in sorted order (BatchNorm statistics included)."""
    g = torch.Generator().manual_seed(meta["seed"])
    state = {}
    for key in sorted(meta["keys"]):
        shape = meta["keys"][key]
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros(shape, dtype=torch.long)
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(shape, generator=g)
        elif len(shape) >= 2:
            state[key] = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        else:
            state[key] = 0.5 * torch.randn(shape, generator=g)
    return state


def _authors_file(tmp_path, name, edit=None):
    """The weights saved as the authors' main.py does: DDP keys under 'model', plus their resume entries."""
    meta, ref = _authors_fixture(name)
    state = _authors_weights(meta)
    if edit is not None:
        edit(state)
    path = str(tmp_path / f"taskdiffusion_{name}.pth.tar")
    torch.save({"model": {"module." + k: v for k, v in state.items()}, "optimizer": {"state": {}}, "epoch": 3,
                "iter_count": 39_999}, path)
    return path, meta, ref


def _our_targets(ref, tasks):
    """Their (B, c, H, W) label maps -> ours: (B, H, W) for one-channel maps, class maps as int64."""
    out = {}
    for t in tasks:
        y = torch.from_numpy(ref[f"target_{t}"])
        out[t] = y if t == "normals" else y[:, 0].long() if t in ("semseg", "human_parts") else y[:, 0]
    return out


@pytest.mark.parametrize("name", ["pascal", "nyud"])
def test_authors_checkpoint_reproduces_their_outputs(tmp_path, capsys, name):
    path, meta, ref = _authors_file(tmp_path, name)
    # the fixture's bit scale is 1 (theirs 0.01) so that the labels visibly steer the outputs; a flag, not a weight
    args = td.parse_args(["--eval-only", "--ckpt", path, "--image-size", "16", "24", "--scale", str(meta["scale"])])
    model, targs, _, _ = td.model_for_eval(args)  # what --eval-only runs: format detection, key map, strict load
    log = capsys.readouterr().out.strip().splitlines()
    assert len(log) == 2 and "the authors' checkpoint format" in log[0]
    assert "optimizer, epoch, iter_count" in log[1]  # their resume entries are skipped, and said so
    assert (targs.dataset, targs.backbone, targs.embed_dim, targs.tasks, targs.image_size) == \
        (name, "vit-tiny", 16, meta["tasks"], (16, 24))  # all read off the weights but the image size
    assert targs.num_eval == 0 and targs.sampling_steps == 3  # the data set's defaults: every image, 3 steps
    model.eval()
    image, z = torch.from_numpy(ref["image"]), torch.from_numpy(ref["z"])
    logits, _ = td.ddim_sample(model, image, steps=3, z=z)  # their 3-step sampler from the same z_T
    for t in meta["tasks"]:
        torch.testing.assert_close(logits[t], torch.from_numpy(ref[f"infer_{t}"]), atol=1e-5, rtol=1e-5)
    targets = _our_targets(ref, meta["tasks"])
    with torch.no_grad():  # one training forward at their fixed t and noise (eval mode: BatchNorm statistics)
        logits, aux = model(image, targets, t=torch.tensor(meta["t"]), noise=torch.from_numpy(ref["noise"]))
    for t in meta["tasks"]:
        torch.testing.assert_close(logits[t], torch.from_numpy(ref[f"train_{t}"]), atol=1e-5, rtol=1e-5)
    spec = td.DATASETS[name]
    total, losses = td.multitask_loss(logits, targets, spec["weights"], spec["edge_pos_weight"])
    aux_total, aux_losses = td.multitask_loss(aux, targets, spec["weights"], spec["edge_pos_weight"])
    for t in meta["tasks"]:  # their criterion (losses/loss_functions.py) on their outputs
        assert losses[t].item() == pytest.approx(meta["losses"][f"loss_{t}"], rel=1e-5)
        assert aux_losses[t].item() == pytest.approx(meta["losses"][f"aux_loss_{t}"], rel=1e-5)
    total = total + meta["aux_weight"] * aux_total
    assert total.item() == pytest.approx(meta["losses"]["total"], rel=1e-5)


def _expect_one_line_error(capsys, argv, *fragments):
    with pytest.raises(SystemExit) as exit_info:
        td.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def test_authors_checkpoint_errors_are_one_line(tmp_path, capsys):
    small = ["--image-size", "16", "24"]
    path, meta, _ = _authors_file(tmp_path, "pascal")
    with open(path, "rb") as f:
        data = f.read()
    truncated = str(tmp_path / "truncated.pth")
    with open(truncated, "wb") as f:
        f.write(data[: len(data) // 2])
    _expect_one_line_error(capsys, ["--eval-only", "--ckpt", truncated, *small], truncated, "truncated")
    unknown = str(tmp_path / "unknown.pth")
    torch.save({"weights": {"a": torch.zeros(1)}}, unknown)
    _expect_one_line_error(capsys, ["--eval-only", "--ckpt", unknown, *small], unknown, "no known format")
    # ViT-tiny weights with another backbone, or at a patch grid they were not trained on
    _expect_one_line_error(capsys, ["--eval-only", "--ckpt", path, "--backbone", "vit-b", "--image-size", "32"],
                           path, "backbone vit-tiny", "--backbone is vit-b")
    _expect_one_line_error(capsys, ["--eval-only", "--ckpt", path, "--image-size", "16"], path, "6 patches")
    _expect_one_line_error(capsys, ["--eval-only", "--ckpt", path, "--embed-dim", "32", *small], "C = 16")

    def add(state):
        state["heads.fpn_encoder.extra.weight"] = torch.zeros(3)

    def drop(state):
        del state["heads.embed_all.bias"]

    def reshape(state):
        state["heads.transforms.conv_transforms.2.weight"] = torch.zeros(16, 7, 1, 1)

    for edit, fragments in [(add, ["1 left over", "heads.fpn_encoder.extra.weight"]),
                            (drop, ["1 missing", "label_encoder.fuse.bias"]),
                            (reshape, ["size mismatch", "decoder.inputs.2.weight (16, 7, 1, 1)"])]:
        (tmp_path / edit.__name__).mkdir()
        bad, _, _ = _authors_file(tmp_path / edit.__name__, "pascal", edit)
        _expect_one_line_error(capsys, ["--eval-only", "--ckpt", bad, *small], bad, *fragments)
    _expect_one_line_error(capsys, ["--eval-only", "--ckpt", path, *small], path, "--data-root")  # loads, no data


#################################################################################
#          Input pipeline in the training loop: loader keys, normalisation       #
#################################################################################

class _KeyEcho(torch.utils.data.Dataset):
    """Stands in for an augmenting PASCAL / NYUD set: each item is its (index, step) key."""
    augment = True

    def __len__(self):
        return 12

    def __getitem__(self, key):
        return torch.tensor(key)


def test_augmenting_loader_resumes_exactly_with_step_keys():
    cpu = torch.device("cpu")
    straight = dense.training_loader(_KeyEcho(), 2, 1, 2, 7, 0, 0, cpu)  # rank 1 of 2, batch 2 per rank
    batches = [next(straight) for _ in range(9)]  # more than one epoch (3 global batches of 4)
    resumed = dense.training_loader(_KeyEcho(), 2, 1, 2, 7, 5, 0, cpu)
    for step in range(5, 9):
        assert torch.equal(next(resumed), batches[step])  # the same items and the same augmentation keys
    for step, batch in enumerate(batches):
        assert batch[:, 1].tolist() == [step, step]  # the key carries the training step
    epoch = torch.cat([b[:, 0] for b in batches[:3]])
    assert len(set(epoch.tolist())) == 6  # rank 1 sees half of each permutation, no repeats within an epoch


def test_sal_reencoding_threshold_is_0_85():
    p = torch.tensor([0.80, 0.84, 0.86, 0.95]).view(1, 4, 1)  # softmax[:, 1] of each pixel
    logits = torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))], 1)  # 2-class logits with that softmax
    assert td.reencode_predictions({"sal": logits}, {"sal": 2})["sal"].flatten().tolist() == [0, 0, 1, 1]


def test_synthetic_images_are_standardised_like_pascal():
    args = _args("--num-eval", "2")
    item, raw = td.create_dense_dataset(args, "val")[0], SyntheticShapes(2, 32, seed=1, dense=True)[0]
    x01 = (raw["image"] + 1) / 2  # the synthetic set renders in [-1, 1]
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    torch.testing.assert_close(item["image"], (x01 - mean) / std)
    assert torch.equal(item["semseg"], raw["semseg"])
    torch.testing.assert_close(td.denormalize_tensor(item["image"]), raw["image"])  # back to [-1, 1] for pictures


def test_a_stop_signal_ends_main_without_the_baseline_or_an_evaluation(tmp_path, monkeypatch):
    real = td.end_of_step

    def stop_after_first(run, args, step, *rest, **kw):  # as if SIGTERM arrived during step 1
        run.stop_requested = True  # what TrainingRun's signal handler sets
        return real(run, args, step, *rest, **kw)

    monkeypatch.setattr(td, "end_of_step", stop_after_first)
    out = td.main([*SMALL, "--steps", "3", "--global-batch-size", "2", "--num-eval", "2", "--results-dir",
                   str(tmp_path)])
    assert out is None and os.listdir(tmp_path) == ["000-taskdiffusion-synthetic-vit-tiny-cross-task"]
    run_dir = tmp_path / "000-taskdiffusion-synthetic-vit-tiny-cross-task"
    assert os.listdir(run_dir / "checkpoints") == ["0000001.pt"] and not (run_dir / "results.txt").exists()


def test_pascal_boundaries_are_scored_against_the_label_map_as_seism(pascal_root, monkeypatch):
    """SEISM's PASCAL-Context boundary GT is seg2bmap(LabelMap): evaluate gives EdgeMeter the label map (padding
    marked invalid) with gt_format="segmentation", not the dataset's Laplacian edge maps."""
    root = pascal_root
    seen = []

    class Recorder(td.EdgeMeter):
        def update(self, pred_prob, gt, valid=None):
            seen.append((self.gt_format, gt.clone(), None if valid is None else valid.clone()))
            return super().update(pred_prob, gt, valid)
    monkeypatch.setattr(td, "EdgeMeter", Recorder)
    args = td.parse_args(["--dataset", "pascal", "--data-root", str(root), "--backbone", "vit-tiny",
                          "--image-size", "32", "--embed-dim", "32", "--eval-workers", "0", "--num-workers", "0"])
    results = td.evaluate(td.build_model(args), args, torch.device("cpu"))
    assert 0 <= results["edge"] <= 100 and seen
    fmt, gt, valid = seen[0]
    assert fmt == "segmentation" and gt.dtype == torch.int64 and set(gt[valid].unique().tolist()) == {2, 284}
    assert not valid.all()  # the padding is excluded
