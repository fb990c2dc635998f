"""TaskDiffusion (task_diffusion.py): schedule, time pairs and DDIM re-encoding from first principles, label encoder,
losses against hand-written formulas, module shapes per ablation flag, one training step per task set, resume, DDP."""
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import task_diffusion as td
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
    # pixels that are invalid in two different ways (depth 0 and -3) encode identically: the learned invalid code
    enc = td.CrossTaskLabelEncoder(tasks, 32)
    hole = torch.zeros_like(gt["depth"], dtype=torch.bool)
    hole[:, :16] = True
    a, b = ({**gt, "depth": torch.where(hole, torch.full_like(gt["depth"], v), gt["depth"])} for v in (0.0, -3.0))
    za, zb = (enc(td.encode_targets(x, tasks, (4, 4))) for x in (a, b))
    assert torch.equal(za, zb) and not torch.equal(za, enc(td.encode_targets(gt, tasks, (4, 4))))


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
    flipped, out = td.random_flip(images, targets)
    was_flipped = [not torch.equal(flipped[b], images[b]) for b in range(8)]
    assert 0 < sum(was_flipped) < 8
    for b, f in enumerate(was_flipped):
        mirror = (lambda x: x.flip(-1)) if f else (lambda x: x)
        assert torch.equal(flipped[b], mirror(images[b])) and torch.equal(out["semseg"][b], mirror(targets["semseg"][b]))
        n = mirror(targets["normals"][b]).clone()
        n[0] = -n[0] if f else n[0]  # the x component of a mirrored normal changes sign
        assert torch.equal(out["normals"][b], n)
