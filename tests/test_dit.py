"""Tests for common/dit.py: upstream-compatible names/shapes, init, CFG arithmetic, embeddings, router hook."""
import math

import pytest
import torch

from common.dit import DiT, DiT_models, TimestepEmbedder, get_2d_sincos_pos_embed


def tiny_dit(**kwargs):
    cfg = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=10)
    cfg.update(kwargs)
    return DiT(**cfg)


def randomize(model, seed=0):
    """Overwrite every trainable weight (including the zero-initialised adaLN / output layers) with noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


#################################################################################
#                          Configs and parameter names                          #
#################################################################################

@pytest.mark.parametrize("name, expected", [("DiT-S/2", 33e6), ("DiT-B/2", 130e6), ("DiT-L/2", 458e6),
                                            ("DiT-XL/2", 675e6)])
def test_param_counts_match_the_dit_paper(name, expected):
    with torch.device("meta"):
        model = DiT_models[name]()
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - expected) / expected < 0.01, f"{name}: {n / 1e6:.1f}M params"


def test_all_twelve_configs_exist_with_upstream_sizes():
    sizes = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
    assert len(DiT_models) == 12
    for size, (depth, hidden, heads) in sizes.items():
        for p in (2, 4, 8):
            with torch.device("meta"):
                m = DiT_models[f"DiT-{size}/{p}"](input_size=32, num_classes=1000)
            assert (len(m.blocks), m.pos_embed.shape[-1], m.num_heads, m.patch_size) == (depth, hidden, heads, p)
            assert m.pos_embed.shape[1] == (32 // p) ** 2
            assert m.out_channels == 8  # learn_sigma=True by default


def expected_state_dict_shapes(depth, D, p, C_in, C_out, num_classes, num_patches, mlp_ratio=4.0):
    """Key -> shape, written from the upstream naming rules (timm PatchEmbed/Attention/Mlp + DiT models.py)."""
    H = int(D * mlp_ratio)
    shapes = {
        "pos_embed": (1, num_patches, D),
        "x_embedder.proj.weight": (D, C_in, p, p), "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (num_classes + 1, D),  # + null class
        "final_layer.linear.weight": (p * p * C_out, D), "final_layer.linear.bias": (p * p * C_out,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D), "final_layer.adaLN_modulation.1.bias": (2 * D,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
            b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
            b + "mlp.fc1.weight": (H, D), b + "mlp.fc1.bias": (H,),
            b + "mlp.fc2.weight": (D, H), b + "mlp.fc2.bias": (D,),
            b + "adaLN_modulation.1.weight": (6 * D, D), b + "adaLN_modulation.1.bias": (6 * D,),
        })  # norm1/norm2 have elementwise_affine=False: no parameters
    return shapes


def test_state_dict_keys_and_shapes_follow_upstream_naming():
    model = tiny_dit(depth=3, hidden_size=48, patch_size=4, input_size=16, num_classes=7)
    expected = expected_state_dict_shapes(depth=3, D=48, p=4, C_in=4, C_out=8, num_classes=7, num_patches=16)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected

    # A state dict built key by key from the rules loads strictly, and the values arrive.
    g = torch.Generator().manual_seed(1)
    official = {k: torch.randn(s, generator=g) for k, s in expected.items()}
    model.load_state_dict(official, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, official[k]), k
    with pytest.raises(RuntimeError):
        model.load_state_dict({k: v for k, v in official.items() if k != "blocks.0.attn.qkv.weight"}, strict=True)


def test_no_null_class_row_without_label_dropout():
    model = tiny_dit(class_dropout_prob=0.0)
    assert model.y_embedder.embedding_table.weight.shape[0] == 10
    with pytest.raises(ValueError, match="null class"):
        model(torch.zeros(1, 4, 8, 8), torch.zeros(1), torch.tensor([10]))


def test_pos_embed_is_a_frozen_parameter():
    model = tiny_dit()
    assert isinstance(model.pos_embed, torch.nn.Parameter) and not model.pos_embed.requires_grad


#################################################################################
#                        Forward, init and label dropout                        #
#################################################################################

@pytest.mark.parametrize("learn_sigma, out_channels", [(True, 8), (False, 4)])
def test_forward_output_shape(learn_sigma, out_channels):
    model = tiny_dit(learn_sigma=learn_sigma).eval()
    out = model(torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([1, 2, 10]))
    assert out.shape == (3, out_channels, 8, 8)


def test_fresh_model_outputs_exact_zeros_adaln_zero():
    model = tiny_dit().eval()
    out = model(torch.randn(4, 4, 8, 8), torch.randint(0, 1000, (4,)), torch.randint(0, 10, (4,)))
    assert torch.count_nonzero(out) == 0
    # and every block starts as the identity (gates are zero)
    x, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    assert torch.equal(model.blocks[0](x, c), x)


def test_bad_input_shape_raises_clear_error():
    with pytest.raises(ValueError, match="input_size"):
        tiny_dit()(torch.randn(1, 4, 16, 16), torch.zeros(1), torch.zeros(1, dtype=torch.long))


def test_unpatchify_inverts_patchify():
    model = tiny_dit(learn_sigma=False, patch_size=4)
    img = torch.randn(2, 4, 8, 8)
    p = 4  # tokens (N, h*w, p*p*C) with layout (p, q, c), row-major over the patch grid
    tokens = img.reshape(2, 4, 2, p, 2, p).permute(0, 2, 4, 3, 5, 1).reshape(2, 4, p * p * 4)
    assert torch.equal(model.unpatchify(tokens), img)


def test_token_drop_forces_null_class():
    emb = tiny_dit().y_embedder
    labels = torch.tensor([3, 4, 5])
    assert emb.token_drop(labels, force_drop_ids=torch.tensor([1, 0, 1])).tolist() == [10, 4, 10]
    emb.dropout_prob = 1.0
    assert emb.token_drop(labels).tolist() == [10, 10, 10]
    # eval mode keeps labels; the null row is used only when dropped
    assert torch.equal(emb(labels, train=False), emb.embedding_table.weight[labels])


#################################################################################
#                          Classifier-free guidance                             #
#################################################################################

def cfg_inputs(n=2):
    torch.manual_seed(0)
    x_half = torch.randn(n, 4, 8, 8, dtype=torch.float64)
    x = torch.cat([x_half, torch.randn(n, 4, 8, 8, dtype=torch.float64)])  # ignored: replaced by the first half
    t = torch.tensor([10, 700] * (n // 2) * 2)
    y = torch.cat([torch.randint(0, 10, (n,)), torch.full((n,), 10)])  # uncond half = null class
    return x_half, x, t, y


def test_cfg_scale_one_equals_conditional_forward():
    model = randomize(tiny_dit()).double().eval()  # float64: batch-size dependent rounding stays far below tol
    x_half, x, t, y = cfg_inputs()
    with torch.no_grad():
        out = model.forward_with_cfg(x, t, y, cfg_scale=1.0, guided_channels=None)
        cond = model(x_half, t[:2], y[:2])
    torch.testing.assert_close(out[:2, :4], cond[:, :4], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out[2:, :4], cond[:, :4], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("guided_channels, n_guided", [(3, 3), (None, 4)])
def test_cfg_guides_eps_channels_by_hand(guided_channels, n_guided):
    model = randomize(tiny_dit()).double().eval()  # float64: batch-size dependent rounding stays far below tol
    x_half, x, t, y = cfg_inputs()
    s = 4.0
    with torch.no_grad():
        out = model.forward_with_cfg(x, t, y, cfg_scale=s, guided_channels=guided_channels)
        cond = model(x_half, t[:2], y[:2])
        uncond = model(x_half, t[2:], y[2:])
    guided = uncond[:, :n_guided] + s * (cond[:, :n_guided] - uncond[:, :n_guided])
    torch.testing.assert_close(out[:2, :n_guided], guided, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out[2:, :n_guided], guided, rtol=1e-10, atol=1e-10)
    # unguided channels (leftover eps channel, learned sigma) pass through from the forward pass
    torch.testing.assert_close(out[:2, n_guided:], cond[:, n_guided:], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out[2:, n_guided:], uncond[:, n_guided:], rtol=1e-10, atol=1e-10)
    assert not torch.allclose(cond[:, :4], uncond[:, :4])  # guidance actually does something here


def test_cfg_rejects_odd_batch():
    with pytest.raises(ValueError, match="even batch"):
        tiny_dit().forward_with_cfg(torch.randn(3, 4, 8, 8), torch.zeros(3), torch.zeros(3, dtype=torch.long), 1.5)


#################################################################################
#                                  Embeddings                                   #
#################################################################################

def test_pos_embed_matches_sincos_formula():
    D, grid = 16, 4
    model = tiny_dit(hidden_size=D, input_size=8, patch_size=2)  # 4x4 patch grid
    pe = model.pos_embed[0]
    quarter = D // 4
    for token in (0, 1, 6, 15):
        row, col = divmod(token, grid)
        expected = []
        # MAE/DiT layout: [sin(col w), cos(col w), sin(row w), cos(row w)], w_k = 10000^(-k / (D/4))
        for pos in (col, row):
            expected += [math.sin(pos * 10000 ** (-k / quarter)) for k in range(quarter)]
            expected += [math.cos(pos * 10000 ** (-k / quarter)) for k in range(quarter)]
        torch.testing.assert_close(pe[token], torch.tensor(expected), rtol=0, atol=1e-6)
    assert get_2d_sincos_pos_embed(D, grid).shape == (grid * grid, D)


def test_timestep_embedding_matches_hand_formula():
    t = torch.tensor([0.0, 1.0, 37.5, 999.0])
    dim, half = 8, 4
    emb = TimestepEmbedder.timestep_embedding(t, dim)
    for i, ti in enumerate(t.tolist()):
        freqs = [10000 ** (-k / half) for k in range(half)]
        expected = [math.cos(ti * f) for f in freqs] + [math.sin(ti * f) for f in freqs]
        torch.testing.assert_close(emb[i], torch.tensor(expected), rtol=1e-5, atol=1e-5)
    odd = TimestepEmbedder.timestep_embedding(t, 9)
    assert odd.shape == (4, 9) and torch.equal(odd[:, -1], torch.zeros(4))


#################################################################################
#                       Router hook and gradient checkpointing                  #
#################################################################################

class RecordingRouter:
    """Records every call and runs the block unchanged."""

    def __init__(self):
        self.calls = []

    def __call__(self, block, x, c, t, index):
        self.calls.append((block, x.shape, c.shape, t.clone(), index))
        return block(x, c)


def test_router_called_once_per_block_with_raw_timesteps():
    model = randomize(tiny_dit(depth=3)).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 950]), torch.tensor([1, 2])
    with torch.no_grad():
        ref = model(x, t, y)
        router = RecordingRouter()
        model.router = router
        out = model(x, t, y)
    assert [call[0] for call in router.calls] == list(model.blocks)
    assert [call[4] for call in router.calls] == [0, 1, 2]  # the block's index, for per-block masks (R-TR)
    for _, x_shape, c_shape, t_seen, _ in router.calls:
        assert x_shape == (2, 16, 32) and c_shape == (2, 32)
        assert torch.equal(t_seen, t)  # the (B,) timesteps, not their embedding
    torch.testing.assert_close(out, ref)

    # the router's output is what flows on: a router that zeroes the tokens changes the result
    model.router = lambda block, x, c, t, index: torch.zeros_like(block(x, c))
    with torch.no_grad():
        assert not torch.allclose(model(x, t, y), ref)


def test_grad_checkpointing_gives_same_gradients():
    model = randomize(tiny_dit()).train()
    model.y_embedder.dropout_prob = 0.0  # deterministic labels for the comparison
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 400]), torch.tensor([0, 9])

    def grads():
        model.zero_grad()
        model(x, t, y).square().sum().backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    plain = grads()
    model.grad_checkpoint = True
    model.router = RecordingRouter()  # the router runs inside the checkpointed call
    for a, b in zip(plain, grads()):
        torch.testing.assert_close(a, b)
