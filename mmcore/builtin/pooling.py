"""Token poolings: ``mean``, ``cls`` and ``attention``.

Each pooling turns encoder tokens [B, N, D] plus a mask [B, N] (True = a real token, or None:
all real) into one vector per sample [B, D] (:class:`mmcore.interfaces.Pooling`). Padded tokens
never influence the result. ``attention`` has parameters, so the feature cache stores tokens for
it; ``mean`` and ``cls`` have none, so it stores their pooled vectors.
"""

import attrs
import torch
from torch import nn

from mmcore.interfaces import NoParams, Pooling
from mmcore.plugins.hookspecs import hookimpl
from mmcore.validators import at_least, in_range


def _full_mask(tokens, mask):
    """The mask as bool, or an all-True mask when none is given."""
    if mask is None:
        return torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    return mask.to(device=tokens.device, dtype=torch.bool)


@attrs.frozen(kw_only=True)
class MeanParams:
    """``skip_cls_token``: leave the CLS token out of the mean (encoders that have one)."""

    skip_cls_token: bool = False


class MeanPooling(Pooling):
    """Mean over the real tokens; padded tokens are ignored."""

    def __init__(self, skip_first_token=False):
        super().__init__()
        self.skip_first_token = skip_first_token

    def forward(self, tokens, mask=None):
        mask = _full_mask(tokens, mask)
        if self.skip_first_token:
            tokens, mask = tokens[:, 1:], mask[:, 1:]
        weights = mask.unsqueeze(-1).to(torch.float32)
        # masked_fill, not a product: a NaN/inf in a padded slot must not leak into the sum
        total = tokens.float().masked_fill(~mask.unsqueeze(-1), 0.0).sum(dim=1)
        count = weights.sum(dim=1).clamp(min=1.0)
        return (total / count).to(tokens.dtype)


def build_mean(params, dim, has_cls_token):
    return MeanPooling(skip_first_token=params.skip_cls_token and has_cls_token)


class ClsPooling(Pooling):
    """The first token (the encoder's CLS token)."""

    def forward(self, tokens, mask=None):
        return tokens[:, 0]


def cls_token_problem(encoder="this encoder"):
    """What is wrong with ``cls`` pooling on an encoder without a CLS token (one message for the
    recipe check, which knows the encoder's name, and for the build, which does not)."""
    return f"pooling 'cls' needs an encoder with a CLS token; {encoder} has none — use mean or attention"


def build_cls(params, dim, has_cls_token):
    if not has_cls_token:
        raise ValueError(cls_token_problem())
    return ClsPooling()


@attrs.frozen(kw_only=True)
class AttentionParams:
    """``heads``: attention heads (must divide the token dimension); ``dropout`` on the weights."""

    heads: int = attrs.field(default=1, validator=at_least(1))
    dropout: float = attrs.field(default=0.0, validator=in_range(0.0, 1.0))


class AttentionPooling(Pooling):
    """A learned query attends over the real tokens (multi-head attention pooling)."""

    def __init__(self, dim, heads=1, dropout=0.0):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, dim) * dim**-0.5)
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)

    def forward(self, tokens, mask=None):
        # cached tokens may be half precision; autocast (if on) lowers them again for the matmuls
        tokens = tokens.to(self.query.dtype)
        query = self.query.expand(tokens.shape[0], -1, -1)
        if mask is None:
            # every token is real (a fixed-length batch): no padding mask, so the fused
            # scaled-dot-product kernels apply
            return self.attention(query, tokens, tokens, need_weights=False)[0][:, 0]
        mask = _full_mask(tokens, mask)
        # zero the padding so that even NaN/inf there cannot reach the output through 0 * x
        tokens = tokens.masked_fill(~mask.unsqueeze(-1), 0.0)
        ignore = ~mask
        # a sample without any real token would give NaN (softmax over nothing): let it attend
        # to its zeroed tokens instead
        ignore = ignore & mask.any(dim=1, keepdim=True)
        pooled, _ = self.attention(
            query, tokens, tokens, key_padding_mask=ignore, need_weights=False
        )
        return pooled[:, 0]


def build_attention(params, dim, has_cls_token):
    if dim % params.heads:
        raise ValueError(
            f"pooling 'attention': heads must divide the token dimension {dim} "
            f"(got heads = {params.heads})"
        )
    return AttentionPooling(dim, heads=params.heads, dropout=params.dropout)


@hookimpl
def register_poolings(register):
    register("mean", build_mean, MeanParams)
    register("cls", build_cls, NoParams)
    register("attention", build_attention, AttentionParams)
