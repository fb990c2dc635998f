"""The authors' checkpoint layouts (ANT, DTR, official DiT) through the real loading / sampling path: detection,
settings read off the weights, strict key coverage, DTR mask adoption, one-line errors, identical outputs."""
import argparse
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import ant_clustering as ant
import dtr
from common.adm_npz import to_uint8
from common.checkpoint_formats import model_from_checkpoint
from common.dit import DiT_models
from common.sampling import sample_images
from common.vae import load_vae
from test_latent_pipeline import write_random_vae

T = 1000


def random_dit_s2(input_size=8, num_classes=10, seed=0):
    """DiT-S/2 (official key names, as the authors' models.py) with weights that make every block matter."""
    torch.manual_seed(seed)
    model = DiT_models["DiT-S/2"](input_size=input_size, num_classes=num_classes)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    return model.eval()


def authors_dtr_masks(C, beta=0.8, alpha=4.0):
    """The DTR authors' window masks (models/taskrouting.py create_mask_tasks), written out independently here."""
    n = int(C * beta)
    start = np.round(np.linspace(0, 1, T) ** alpha * (C - n)).astype(int)
    mask = torch.zeros(T, C)
    for t in range(T):
        mask[t, start[t]:start[t] + n] = 1
    return mask


def with_routing_buffers(state_dict, masks_per_block):
    out = dict(state_dict)
    for i, m in enumerate(masks_per_block):
        out[f"blocks.{i}.routing._unit_mapping"] = m.clone()
    return out


def sampling_args(tmp_path, **kw):
    base = dict(noise_schedule=None, vae_scale=None, routing=None, beta=None, alpha=None, mask_seed=None,
                results_dir=str(tmp_path))
    return argparse.Namespace(**{**base, **kw})


@pytest.fixture(scope="module")
def dit():
    return random_dit_s2()


def same_outputs(a, b, num_classes=10):
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999])
    y = torch.tensor([1, 2, num_classes])  # the null class too
    with torch.no_grad():
        torch.testing.assert_close(a(x, t, y), b(x, t, y), rtol=0, atol=0)


#################################################################################
#                                   ANT                                         #
#################################################################################

def test_ant_released_layout_is_read_and_equals_the_model(tmp_path, dit, capsys):
    path = tmp_path / "ANT_DiT-S-2_nash.pt"
    sd = dit.state_dict()
    torch.save({"ema": sd, "model": sd}, path)  # lightweight_ckpt.py
    model, targs, step = model_from_checkpoint(str(path), "cpu", sampling_args(tmp_path), "ant_clustering",
                                               ant.refuse_routing)
    out = capsys.readouterr().out
    assert "ant layout" in out and "DiT-S/2" in out and "10 classes" in out
    assert (targs.model, targs.input_shape, targs.num_classes, targs.noise_schedule) == ("DiT-S/2", [4, 8, 8], 10,
                                                                                      "cosine")
    assert targs.vae_scale == 0.13025  # ANT's DiT-S runs: SDXL VAE
    same_outputs(model, dit)


