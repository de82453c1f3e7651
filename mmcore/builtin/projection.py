"""The projection of single-modality runs (vision_only, text_only): [Linear] then L2 norm."""

import torch.nn.functional as F
from torch import nn


class UnimodalProjection(nn.Module):
    """``Linear(in_dim, proj_dim)`` when ``proj_dim`` is set, then L2 normalization."""

    def __init__(self, in_dim, proj_dim=None):
        super().__init__()
        if proj_dim is not None and proj_dim <= 0:
            raise ValueError(f"projection size must be > 0 (got {proj_dim})")
        self.linear = nn.Linear(in_dim, proj_dim) if proj_dim else nn.Identity()
        self.out_dim = proj_dim or in_dim

    def forward(self, features):
        return F.normalize(self.linear(features), dim=-1)
