"""diffusers attention processors that route the attention product through ``mmalign.kernels.attention``.

Each processor reproduces the projections, norms and output layers of the diffusers processor it replaces and
changes only the attention call. A call that carries an attention mask goes to PyTorch SDPA with that mask,
because the fused kernels take none. ``mmalign.kernels.install`` picks the processor for each layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmalign.kernels.dispatch import Backend, attention


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None,
    backend: Backend,
) -> torch.Tensor:
    """(B, H, N, D) attention with an optional additive or boolean mask broadcastable to (B, H, N_q, N_k)."""
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return attention(q, k, v, scale=scale, backend=backend)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H*D) -> (B, H, N, D) as a view."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) -> (B, N, H*D)."""
    return x.transpose(1, 2).flatten(2)


def _maybe(norm, x: torch.Tensor) -> torch.Tensor:
    return x if norm is None else norm(x)


class _Processor:
    def __init__(self, backend: Backend = "auto") -> None:
        self.backend = backend

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self.backend!r})"


class AttentionProcessor(_Processor):
    """For diffusers ``Attention`` self- and cross-attention (UNet transformer blocks, VAE mid-blocks).

    Replaces ``AttnProcessor`` / ``AttnProcessor2_0``: optional spatial and group norms, (B, C, H, W) inputs,
    cross-attention context norm, q/k norms, output projection, residual and output rescaling. Uses the
    module's ``attn.scale``.
    """

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if image_shape is not None:
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        batch = hidden_states.shape[0]

        if attention_mask is not None:
            n_k = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape[1]
            attention_mask = attn.prepare_attention_mask(attention_mask, n_k, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        q = _maybe(attn.norm_q, _split_heads(attn.to_q(hidden_states), attn.heads))
        k = _maybe(attn.norm_k, _split_heads(attn.to_k(encoder_hidden_states), attn.heads))
        v = _split_heads(attn.to_v(encoder_hidden_states), attn.heads)
        out = _merge_heads(_attend(q, k, v, attention_mask, attn.scale, self.backend)).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))

        if image_shape is not None:
            out = out.transpose(1, 2).reshape(image_shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class JointAttentionProcessor(_Processor):
    """For SD3-style joint attention (replaces ``JointAttnProcessor2_0``): image and context tokens attend together.

    Token order is [image, context], as in diffusers. Unlike the processor it replaces, it honours a mask.
    """

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        n_image = hidden_states.shape[1]
        q = _maybe(attn.norm_q, _split_heads(attn.to_q(hidden_states), attn.heads))
        k = _maybe(attn.norm_k, _split_heads(attn.to_k(hidden_states), attn.heads))
        v = _split_heads(attn.to_v(hidden_states), attn.heads)
        if encoder_hidden_states is not None:
            cq = _maybe(attn.norm_added_q, _split_heads(attn.add_q_proj(encoder_hidden_states), attn.heads))
            ck = _maybe(attn.norm_added_k, _split_heads(attn.add_k_proj(encoder_hidden_states), attn.heads))
            cv = _split_heads(attn.add_v_proj(encoder_hidden_states), attn.heads)
            q, k, v = torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)

        out = _merge_heads(_attend(q, k, v, attention_mask, attn.scale, self.backend)).to(q.dtype)
        image = attn.to_out[1](attn.to_out[0](out[:, :n_image]))
        if encoder_hidden_states is None:
            return image
        context = out[:, n_image:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return image, context


class FluxAttentionProcessor(_Processor):
    """For diffusers ``FluxAttention`` (replaces ``FluxAttnProcessor``): double- and single-stream Flux blocks.

    Token order is [context, image]; rotary embeddings are applied to q and k after the q/k RMS norms.
    """

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.embeddings import apply_rotary_emb

        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if attn.fused_projections:
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        # Flux keeps tokens in (B, N, H, D) until the attention call.
        q, k, v = (x.unflatten(-1, (-1, attn.head_dim)) for x in (q, k, v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if joint:
            if attn.fused_projections:
                cq, ck, cv = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                cq = attn.add_q_proj(encoder_hidden_states)
                ck = attn.add_k_proj(encoder_hidden_states)
                cv = attn.add_v_proj(encoder_hidden_states)
            cq, ck, cv = (x.unflatten(-1, (-1, attn.head_dim)) for x in (cq, ck, cv))
            cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
            q, k, v = torch.cat([cq, q], dim=1), torch.cat([ck, k], dim=1), torch.cat([cv, v], dim=1)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)

        out = _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention_mask, None, self.backend)
        out = _merge_heads(out).to(q.dtype)
        if encoder_hidden_states is None:
            return out
        n_context = encoder_hidden_states.shape[1]
        context, image = out[:, :n_context], out[:, n_context:]
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        return image, attn.to_add_out(context.contiguous())
