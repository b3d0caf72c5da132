"""
dualpath.py -- per-sample LoRA (Eq. 2) and the dual-path attention blend (Eq. 5).

Sec. 4.1: the hypernetwork predicts, for each of SD 1.5's 96 attention projections
(q, k, v of attn1 and attn2 in 16 transformer blocks), a low-rank offset
    W' = W + Delta W = W + s * A B                                           Eq. (2)
with A (D_in, r), B (r, D_out). We apply it as  x W + s * (x A) B  with batched matmuls, one
(A, B) per sample, and never build the full-size W + Delta W.

Sec. 4.3: every attention layer runs twice and the outputs are blended,
    out = alpha * Attn(f, C, W + A B) + (1 - alpha) * Attn(f, C_h, W)        Eq. (5)
C holds the soft token v*, C_h the same prompt with v* replaced by its nearest real token.
For self-attention (attn1) the condition is f itself; only the weights differ.

Usage
    names = install_dual_path(unet)       # processors on all attn1/attn2, returns LoRA names
    unet(z_t, t, encoder_hidden_states=C,
         cross_attention_kwargs=dual_path_kwargs(lora, C_h, alpha=0.25, lora_scale=s))
With no cross_attention_kwargs the processors are plain attention (the vanilla UNet).
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from einops import rearrange

LORA_PROJECTIONS = ("to_q", "to_k", "to_v")
# Module paths of the attention layers inside transformer blocks, e.g.
# "down_blocks.0.attentions.1.transformer_blocks.0.attn2" (also mid_block / up_blocks).
_ATTN_PATH = re.compile(r"(^|\.)transformer_blocks\.\d+\.attn[12]$")


def attention_layer_names(unet) -> list[str]:
    """Module paths of attn1/attn2 in every transformer block (32 for SD 1.5)."""
    return [name for name, _ in unet.named_modules() if _ATTN_PATH.search(name)]


def lora_layer_names(unet) -> list[str]:
    """Module paths of the q/k/v projections that get LoRA (96 for SD 1.5, Sec. 4.1)."""
    attn = attention_layer_names(unet)
    n_blocks = sum(1 for name, _ in unet.named_modules() if re.search(r"transformer_blocks\.\d+$", name))
    names = [f"{a}.{p}" for a in attn for p in LORA_PROJECTIONS]
    # Two attention layers per transformer block, three projections each.
    assert len(attn) == 2 * n_blocks and len(names) == 6 * n_blocks, (len(attn), n_blocks)
    return names


def add_lora(y: torch.Tensor, x: torch.Tensor, AB, scale: float) -> torch.Tensor:
    """Eq. (2) without building W': given y = x W, return x W + s * (x A) B, one (A, B) per sample.

    x (N, L, D_in); A (N|1, D_in, r); B (N|1, r, D_out). A batch of 1 broadcasts over N.
    AB = None returns y unchanged (no LoRA on this projection).
    """
    if AB is None:
        return y
    A, B = AB
    return y + scale * torch.matmul(torch.matmul(x, A.to(x.dtype)), B.to(x.dtype))  # Eq. (2): (N, L, D_out)


def lora_linear(x: torch.Tensor, linear: torch.nn.Linear, AB, scale: float) -> torch.Tensor:
    """x (W + s A B) for one nn.Linear, per sample (Eq. 2)."""
    return add_lora(linear(x), x, AB, scale)


def dual_path_kwargs(lora=None, hard_encoder_hidden_states=None, alpha: float = 1.0, lora_scale: float = 1.0) -> dict:
    """The per-call inputs of the processors, for `cross_attention_kwargs`.

    lora: {module path of a projection: (A, B)}; hard_encoder_hidden_states: C_h (N, 77, D),
    needed whenever alpha < 1; alpha: alpha_blend of Eq. (5); lora_scale: s of Eq. (2).
    """
    return dict(lora=lora, hard_encoder_hidden_states=hard_encoder_hidden_states, alpha=float(alpha),
                lora_scale=float(lora_scale))


class DualPathAttnProcessor:
    """Attention processor computing Eq. (5) with per-sample LoRA (Eq. 2) on the soft path.

    The two paths share what they have in common (the base q projection of f, and for attn1
    the base k/v of f) and run through one scaled-dot-product-attention call on a doubled
    batch. Blending happens before the output projection: to_out is affine, so
    a*to_out(x) + (1-a)*to_out(y) = to_out(a*x + (1-a)*y), and one projection serves both.
    alpha = 1 runs the soft path alone (plain per-sample LoRA), alpha = 0 the hard path alone.
    """

    def __init__(self, name: str):
        self.name = name  # module path of this Attention, to find its (A, B) in `lora`

    # diffusers forwards only the cross_attention_kwargs that __call__ names explicitly.
    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        lora: dict | None = None,
        hard_encoder_hidden_states: torch.Tensor | None = None,
        alpha: float = 1.0,
        lora_scale: float = 1.0,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            n, c, hgt, wid = hidden_states.shape
            hidden_states = hidden_states.view(n, c, hgt * wid).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        N = hidden_states.shape[0]

        self_attn = encoder_hidden_states is None
        if self_attn:
            ctx = ctx_h = hidden_states  # attn1: the condition is f itself
        else:
            ctx, ctx_h = encoder_hidden_states, hard_encoder_hidden_states
            if alpha < 1 and ctx_h is None:
                raise ValueError(f"{self.name}: alpha_blend < 1 needs hard_encoder_hidden_states (C_h)")
            if attn.norm_cross:
                ctx = attn.norm_encoder_hidden_states(ctx)
                ctx_h = attn.norm_encoder_hidden_states(ctx_h) if ctx_h is not None else None

        q, k, v = self._queries_keys_values(attn, hidden_states, ctx, ctx_h, self_attn, lora, alpha, lora_scale)

        M = q.shape[0]  # N, or 2N for the doubled batch
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, k.shape[1], N)
            attention_mask = attention_mask.view(N, attn.heads, -1, attention_mask.shape[-1])
            attention_mask = attention_mask.repeat(M // N, 1, 1, 1)
        q, k, v = (rearrange(x, "m l (h d) -> m h l d", h=attn.heads) for x in (q, k, v))  # (M, heads, L, hd)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        out = rearrange(out, "m h l d -> m l (h d)").to(q.dtype)  # (M, Lq, inner)
        if M != N:
            out_soft, out_hard = out[:N], out[N:]
            out = alpha * out_soft + (1 - alpha) * out_hard  # Eq. (5), before the affine to_out

        out = attn.to_out[1](attn.to_out[0](out))  # linear, dropout
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(n, c, hgt, wid)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _queries_keys_values(self, attn, f, ctx, ctx_h, self_attn: bool, lora, alpha: float, lora_scale: float):
        """q, k, v of the path(s) alpha asks for: the soft path (C, W + s A B) and/or the hard path
        (C_h, W). For 0 < alpha < 1 both, stacked on a doubled batch [soft; hard]."""
        lq = lk = lv = None
        if lora is not None:
            lq, lk, lv = (lora.get(f"{self.name}.{p}") for p in LORA_PROJECTIONS)
        if alpha >= 1:  # the soft path alone: plain per-sample LoRA, no extra compute
            return (lora_linear(f, attn.to_q, lq, lora_scale), lora_linear(ctx, attn.to_k, lk, lora_scale),
                    lora_linear(ctx, attn.to_v, lv, lora_scale))
        if alpha <= 0:  # the hard path alone: the vanilla weights with C_h
            return attn.to_q(f), attn.to_k(ctx_h), attn.to_v(ctx_h)
        q_h = attn.to_q(f)  # shared: f W_q
        q_s = add_lora(q_h, f, lq, lora_scale)
        if self_attn:  # shared: f W_k, f W_v
            k_h, v_h = attn.to_k(ctx), attn.to_v(ctx)
            k_s, v_s = add_lora(k_h, ctx, lk, lora_scale), add_lora(v_h, ctx, lv, lora_scale)
        else:
            k_s, v_s = lora_linear(ctx, attn.to_k, lk, lora_scale), lora_linear(ctx, attn.to_v, lv, lora_scale)
            k_h, v_h = attn.to_k(ctx_h), attn.to_v(ctx_h)
        return torch.cat([q_s, q_h]), torch.cat([k_s, k_h]), torch.cat([v_s, v_h])  # one attention call for both


def dual_path_installed(unet) -> bool:
    """Does every attention layer of this UNet run a DualPathAttnProcessor? (A UNet with diffusers'
    own processors ignores the dual path's cross_attention_kwargs with only a logged warning: a
    concept's ΔW and hard prompt would silently be left out.)"""
    return all(isinstance(p, DualPathAttnProcessor) for p in unet.attn_processors.values())


def install_dual_path(unet) -> list[str]:
    """Put a DualPathAttnProcessor on every attn1/attn2; return the LoRA layer names (Eq. 2)."""
    names = set(attention_layer_names(unet))
    for name, module in unet.named_modules():
        if name in names:
            module.set_processor(DualPathAttnProcessor(name))
    return lora_layer_names(unet)
