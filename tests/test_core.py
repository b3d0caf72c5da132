"""Core: presets, tokenizer, tuning-encoder, prompts with S*, dual path (Eq. 2, Eq. 5)."""
import copy
import math

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

import dualpath
import model

DOG = 1929  # "dog</w>" in the CLIP vocabulary


def test_sd15_arch_has_96_qkv_matrices_averaging_715946_parameters(sd15_meta):
    names = dualpath.lora_layer_names(sd15_meta.unet)
    shapes = model.lora_shapes(sd15_meta.unet, names)
    assert len(names) == 96  # Sec. 4.1: "Stable Diffusion contains 96 such matrices"
    assert round(sum(a * b for a, b in shapes) / len(shapes)) == 715947  # 715,946.67
    assert int(sum(a * b for a, b in shapes) / len(shapes)) == 715946
    assert sd15_meta.unet.config.cross_attention_dim == 768
    assert sum(p.numel() for p in sd15_meta.image_encoder.parameters()) > 600e6  # ViT-H-14 tower


def test_sd15_arch_mid_block_map_is_1280x8x8_and_clip_map_1280x16x16(sd15_meta):
    unet = sd15_meta.unet
    z = torch.zeros(1, 4, 64, 64, device="meta")
    emb = torch.zeros(1, 77, 768, device="meta")
    out = model.unet_encoder_features(unet, z, torch.zeros(1, dtype=torch.long, device="meta"), emb)
    assert tuple(out.shape) == (1, 1280, 8, 8)
    img = torch.zeros(1, 3, 224, 224, device="meta")
    assert tuple(model.clip_spatial_features(sd15_meta.image_encoder, img).shape) == (1, 1280, 16, 16)


def test_tokenizer_matches_sd15_ids():
    tok = model.build_tokenizer()
    ids = tok("a photo of a dog in the snow", padding="max_length", max_length=12).input_ids
    assert ids == [49406, 320, 1125, 539, 320, 1929, 530, 518, 2583, 49407, 49407, 49407]
    assert len(tok) == 49408


def test_placeholder_takes_exactly_one_slot(tiny):
    comps, _ = tiny
    ids, mask = model.tokenize_with_placeholder(comps.tokenizer, ["a photo of S* on the beach", "S* and S*"])
    assert mask.sum(1).tolist() == [1, 2]
    assert ids[0, :4].tolist() == [49406, 320, 1125, 539] and mask[0, 4]
    ref = comps.tokenizer("a photo of dog on the beach", padding="max_length", max_length=77).input_ids
    assert torch.where(mask, torch.tensor(DOG), ids)[0].tolist() == ref


def test_encoder_at_init_predicts_zero_delta_w_with_expected_shapes(tiny):
    comps, names = tiny
    torch.manual_seed(0)
    enc = model.build_encoder(comps, names)
    clip_img, z, t = torch.randn(3, 3, 224, 224), torch.randn(3, 4, 16, 16), torch.tensor([1, 400, 999])
    v, lora = model.encode(enc, comps, clip_img, z, t)
    assert v.shape == (3, comps.cfg.token_dim)
    assert list(lora) == names
    r = comps.cfg.lora_rank
    for name, (din, dout) in zip(names, model.lora_shapes(comps.unet, names)):
        A, B = lora[name]
        assert A.shape == (3, din, r) and B.shape == (3, r, dout)
        assert torch.equal(B, torch.zeros_like(B))  # Sec. 4.1: B head zero-initialised
        assert A.abs().sum() > 0
    # ... so the LoRA'd UNet is exactly the base UNet at init.
    C = torch.randn(3, 77, comps.cfg.token_dim)
    base = comps.unet(z, t, encoder_hidden_states=C).sample
    lora_out = comps.unet(z, t, encoder_hidden_states=C, cross_attention_kwargs=dualpath.dual_path_kwargs(lora, alpha=1.0)).sample
    assert torch.equal(base, lora_out)
    assert math.isfinite(v.sum().item())


def _manual_attention(attn, x, ctx, W_delta):
    """Reference: softmax(Q K^T / sqrt(d)) V with explicitly merged weights W + Delta W."""
    def proj(lin, inp, key):
        W = lin.weight.T + W_delta.get(key, 0)  # (D_in, D_out)
        out = inp @ W
        return out + lin.bias if lin.bias is not None else out

    q, k, v = proj(attn.to_q, x, "to_q"), proj(attn.to_k, ctx, "to_k"), proj(attn.to_v, ctx, "to_v")
    N, h = x.shape[0], attn.heads
    split = lambda t: t.view(N, t.shape[1], h, -1).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    o = (w @ v).transpose(1, 2).reshape(N, x.shape[1], -1)
    return attn.to_out[0](o)


