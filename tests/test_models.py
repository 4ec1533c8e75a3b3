"Tests for sadm_lab.models: shapes, adaLN-Zero, token dropping, official-checkpoint compatibility, numerics vs references."
import json, math, os
from pathlib import Path

import numpy as np
import pytest
import torch

from sadm_lab.core import ConfigError
from sadm_lab.models import DiT, DiT_models, UViT, UViT_models, build_model, MODELS
from sadm_lab.models.layers import (Attention, count_params, flops_per_forward, get_2d_sincos_pos_embed,
                                    patchify, unpatchify, gather_tokens, timestep_embedding,
                                    split_token_channels)

FIXTURES = Path(__file__).parent / 'fixtures'
REGEN = os.environ.get('SADM_REGEN_GOLDEN') == '1'   # set to rewrite golden slices after an intended change

torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_dit(**kw):
    return DiT(**{**dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=4, num_classes=10), **kw})

def tiny_uvit(**kw):
    return UViT(**{**dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=3, num_heads=4, num_classes=10), **kw})

@torch.no_grad()
def randomize_zero_params_(model, seed=0):
    "Re-initialise the zero-initialised tensors (adaLN-Zero, heads, biases) with a seeded normal so outputs are non-trivial."
    g = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters()):
        if p.requires_grad and not p.any(): p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model

def inputs(b=2, c=3, s=8, seed=0, classes=10):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, c, s, s, generator=g), torch.randint(0, 1000, (b,), generator=g),
            torch.randint(0, classes, (b,), generator=g))


