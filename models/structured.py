"""Structured linear layers: cheap drop-ins for dense FFN projections (Chatelain et al. 2021 ask whether such
parameters "cost little"). Shape suffixes: N rows, B blocks, I = in/B, O = out/B.

Monarch-style product (Dao et al. 2022) of two block-diagonal factors with a transpose between them:
  1. split the input into B blocks of I features; block b goes through its own I -> O matrix (R);
  2. transpose (B, O) -> (O, B): output feature o of every block meets the others;
  3. each of the O groups mixes its B values with its own B -> B matrix (L);
  4. transpose back and flatten to `out` features.
Every output depends on every input, with in*out/B + out*B parameters instead of in*out.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class MonarchLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, num_blocks: int):
        super().__init__()
        if in_features % num_blocks or out_features % num_blocks:
            raise ValueError(f"num_blocks={num_blocks} must divide in_features={in_features} and "
                             f"out_features={out_features}")
        self.in_features, self.out_features, self.num_blocks = in_features, out_features, num_blocks
        block_in, block_out = in_features // num_blocks, out_features // num_blocks
        self.blocks_right = nn.Parameter(torch.empty(num_blocks, block_out, block_in))  # R: [B, O, I]
        self.blocks_left = nn.Parameter(torch.empty(block_out, num_blocks, num_blocks))  # L: [O, B, B]

    def reset_parameters(self, std: float) -> None:
        """Match a dense layer's output scale: the product's variance is that of one std**2 * in matmul."""
        nn.init.normal_(self.blocks_right, std=std * math.sqrt(self.num_blocks))
        nn.init.normal_(self.blocks_left, std=1.0 / math.sqrt(self.num_blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_NBI = x.reshape(-1, self.num_blocks, self.in_features // self.num_blocks)
        h_BNO = torch.bmm(x_NBI.transpose(0, 1), self.blocks_right.transpose(1, 2))  # step 1
        h_ONB = h_BNO.permute(2, 1, 0)  # step 2
        y_ONB = torch.bmm(h_ONB, self.blocks_left.transpose(1, 2))  # step 3
        y_NBO = y_ONB.permute(1, 2, 0)  # step 4
        return y_NBO.reshape(*shape[:-1], self.out_features)
