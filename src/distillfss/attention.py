"""Dense cross-attention with the support mask as value (the DCAMA block).

For a query layer with tokens x (Nq, d) and support tokens s (Ns = K*h*w, d), one head computes
softmax(q k^T / sqrt(d_k)) @ m, where q = Wq(x + pe), k = Wk(s + pe) and m holds the support mask values at the
layer's resolution. The heads' outputs are averaged: one scalar per query pixel, the layer's *coarse mask*.

Several classes, each with its own subset of shots, share one attention pass: the scores q k^T do not depend on
the class. With ``valid[c, j]`` = 1 where support token j belongs to a shot of class c, the class-c output of a
softmax restricted to its shots equals

    softmax_all(S) @ (valid_c * m_c)  /  softmax_all(S) @ valid_c

(the full-softmax normaliser cancels). So one fused ``scaled_dot_product_attention`` call with 2*C value channels
serves every class and every leave-one-out episode, and never materialises the Nq x Ns score matrix.

The ratio is exact in real arithmetic only. Tokens that **no** class may use (a leave-one-out query's own image)
are therefore removed from the softmax itself by a boolean attention mask: otherwise a self-match that leads the
best allowed token by more than ~28 nats makes numerator and denominator underflow together and the coarse mask
comes out wrong (common on real images: a query matches itself far better than any other image). The ratio is
left to separate classes whose shots differ, where every key is a real support image of the domain.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_EPS = 1e-12
# Attention dropout runs PyTorch's math kernel, which materialises the (B, heads, Nq, Ns) score matrix (~4 GB for one
# stride-8 layer at 384 px, K = 5, 5 episodes): the queries are then split so that one call holds at most this many
# bytes of scores. The softmax runs over the keys, so a split over queries is exact.
SCORE_BYTES = 256 * 2**20


def sinusoidal_encoding(n_tokens: int, dim: int, device: torch.device | None = None) -> Tensor:
    """Transformer sinusoidal positional encoding over a flattened token index -> (n_tokens, dim)."""
    pos = torch.arange(n_tokens, dtype=torch.float32, device=device).unsqueeze(1)
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * (-math.log(10000.0) / dim))
    pe = torch.zeros(n_tokens, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)[:, : dim // 2]
    return pe


class MaskAttention(nn.Module):
    """One dense cross-attention block shared by all layers of one feature group.

    The projections start as the identity, so before any training the block already matches query and support
    features by their (pretrained) similarity rather than by random directions.
    """

    def __init__(self, dim: int, heads: int, pe_dropout: float = 0.0, attn_dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"{heads} heads do not divide the feature width {dim}")
        self.dim, self.heads = dim, heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        for lin in (self.q_proj, self.k_proj):
            nn.init.eye_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.pe_dropout = nn.Dropout(pe_dropout)
        self.attn_dropout = attn_dropout

    def _tokens(self, feats: Tensor, proj: nn.Linear) -> Tensor:
        """(N, C, h, w) -> projected, position-encoded tokens (N, heads, h*w, d_k)."""
        n, c, h, w = feats.shape
        x = feats.flatten(2).transpose(1, 2)  # (N, hw, C)
        x = self.pe_dropout(x + sinusoidal_encoding(h * w, c, feats.device).to(x.dtype))
        return proj(x).view(n, h * w, self.heads, c // self.heads).transpose(1, 2)  # (N, heads, hw, d_k)

    def keys(self, support: Tensor) -> Tensor:
        """support features (K, C, h, w) -> keys (heads, K*h*w, d_k), shot-major token order."""
        k = self._tokens(support, self.k_proj)  # (K, heads, hw, d_k)
        return k.transpose(0, 1).flatten(1, 2)  # (heads, K*hw, d_k)

    def episode_keys(self, support: Tensor, shots: int) -> Tensor:
        """Keys of B independent episodes: support features (B*K, C, h, w), episode-major -> (B, heads, K*h*w, d_k)."""
        k = self._tokens(support, self.k_proj)  # (B*K, heads, hw, d_k)
        n, heads, hw, d = k.shape
        return k.view(n // shots, shots, heads, hw, d).transpose(1, 2).flatten(2, 3)

    def forward(self, query: Tensor, keys: Tensor, masks: Tensor, valid: Tensor) -> Tensor:
        """Coarse masks of every class for a batch of queries.

        Args:
            query: query features (B, C, h, w).
            keys: from :meth:`keys`, (heads, Ns, d_k) with Ns = K*h*w, shared by the batch; or per query
                (B, heads, Ns, d_k) from :meth:`episode_keys`.
            masks: support mask values per class at this resolution, (C_cls, Ns) in [0, 1]; or per query
                (B, C_cls, Ns).
            valid: which shots each query may use for each class, (B, C_cls, Ns) in {0, 1}.

        Returns:
            (B, C_cls, h, w) coarse masks in [0, 1]; 0 for a class with no valid shot.
        """
        b, _, h, w = query.shape
        n_cls = masks.shape[-2]
        q = self._tokens(query, self.q_proj)  # (B, heads, hw, d_k)
        k = keys if keys.dim() == 4 else keys.unsqueeze(0).expand(b, -1, -1, -1)  # (B, heads, Ns, d_k)
        num = valid * (masks if masks.dim() == 3 else masks.unsqueeze(0))  # (B, C_cls, Ns)
        allowed = key_mask(valid)  # (B, 1, 1, Ns): tokens no class may use (the query's own image) leave the softmax
        p = self.attn_dropout if self.training else 0.0
        if p > 0:
            # Dropout must hit the numerator only: the renormaliser is the dropout-free softmax mass.
            o_num = _sdpa(q, k, num, dropout_p=p, mask=allowed)  # (B, heads, hw, C_cls)
            o_den = _sdpa(q, k, valid, mask=allowed)
        else:
            o = _sdpa(q, k, torch.cat([num, valid], dim=1), mask=allowed)  # (B, heads, hw, 2*C_cls)
            o_num, o_den = o[..., :n_cls], o[..., n_cls:]
        out = (o_num / o_den.clamp_min(_EPS)).mean(dim=1)  # (B, hw, C_cls)
        return out.transpose(1, 2).reshape(b, n_cls, h, w)


def key_mask(valid: Tensor) -> Tensor | None:
    """valid (B, C_cls, Ns) -> boolean attention mask (B, 1, 1, Ns): True where at least one class may use the token.

    None when every token of every query is usable (inference: the fused kernel then runs unmasked). A query with
    no usable token at all keeps every token (its outputs are 0 through the value channels, never NaN).
    """
    usable = valid.amax(dim=1) > 0  # (B, Ns)
    if bool(usable.all()):
        return None
    usable = usable | ~usable.any(dim=1, keepdim=True)
    return usable[:, None, None, :]


def _sdpa(q: Tensor, k: Tensor, values: Tensor, dropout_p: float = 0.0, mask: Tensor | None = None) -> Tensor:
    """Fused attention of q (B, heads, Nq, d) over k (B, heads, Ns, d) with per-batch values (B, V, Ns);
    ``mask`` (B, 1, 1, Ns) bool keeps the True keys only.

    PyTorch's fused CPU/GPU kernels need q, k and v to share their last dimension, so the V value channels are
    zero-padded to a common width, a multiple of 8 (zeros leave the scores unchanged; the scale is passed explicitly).
    Returns (B, heads, Nq, V).
    """
    b, heads, _, d = q.shape
    n_val = values.shape[1]
    width = -(-max(d, n_val) // 8) * 8  # multiples of 8 keep the fused CUDA kernels eligible
    q, k = F.pad(q, (0, width - d)), F.pad(k, (0, width - d))
    v = F.pad(values.transpose(1, 2), (0, width - n_val))  # (B, Ns, width)
    v = v.unsqueeze(1).expand(-1, heads, -1, -1)  # (B, heads, Ns, width)
    rows = q.shape[2] if dropout_p == 0 else query_rows(q.shape, k.shape[2], q.element_size())
    out = torch.cat(
        [
            F.scaled_dot_product_attention(
                q[:, :, i : i + rows], k, v, attn_mask=mask, dropout_p=dropout_p, scale=1.0 / math.sqrt(d)
            )
            for i in range(0, q.shape[2], rows)
        ],
        dim=2,
    )
    return out[..., :n_val]


def query_rows(q_shape: torch.Size, n_keys: int, item_bytes: int, budget: int | None = None) -> int:
    """How many query tokens one attention call may take so that its scores stay within ``budget`` bytes."""
    b, heads, n_q = q_shape[0], q_shape[1], q_shape[2]
    per_row = b * heads * n_keys * item_bytes
    return max(1, min(n_q, (SCORE_BYTES if budget is None else budget) // per_row))


def reference_mask_attention(
    block: MaskAttention, query: Tensor, support: Tensor, masks: Tensor, valid: Tensor
) -> Tensor:
    """Plain per-query, per-class loop of DCAMA's attention over each class's own shots (tests only).

    Shapes as in :meth:`MaskAttention.forward`, with ``support`` the raw (K, C, h, w) features.
    """
    keys = block.keys(support)  # (heads, Ns, d_k)
    q = block._tokens(query, block.q_proj)  # (B, heads, hw, d_k)
    b, _, h, w = query.shape
    out = torch.zeros(b, masks.shape[0], h * w, dtype=query.dtype)
    for i in range(b):
        for c in range(masks.shape[0]):
            sel = valid[i, c].bool()
            if not sel.any():
                continue
            scores = q[i] @ keys[:, sel].transpose(1, 2) / math.sqrt(q.shape[-1])  # (heads, hw, n_sel)
            out[i, c] = (scores.softmax(-1) @ masks[c, sel]).mean(0)  # (hw,)
    return out.view(b, -1, h, w)