@pytest.mark.parametrize("which", ["attn1", "attn2"])
def test_eq5_single_processor_call_matches_formula(tiny, which):
    comps, names = tiny
    attn_name = next(n for n in dualpath.attention_layer_names(comps.unet) if n.endswith(which))
    attn = dict(comps.unet.named_modules())[attn_name]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, attn.to_q.in_features, generator=g)
    C = torch.randn(1, 77, comps.cfg.token_dim, generator=g)
    C_h = C.clone()
    C_h[:, 5] = torch.randn(comps.cfg.token_dim, generator=g)  # differ at the S* slot
    lora, deltas, s = {}, {}, 0.7
    for p in dualpath.LORA_PROJECTIONS:
        lin = getattr(attn, p)
        A = torch.randn(1, lin.in_features, 3, generator=g) * 0.3
        B = torch.randn(1, 3, lin.out_features, generator=g) * 0.3
        lora[f"{attn_name}.{p}"] = (A, B)
        deltas[p] = s * (A[0] @ B[0])
    alpha = 0.3
    enc, enc_h = (None, None) if which == "attn1" else (C, C_h)
    out = attn(x, encoder_hidden_states=enc, **dualpath.dual_path_kwargs(lora, C_h, alpha=alpha, lora_scale=s))
    ctx, ctx_h = (x, x) if which == "attn1" else (C, C_h)
    # Eq. (5): alpha * Attn(f, C, W + AB) + (1 - alpha) * Attn(f, C_h, W)
    ref = alpha * _manual_attention(attn, x, ctx, deltas) + (1 - alpha) * _manual_attention(attn, x, ctx_h, {})
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    # And the two paths really differ, so the blend is not trivially satisfied.
    assert (_manual_attention(attn, x, ctx, deltas) - _manual_attention(attn, x, ctx_h, {})).abs().max() > 1e-3


def _random_lora(names, shapes, n, r=2, scale=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        name: (torch.randn(n, din, r, generator=g) * scale, torch.randn(n, r, dout, generator=g) * scale)
        for name, (din, dout) in zip(names, shapes)
    }


def _vanilla_copy(unet, merged=None, s=1.0):
    """Deep copy of the UNet with diffusers' own processor and, optionally, W + s*A*B merged in."""
    ref = copy.deepcopy(unet)
    ref.set_attn_processor(AttnProcessor2_0())
    if merged:
        mods = dict(ref.named_modules())
        with torch.no_grad():
            for name, (A, B) in merged.items():
                mods[name].weight += s * (A[0] @ B[0]).T  # nn.Linear stores W^T
    return ref


def _inputs(comps, n=1, seed=3):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 4, 16, 16, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    C = torch.randn(n, 77, comps.cfg.token_dim, generator=g)
    C_h = C.clone()
    C_h[:, 5] += 1.0
    return z, t, C, C_h


def test_alpha0_is_the_vanilla_unet_with_hard_prompt(tiny):
    comps, names = tiny
    z, t, C, C_h = _inputs(comps)
    lora = _random_lora(names, model.lora_shapes(comps.unet, names), 1)
    out = comps.unet(z, t, encoder_hidden_states=C, cross_attention_kwargs=dualpath.dual_path_kwargs(lora, C_h, alpha=0.0)).sample
    ref = _vanilla_copy(comps.unet)(z, t, encoder_hidden_states=C_h).sample
    assert torch.allclose(out, ref, atol=1e-5)
    assert not torch.allclose(ref, _vanilla_copy(comps.unet)(z, t, encoder_hidden_states=C).sample, atol=1e-4)


def test_alpha1_is_the_single_lora_path_with_merged_weights(tiny):
    comps, names = tiny
    z, t, C, C_h = _inputs(comps)
    lora = _random_lora(names, model.lora_shapes(comps.unet, names), 1)
    out = comps.unet(z, t, encoder_hidden_states=C, cross_attention_kwargs=dualpath.dual_path_kwargs(lora, C_h, alpha=1.0, lora_scale=0.5)).sample
    ref = _vanilla_copy(comps.unet, merged=lora, s=0.5)(z, t, encoder_hidden_states=C).sample
    assert torch.allclose(out, ref, atol=1e-4), (out - ref).abs().max()
    assert not torch.allclose(out, _vanilla_copy(comps.unet)(z, t, encoder_hidden_states=C).sample, atol=1e-3)


def test_alpha1_skips_the_hard_path(tiny):
    comps, names = tiny
    z, t, C, _ = _inputs(comps)
    # With alpha = 1 no C_h is needed at all; with alpha < 1 its absence is an error.
    comps.unet(z, t, encoder_hidden_states=C, cross_attention_kwargs=dualpath.dual_path_kwargs(None, None, alpha=1.0))
    with pytest.raises(ValueError, match="hard_encoder_hidden_states"):
        comps.unet(z, t, encoder_hidden_states=C, cross_attention_kwargs=dualpath.dual_path_kwargs(None, None, alpha=0.5))