# ----------------------------------------------------------------------------------------------- layers
@pytest.mark.parametrize('p', [1, 2, 4, 8])
def test_patchify_roundtrip_and_order(p):
    x = torch.randn(2, 3, 16, 8)
    tok = patchify(x, p)
    w = 8 // p
    assert tok.shape == (2, (16 // p) * w, p * p * 3)
    i = tok.shape[1] - 1  # last token = last patch row / col, features (p_row, p_col, C)
    r, c = divmod(i, w)
    assert torch.equal(tok[1, i], x[1, :, r * p:(r + 1) * p, c * p:(c + 1) * p].permute(1, 2, 0).reshape(-1))
    assert torch.equal(unpatchify(tok, p, 16, 8), x)

def test_gather_tokens():
    x = torch.randn(3, 10, 4)
    idx = torch.sort(torch.rand(3, 10).argsort(1)[:, :4], 1).values
    out = gather_tokens(x, idx)
    for b in range(3): assert torch.equal(out[b], x[b, idx[b]])

def test_sdpa_attention_matches_float64_reference():
    torch.manual_seed(0)
    for dim, heads, n in [(32, 4, 17), (48, 3, 5), (64, 8, 65)]:
        att = Attention(dim, heads)
        x = torch.randn(3, n, dim)
        with torch.no_grad():
            m, xd = att.double(), x.double()
            dh = dim // heads
            q, k, v = (xd @ m.qkv.weight.T + m.qkv.bias).reshape(3, n, 3, heads, dh).permute(2, 0, 3, 1, 4)
            a = torch.softmax(torch.einsum('bhid,bhjd->bhij', q, k) / math.sqrt(dh), dim=-1)
            ref = torch.einsum('bhij,bhjd->bihd', a, v).reshape(3, n, dim) @ m.proj.weight.T + m.proj.bias
            att.float()
            torch.testing.assert_close(att(x).double(), ref, atol=2e-5, rtol=1e-4)

def test_sincos_pos_embed_matches_official_numpy_formula():
    # The MAE/DiT numpy construction: meshgrid(w, h), first half of channels from grid[0].
    def official(embed_dim, gs):
        grid = np.stack(np.meshgrid(np.arange(gs, dtype=np.float32), np.arange(gs, dtype=np.float32)), 0).reshape(2, 1, gs, gs)
        def one(d, pos):
            omega = 1. / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.))
            out = np.einsum('m,d->md', pos.reshape(-1), omega)
            return np.concatenate([np.sin(out), np.cos(out)], 1)
        return np.concatenate([one(embed_dim // 2, grid[0]), one(embed_dim // 2, grid[1])], 1)
    for d, gs in [(384, 16), (32, 4), (1152, 8)]:
        np.testing.assert_allclose(get_2d_sincos_pos_embed(d, gs).numpy(), official(d, gs), atol=1e-6)

def test_timestep_embedding_matches_closed_form():
    t = torch.tensor([0, 1, 37, 999])
    e = timestep_embedding(t, 256).double()
    f = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float64) / 128)
    ref = torch.cat([torch.cos(t.double()[:, None] * f), torch.sin(t.double()[:, None] * f)], 1)
    torch.testing.assert_close(e, ref, atol=2e-4, rtol=0)   # float32 args at t~1e3


# ----------------------------------------------------------------------------------------------- DiT
@pytest.mark.parametrize('p', [2, 4, 8])
@pytest.mark.parametrize('learn_sigma', [True, False])
def test_dit_shapes(p, learn_sigma):
    m = tiny_dit(input_size=16, patch_size=p, learn_sigma=learn_sigma)
    x, t, y = inputs(s=16)
    out = m(x, t, y)
    assert out.shape == (2, 6 if learn_sigma else 3, 16, 16)
    assert (m.in_channels, m.out_channels, m.input_size, m.patch_size, m.num_patches, m.num_classes, m.learn_sigma) == \
        (3, 6 if learn_sigma else 3, 16, p, (16 // p) ** 2, 10, learn_sigma)
    keep = torch.stack([torch.randperm(m.num_patches)[:max(1, m.num_patches // 4)].sort().values for _ in range(2)])
    assert m(x, t, y, keep_idx=keep).shape == (2, keep.shape[1], p * p * m.out_channels)

def test_dit_unconditional():
    m = tiny_dit(num_classes=0)
    assert m.y_embedder is None and m.null_class is None
    assert not any(k.startswith('y_embedder') for k in m.state_dict())
    x, t, _ = inputs()
    assert m(x, t).shape == (2, 6, 8, 8)

def test_dit_adaln_zero_identity_at_init():
    torch.manual_seed(0)
    m = tiny_dit(depth=3)
    x, t, y = inputs()
    seen = []
    hooks = [b.register_forward_hook(lambda mod, args, out: seen.append(torch.equal(args[0], out))) for b in m.blocks]
    out = m(x, t, y)
    for h in hooks: h.remove()
    assert seen == [True] * 3                  # every block is the identity at init
    assert out.abs().max() == 0                # the final layer is zero at init
    # and it is not trivially dead: gradients reach the zero-initialised head
    out.pow(2).sum().backward()
    m.zero_grad(); (m(x, t, y) - 1).pow(2).sum().backward()
    assert m.final_layer.linear.weight.grad.abs().sum() > 0

def test_dit_init_matches_official_recipe():
    torch.manual_seed(0)
    m = tiny_dit(hidden_size=64)
    assert not m.pos_embed.requires_grad
    torch.testing.assert_close(m.pos_embed[0], get_2d_sincos_pos_embed(64, 4))
    w = m.blocks[0].attn.qkv.weight
    bound = math.sqrt(6 / (w.shape[0] + w.shape[1]))           # xavier-uniform
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert abs(m.y_embedder.embedding_table.weight.std().item() - 0.02) < 0.005
    for b in m.blocks: assert not b.adaLN_modulation[1].weight.any()

def test_model_never_drops_labels():
    torch.manual_seed(0)
    m = randomize_zero_params_(tiny_dit(class_dropout_prob=0.5)).train()
    x, t, y = inputs(b=16)
    with torch.no_grad(): a, b = m(x, t, y), m(x, t, y)
    assert torch.equal(a, b)
    assert m.null_class == 10 and m.y_embedder.embedding_table.num_embeddings == 11
    with torch.no_grad():
        torch.testing.assert_close(m(x, t), m(x, t, torch.full_like(y, 10)))   # y=None -> null class
    with pytest.raises(ValueError, match='no null class'): tiny_dit(class_dropout_prob=0.)(x, t)

@pytest.mark.parametrize('make', [tiny_dit, tiny_uvit])
def test_keep_all_tokens_equals_plain_forward(make):
    torch.manual_seed(0)
    m = randomize_zero_params_(make())
    x, t, y = inputs()
    with torch.no_grad():
        full = m(x, t, y)
        tok = m(x, t, y, keep_idx=torch.arange(m.num_patches).expand(2, -1))
    assert full.abs().mean() > 1e-3
    torch.testing.assert_close(tok, m.patchify(full), atol=1e-5, rtol=1e-5)


def _masked_attention(att, x, key_mask):
    "float64 attention where only keys with key_mask True are visible."
    B, N, D = x.shape
    h = att.num_heads
    q, k, v = att.qkv(x).reshape(B, N, 3, h, D // h).permute(2, 0, 3, 1, 4)
    s = q @ k.transpose(-1, -2) / math.sqrt(D // h)
    s = s.masked_fill(~key_mask[:, None, None, :], float('-inf'))
    return att.proj((s.softmax(-1) @ v).transpose(1, 2).reshape(B, N, D))

def test_dit_keep_idx_equals_full_sequence_with_dropped_keys_masked():
    # Tokens dropped with keep_idx must act as if invisible to attention, while kept tokens keep the
    # positional embedding of their original grid position. Check by running ALL tokens (each at its own
    # position) with dropped keys masked out of attention, in float64, and comparing the kept rows.
    torch.manual_seed(0)
    m = randomize_zero_params_(tiny_dit(depth=3)).double()
    x, t, y = inputs()
    x = x.double()
    keep = torch.tensor([[0, 2, 5, 9, 15], [1, 3, 4, 12, 14]])
    vis = torch.zeros(2, m.num_patches, dtype=torch.bool).scatter_(1, keep, True)
    with torch.no_grad():
        ours = m(x, t, y, keep_idx=keep)
        h = m.x_embedder(x) + m.pos_embed
        c = m.t_embedder(t) + m.y_embedder(y)
        mod = lambda z, sh, sc: z * (1 + sc[:, None]) + sh[:, None]
        for b in m.blocks:
            s1, c1, g1, s2, c2, g2 = b.adaLN_modulation(c).chunk(6, 1)
            h = h + g1[:, None] * _masked_attention(b.attn, mod(b.norm1(h), s1, c1), vis)
            h = h + g2[:, None] * b.mlp(mod(b.norm2(h), s2, c2))
        ref = m.final_layer(h, c)
    torch.testing.assert_close(ours, torch.stack([ref[i, keep[i]] for i in range(2)]), atol=1e-10, rtol=1e-10)

def test_uvit_keep_idx_equals_full_sequence_with_dropped_keys_masked():
    torch.manual_seed(0)
    m = randomize_zero_params_(tiny_uvit(depth=5)).double()
    x, t, y = inputs()
    x = x.double()
    keep = torch.tensor([[0, 2, 5, 9, 15], [1, 3, 4, 12, 14]])
    vis = torch.cat([torch.ones(2, m.extras, dtype=torch.bool),
                     torch.zeros(2, m.num_patches, dtype=torch.bool).scatter_(1, keep, True)], 1)
    def block(b, h, skip=None):
        if skip is not None: h = b.skip_linear(torch.cat([h, skip], -1))
        h = h + _masked_attention(b.attn, b.norm1(h), vis)
        return h + b.mlp(b.norm2(h))
    with torch.no_grad():
        ours = m(x, t, y, keep_idx=keep)
        tt = timestep_embedding(t, m.hidden_size).double()
        h = torch.cat([m.label_emb(y)[:, None], tt[:, None], m.patch_embed(x)], 1) + m.pos_embed
        skips = []
        for b in m.in_blocks: h = block(b, h); skips.append(h)
        h = block(m.mid_block, h)
        for b in m.out_blocks: h = block(b, h, skips.pop())
        ref = m.decoder_pred(m.norm(h))[:, m.extras:]
    torch.testing.assert_close(ours, torch.stack([ref[i, keep[i]] for i in range(2)]), atol=1e-10, rtol=1e-10)


def test_official_dit_s2_state_dict_loads_strictly():
    spec = json.loads((FIXTURES / 'dit_s2_official_state_dict.json').read_text())
    m = DiT_models['DiT-S/2'](**spec['config'])
    ours = {k: list(v.shape) for k, v in m.state_dict().items()}
    assert ours == spec['keys']
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) for k, s in spec['keys'].items()}
    res = m.load_state_dict(sd, strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    assert torch.equal(m.blocks[11].attn.qkv.weight, sd['blocks.11.attn.qkv.weight'])
    assert count_params(m) == spec['num_params'] == 32_963_360

def test_official_parameter_counts_and_flops():
    # DiT paper Table 4 "Gflops" (multiply-adds) at 256 tokens, and the official XL/2 parameter count.
    paper = {'DiT-S/2': 6.06, 'DiT-B/2': 23.01, 'DiT-L/2': 80.71, 'DiT-XL/2': 118.64,
             'DiT-S/4': 1.41, 'DiT-B/4': 5.56, 'DiT-L/4': 19.70, 'DiT-XL/4': 29.05, 'DiT-XL/8': 7.39}
    for name, gf in paper.items():
        with torch.device('meta'): m = DiT_models[name]()
        assert abs(flops_per_forward(m) / 1e9 / gf - 1) < 0.02, (name, flops_per_forward(m) / 1e9, gf)
    with torch.device('meta'): xl = DiT_models['DiT-XL/2']()
    assert count_params(xl) == 675_129_632
    # masking: cost falls with the number of kept tokens
    assert flops_per_forward(xl, num_tokens=26) < 0.12 * flops_per_forward(xl)

@torch.no_grad()
def test_dit_matches_diffusers_with_converted_weights():
    # An independent implementation: diffusers' DiTTransformer2DModel with our weights mapped onto it.
    diffusers = pytest.importorskip('diffusers')
    torch.manual_seed(0)
    m = randomize_zero_params_(tiny_dit(depth=2, hidden_size=32, num_heads=2, input_size=8, patch_size=2)).eval()
    d = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=3, out_channels=6,
                                         num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                         norm_eps=1e-6).eval()
    sd = m.state_dict()
    new = {'pos_embed.proj.weight': sd['x_embedder.proj.weight'], 'pos_embed.proj.bias': sd['x_embedder.proj.bias'],
           'proj_out_1.weight': sd['final_layer.adaLN_modulation.1.weight'], 'proj_out_1.bias': sd['final_layer.adaLN_modulation.1.bias'],
           'proj_out_2.weight': sd['final_layer.linear.weight'], 'proj_out_2.bias': sd['final_layer.linear.bias']}
    for i in range(2):
        o, b = f'blocks.{i}.', f'transformer_blocks.{i}.'
        emb = b + 'norm1.emb.'
        new.update({emb + 'timestep_embedder.linear_1.weight': sd['t_embedder.mlp.0.weight'], emb + 'timestep_embedder.linear_1.bias': sd['t_embedder.mlp.0.bias'],
                    emb + 'timestep_embedder.linear_2.weight': sd['t_embedder.mlp.2.weight'], emb + 'timestep_embedder.linear_2.bias': sd['t_embedder.mlp.2.bias'],
                    emb + 'class_embedder.embedding_table.weight': sd['y_embedder.embedding_table.weight'],
                    b + 'norm1.linear.weight': sd[o + 'adaLN_modulation.1.weight'], b + 'norm1.linear.bias': sd[o + 'adaLN_modulation.1.bias'],
                    b + 'attn1.to_out.0.weight': sd[o + 'attn.proj.weight'], b + 'attn1.to_out.0.bias': sd[o + 'attn.proj.bias'],
                    b + 'ff.net.0.proj.weight': sd[o + 'mlp.fc1.weight'], b + 'ff.net.0.proj.bias': sd[o + 'mlp.fc1.bias'],
                    b + 'ff.net.2.weight': sd[o + 'mlp.fc2.weight'], b + 'ff.net.2.bias': sd[o + 'mlp.fc2.bias']})
        for j, n in enumerate('qkv'):
            new[b + f'attn1.to_{n}.weight'] = sd[o + 'attn.qkv.weight'].chunk(3)[j]
            new[b + f'attn1.to_{n}.bias'] = sd[o + 'attn.qkv.bias'].chunk(3)[j]
        # diffusers' DiT divides the frequency exponent by (half - 1); the official DiT (and ours) by half
        d.transformer_blocks[i].norm1.emb.time_proj.downscale_freq_shift = 0
    missing, unexpected = d.load_state_dict(new, strict=False)
    assert not unexpected and all('pos_embed.pos_embed' in k for k in missing), (missing, unexpected)
    torch.testing.assert_close(d.pos_embed.pos_embed[0], m.pos_embed[0], atol=1e-6, rtol=0)
    x, t, y = inputs()
    ours = m(x, t, y)
    assert ours.abs().mean() > 1e-2
    torch.testing.assert_close(ours, d(x, t, class_labels=y).sample, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------- U-ViT
@pytest.mark.parametrize('p', [2, 4, 8])
@pytest.mark.parametrize('num_classes', [0, 10])
def test_uvit_shapes(p, num_classes):
    m = tiny_uvit(input_size=16, patch_size=p, num_classes=num_classes, learn_sigma=p == 4)
    x, t, y = inputs(s=16)
    y = y if num_classes else None
    assert m(x, t, y).shape == (2, m.out_channels, 16, 16)
    assert m.out_channels == (6 if p == 4 else 3) and m.extras == 1 + (num_classes > 0)
    assert m.pos_embed.shape == (1, m.extras + m.num_patches, 32)
    keep = torch.arange(m.num_patches)[::3].expand(2, -1)
    assert m(x, t, y, keep_idx=keep).shape == (2, keep.shape[1], p * p * m.out_channels)

def test_uvit_structure_and_maskdm_sizes():
    m = tiny_uvit(depth=13)
    assert (len(m.in_blocks), len(m.out_blocks)) == (6, 6)
    assert all(b.skip_linear is not None for b in m.out_blocks) and all(b.skip_linear is None for b in m.in_blocks)
    assert 'in_blocks.0.attn.qkv.bias' not in m.state_dict()          # qkv_bias=False like U-ViT/MaskDM
    with torch.device('meta'):
        assert abs(count_params(UViT_models['UViT-MaskDM-64']()) / 1e6 - 44) < 1      # MaskDM CelebA 64
        assert abs(count_params(UViT_models['UViT-MaskDM-256']()) / 1e6 - 102) < 2    # MaskDM CelebA-HQ 256
    conv = tiny_uvit(conv=True)
    x, t, y = inputs()
    assert conv(x, t, y).shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match='conv=True'): conv(x, t, y, keep_idx=torch.zeros(2, 3, dtype=torch.long))

def test_uvit_flops_counts_tokens():
    m = tiny_uvit(depth=5)
    n, L, d = m.num_patches, m.num_patches + 2, 32
    blocks = 5 * (12 * L * d * d + 2 * L * L * d) + 2 * L * 2 * d * d
    assert flops_per_forward(m) == n * 3 * 4 * d + blocks + n * d * 4 * 3


@pytest.mark.parametrize('make', [tiny_dit, tiny_uvit])
def test_learned_sigma_tokens_split_like_the_image(make):
    # masked loss on a learned-sigma model: the eps part of the tokens == patchify(eps channels of the image)
    torch.manual_seed(0)
    m = randomize_zero_params_(make(learn_sigma=True))
    x, t, y = inputs()
    with torch.no_grad():
        img = m(x, t, y)
        eps_tok, var_tok = split_token_channels(m(x, t, y, keep_idx=torch.arange(m.num_patches).expand(2, -1)),
                                                m.patch_size, m.in_channels)
    torch.testing.assert_close(eps_tok, m.patchify(img[:, :3]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(var_tok, m.patchify(img[:, 3:]), atol=1e-5, rtol=1e-5)

@pytest.mark.numerics                   # (bf16: CI runs it again where bf16 is emulated)
@pytest.mark.parametrize('make', [tiny_dit, tiny_uvit])
def test_bf16_autocast_close_to_fp32(make):
    torch.manual_seed(0)
    m = randomize_zero_params_(make())
    x, t, y = inputs()
    with torch.no_grad():
        ref = m(x, t, y)
        with torch.autocast('cpu', dtype=torch.bfloat16): out = m(x, t, y)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().mean() < 0.05 * ref.abs().mean()


# ----------------------------------------------------------------------------------------------- registry
def test_presets_and_build_model():
    assert {'DiT-S/2', 'DiT-B/4', 'DiT-L/8', 'DiT-XL/2', 'DiT-T/2'} <= set(DiT_models)
    assert {'UViT-T/2', 'UViT-S/4', 'UViT-B/4', 'UViT-MaskDM-64'} <= set(UViT_models)
    assert set(MODELS) == {'dit', 'uvit', 'maskdit'}
    m = build_model('dit', 'DiT-T/4', input_size=16, in_channels=1, num_classes=0, learn_sigma=False)
    assert isinstance(m, DiT) and (m.hidden_size, m.depth, m.patch_size, m.out_channels) == (192, 6, 4, 1)
    assert isinstance(build_model('UViT-T/4', input_size=8, in_channels=1), UViT)
    with pytest.raises(ConfigError, match='DiT-T/2'): build_model('dit', 'DiT-Z/2')
    with pytest.raises(ConfigError, match="unknown UViT option"): build_model('uvit', 'UViT-T/2', class_dropout_prob=0.1)


# ----------------------------------------------------------------------------------------------- golden slices
GOLDEN = FIXTURES / 'models_golden_slices.json'

def _golden_outputs():
    out = {}
    for name, make in [('dit', lambda: tiny_dit(input_size=16, depth=2)), ('uvit', lambda: tiny_uvit(input_size=16, depth=3))]:
        torch.manual_seed(0)
        m = randomize_zero_params_(make()).eval()
        x, t, y = inputs(s=16, seed=1)
        with torch.no_grad(): o = m(x, t, y)
        out[name] = o[0, -1, -3:, -3:].flatten().tolist()
    return out

def test_golden_slices():
    got = _golden_outputs()
    if REGEN or not GOLDEN.exists():
        GOLDEN.write_text(json.dumps(got, indent=1) + '\n')
        if not REGEN: pytest.fail(f'golden slices were missing; wrote {GOLDEN}, check it in')
    want = json.loads(GOLDEN.read_text())
    for k in want:
        assert max(abs(a) for a in got[k]) > 1e-2, k             # non-trivial outputs
        np.testing.assert_allclose(got[k], want[k], atol=1e-4, rtol=0, err_msg=k)