def test_ant_training_checkpoint_loads_without_its_packages(tmp_path, dit, capsys):
    """ANT's train_*.py pickle an args Namespace and an omegaconf config; the config's package is absent here."""
    sd_path = tmp_path / "sd.pt"
    torch.save(dit.state_dict(), sd_path)
    pkg = tmp_path / "fakeomegaconf"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        class DictConfig:
            def __init__(self, content):
                self._content = content
    """))
    script = textwrap.dedent(f"""
        import argparse, torch, fakeomegaconf
        sd = torch.load({str(sd_path)!r})
        torch.save({{"model": sd, "ema": sd, "opt": {{}}, "args": argparse.Namespace(image_size=64, num_classes=10,
                    mtl_method="nash"), "config": fakeomegaconf.DictConfig({{"model": {{"name": "DiT-S/2"}}}})}},
                   {str(tmp_path / 'ant_train.pt')!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    model, targs, _ = model_from_checkpoint(str(tmp_path / "ant_train.pt"), "cpu", sampling_args(tmp_path),
                                            "ant_clustering", ant.refuse_routing)
    out = capsys.readouterr().out
    assert "fakeomegaconf.DictConfig" in out and "inert" in out  # one line says what was skipped
    assert targs.settings["args.mtl_method"] == "nash" and targs.settings["config.model.name"] == "DiT-S/2"
    same_outputs(model, dit)


@pytest.mark.slow
def test_ant_released_weights_sample_through_the_cli_as_the_model_built_directly(tmp_path):
    """`ant_clustering.py --sample-only` on an ANT file at 16x16 latents with an SDXL-like VAE (scale read from its
    config.json): the .npz equals sampling the directly built model with ANT's settings (cosine, 3 guided
    channels, cfg 1.5, round(127.5 x + 128) with --quantize ant)."""
    model = random_dit_s2(input_size=16)
    path = tmp_path / "ant.pt"
    torch.save({"ema": model.state_dict(), "model": model.state_dict()}, path)
    vae_path = tmp_path / "sdxl-vae" / "diffusion_pytorch_model.safetensors"
    vae_path.parent.mkdir()
    write_random_vae(vae_path, (32, 32))
    (vae_path.parent / "config.json").write_text(json.dumps({"scaling_factor": 0.13025}))
    npz = ant.main(["--sample-only", "--ckpt", str(path), "--vae", str(vae_path), "--num-samples", "3",
                    "--sample-batch-size", "3", "--num-sampling-steps", "2", "--results-dir", str(tmp_path),
                    "--quantize", "ant"])
    got = np.load(npz)["arr_0"]
    assert got.shape == (3, 32, 32, 3) and os.path.dirname(npz).startswith(str(tmp_path / "ant-samples"))
    model.null_class = 10  # DiT's null class = num_classes
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (3,), generator=gen)
    vae = load_vae(str(vae_path), "cpu")
    assert vae.scaling_factor == 0.13025
    images = sample_images(model, labels, (4, 16, 16), sampler="ddpm", num_steps=2, cfg_scale=1.5, cfg_channels=3,
                           noise_schedule="cosine", vae=vae, generator=gen)
    np.testing.assert_array_equal(got, to_uint8(images, "ant").numpy())


#################################################################################
#                                   DTR                                         #
#################################################################################

def load_dtr(tmp_path, ckpt, **flags):
    path = tmp_path / "dtr.pt"
    torch.save(ckpt, path)
    args = sampling_args(tmp_path, ckpt=str(path), **flags)
    return model_from_checkpoint(str(path), "cpu", args, "dtr", dtr.checkpoint_routing(args))


def test_dtr_layout_with_window_masks_is_dtr_routing(tmp_path, dit, capsys):
    masks = [authors_dtr_masks(384)] * 12
    sd = with_routing_buffers(dit.state_dict(), masks)
    model, targs, _ = load_dtr(tmp_path, {"model": sd, "ema": sd, "opt": {}})
    assert targs.routing == "dtr" and (targs.beta, targs.alpha) == (0.8, 4.0)
    assert "dtr layout" in capsys.readouterr().out
    expected = dtr.add_task_routing(random_dit_s2(), "dtr", 0.8, 4.0)
    same_outputs(model, expected)
    vanilla = random_dit_s2()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([100, 900]), torch.tensor([0, 1])
    with torch.no_grad():
        assert not torch.allclose(model(x, t, y), vanilla(x, t, y))  # the routing is really applied


def test_dtr_masks_that_differ_from_the_rebuilt_ones_are_a_one_line_error(tmp_path, dit, capsys):
    sd = with_routing_buffers(dit.state_dict(), [authors_dtr_masks(384, alpha=2.0)] * 12)
    with pytest.raises(SystemExit) as e:
        load_dtr(tmp_path, {"model": sd, "ema": sd})
    err = capsys.readouterr().err
    assert e.value.code == 2 and "differ from the masks rebuilt" in err and "--alpha" in err
    assert len(err.strip().splitlines()) == 1
    model, targs, _ = load_dtr(tmp_path, {"model": sd, "ema": sd}, alpha=2.0)  # the flag it was trained with
    assert targs.routing == "dtr" and targs.alpha == 2.0


def test_dtr_random_masks_are_adopted_as_stored(tmp_path, dit):
    g = torch.Generator().manual_seed(5)
    masks = [torch.zeros(T, 384).scatter_(1, torch.rand(T, 384, generator=g).argsort(1)[:, :307], 1.0)
             for _ in range(12)]
    sd = with_routing_buffers(dit.state_dict(), masks)
    model, targs, _ = load_dtr(tmp_path, {"model": sd, "ema": sd})
    assert targs.routing == "random"
    for i, m in enumerate(masks):
        assert torch.equal(model.router.mask_of_block(i), m)
    expected = random_dit_s2()
    expected.router = dtr.DiTRouter(torch.stack(masks))
    same_outputs(model, expected)


def test_dtr_all_ones_masks_are_vanilla_and_beta_comes_from_its_config(tmp_path, dit):
    sd = with_routing_buffers(dit.state_dict(), [torch.ones(T, 384)] * 12)
    model, targs, _ = load_dtr(tmp_path, {"model": sd, "ema": sd})
    assert targs.routing == "none" and model.router is None
    same_outputs(model, dit)
    with pytest.raises(SystemExit):  # ANT builds plain DiTs: a routed DTR file is refused there
        masks = with_routing_buffers(dit.state_dict(), [authors_dtr_masks(384)] * 12)
        path = tmp_path / "routed.pt"
        torch.save({"ema": masks}, path)
        model_from_checkpoint(str(path), "cpu", sampling_args(tmp_path), "ant_clustering", ant.refuse_routing)


#################################################################################
#                        Official DiT and bad files                             #
#################################################################################

def test_official_dit_state_dict_is_a_vanilla_model_on_the_linear_schedule(tmp_path, dit, capsys):
    path = tmp_path / "DiT-S-2.pt"
    torch.save(dit.state_dict(), path)  # facebookresearch/DiT releases bare state dicts
    args = sampling_args(tmp_path, ckpt=str(path))
    model, targs, _ = model_from_checkpoint(str(path), "cpu", args, "dtr", dtr.checkpoint_routing(args))
    assert "dit layout" in capsys.readouterr().out
    assert targs.routing == "none" and targs.noise_schedule == "linear" and targs.vae_scale == 0.18215
    same_outputs(model, dit)


@pytest.mark.parametrize("case", ["bytes", "truncated", "unknown-dict", "extra-key", "missing-key", "odd-size"])
def test_bad_files_are_one_line_errors_naming_the_file(tmp_path, dit, case, capsys):
    path = tmp_path / f"{case}.pt"
    sd = dit.state_dict()
    if case == "bytes":
        path.write_bytes(os.urandom(3000))
    elif case == "truncated":
        torch.save({"ema": sd}, path)
        path.write_bytes(path.read_bytes()[:100_000])
    elif case == "unknown-dict":
        torch.save({"weights": sd}, path)
    elif case == "extra-key":
        torch.save({"ema": {**sd, "blocks.0.extra.weight": torch.zeros(3)}}, path)
    elif case == "missing-key":
        torch.save({"ema": {k: v for k, v in sd.items() if k != "blocks.3.attn.qkv.weight"}}, path)
    else:
        torch.save({"ema": {**sd, "x_embedder.proj.weight": torch.zeros(500, 4, 2, 2)}}, path)
    with pytest.raises(SystemExit) as e:
        model_from_checkpoint(str(path), "cpu", sampling_args(tmp_path), "ant_clustering", ant.refuse_routing)
    err = capsys.readouterr().err.strip()
    assert e.value.code != 0 and str(path) in err and len(err.splitlines()) == 1, err