def test_per_sample_lora_on_a_batch_equals_each_sample_alone(tiny):
    comps, names = tiny
    z, t, C, C_h = _inputs(comps, n=3)
    lora = _random_lora(names, model.lora_shapes(comps.unet, names), 3)
    kw = lambda lo, ch: dualpath.dual_path_kwargs(lo, ch, alpha=0.25)  # noqa: E731
    batch = comps.unet(z, t, encoder_hidden_states=C, cross_attention_kwargs=kw(lora, C_h)).sample
    for i in range(3):
        lo_i = {k: (A[i : i + 1], B[i : i + 1]) for k, (A, B) in lora.items()}
        alone = comps.unet(z[i : i + 1], t[i : i + 1], encoder_hidden_states=C[i : i + 1],
                           cross_attention_kwargs=kw(lo_i, C_h[i : i + 1])).sample
        assert torch.allclose(batch[i : i + 1], alone, atol=1e-5)
    assert not torch.allclose(batch[0], batch[1])


def test_real_token_row_as_v_star_reproduces_the_real_prompt(tiny):
    comps, _ = tiny
    te, tok = comps.text_encoder, comps.tokenizer
    v = comps.token_table[DOG].detach().clone()[None]  # (1, D)
    soft = model.encode_prompt(te, tok, ["a photo of S* in the snow"], v_star=v)
    hard = model.encode_prompt(te, tok, ["a photo of S* in the snow"], hard_ids=torch.tensor([DOG]))
    ids = tok(["a photo of dog in the snow"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    real = te(input_ids=ids).last_hidden_state
    assert torch.allclose(soft, real, atol=1e-6) and torch.allclose(hard, real, atol=1e-6)
    # A different v* changes the output, and gradients reach v*.
    v2 = (v + torch.randn_like(v)).requires_grad_(True)
    out = model.encode_prompt(te, tok, ["a photo of S* in the snow"], v_star=v2)
    assert not torch.allclose(out, real, atol=1e-3)
    out.sum().backward()
    assert v2.grad is not None and v2.grad.abs().sum() > 0


def test_nearest_tokens_finds_the_row_and_excludes_special_tokens(tiny):
    comps, _ = tiny
    table = comps.token_table
    ids, cos = model.nearest_tokens(table[[DOG, 320]] * 3.0, table, k=2)
    assert ids[:, 0].tolist() == [DOG, 320] and torch.allclose(cos[:, 0], torch.ones(2), atol=1e-5)
    ids, _ = model.nearest_tokens(table[[model.BOS_ID, model.EOS_ID]], table, k=3)
    assert not set(ids.flatten().tolist()) & set(model.SPECIAL_IDS)


def test_a_row_of_zeros_is_no_word_for_the_nearest_token_search_or_the_typical_norm(tiny):
    """A text encoder that never learned most of its rows (the toy world's) marks them with zeros:
    neither Eq. (3)'s positives, the hard token nor v*'s starting norm may come from them."""
    comps, _ = tiny
    table = comps.token_table.detach().clone()
    words = [320, 2368, DOG, 3309]  # a, cat, dog, wearing
    kept = table[words].clone()
    table.zero_()
    table[words] = kept
    v = torch.randn(64, table.shape[1], generator=torch.Generator().manual_seed(0))
    ids, _ = model.nearest_tokens(v, table, k=4)
    assert set(ids.flatten().tolist()) == set(words)  # only the four words, whatever v is
    near = model.nearest_words(comps.tokenizer, table, kept[2:3] * 2, k=2)
    assert near[0][0] == ("dog", 1.0) and near[0][1][0] in {"a", "cat", "wearing"}
    assert model.typical_token_norm(table) == pytest.approx(kept.norm(dim=-1).median().item(), rel=1e-6)
    assert model.word_rows(table).sum() == 4
    ids, _ = model.nearest_tokens(v, comps.token_table, k=1)  # a table without zero rows: nothing excluded
    assert len(set(ids.flatten().tolist())) > 4


def test_alpha1_costs_one_path_and_alpha_below_1_shares_the_query(tiny):
    """Count projection calls: alpha = 1 runs each q/k/v once (plain LoRA); alpha < 1 adds only
    the hard path's k/v of C_h in attn2 (the q projection, and attn1's k/v, are shared)."""
    comps, names = tiny
    z, t, C, C_h = _inputs(comps)
    calls = {"to_q": 0, "to_k": 0, "to_v": 0}
    hooks = []
    for name, m in comps.unet.named_modules():
        for p in calls:
            if name.endswith(p) and name.rsplit(".", 1)[0] in dualpath.attention_layer_names(comps.unet):
                hooks.append(m.register_forward_hook(lambda mod, i, o, p=p: calls.__setitem__(p, calls[p] + 1)))
    n_attn = len(dualpath.attention_layer_names(comps.unet))
    try:
        comps.unet(z, t, encoder_hidden_states=C, cross_attention_kwargs=dualpath.dual_path_kwargs(None, C_h, alpha=1.0))
        assert calls == {"to_q": n_attn, "to_k": n_attn, "to_v": n_attn}
        calls.update(to_q=0, to_k=0, to_v=0)
        comps.unet(z, t, encoder_hidden_states=C, cross_attention_kwargs=dualpath.dual_path_kwargs(None, C_h, alpha=0.25))
        assert calls == {"to_q": n_attn, "to_k": n_attn + n_attn // 2, "to_v": n_attn + n_attn // 2}
    finally:
        for h in hooks:
            h.remove()
