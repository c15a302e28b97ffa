"""The attentive probe's module: a learned query attending over an image's cached tokens (heads.AttentiveProbe).

The layout of V-JEPA's AttentivePooler + linear classifier (facebookresearch/jepa), parameter for
parameter (query_tokens, norm1, q, kv, proj, norm2, mlp, linear). The cross-attention is computed with
the key and value projections moved off the tokens: a query's score of token x is q . (Wk x + bk) =
(Wk^T q) . x + q . bk, and its output is Wv (sum_t a_t x_t) + bv since the attention weights sum to one.
The same numbers (tests/test_tokens.py checks them against torch's scaled_dot_product_attention on
projected keys and values) at 1/T of the cost for one query over T tokens: the reason one epoch on a
token cache costs a small part of a backbone epoch.
"""

from __future__ import annotations

import torch
from torch import nn


class AttentivePooler(nn.Module):
    def __init__(self, width: int, n_tokens: int, heads: int, queries: int, mlp_ratio: float, classes: int):
        super().__init__()
        self.width, self.n_tokens, self.heads = width, n_tokens, heads
        self.query_tokens = nn.Parameter(torch.zeros(1, queries, width))
        nn.init.trunc_normal_(self.query_tokens, std=0.02)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q, self.kv, self.proj = nn.Linear(width, width), nn.Linear(width, 2 * width), nn.Linear(width, width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.linear = nn.Linear(width, classes)

    def tokens(self, X: torch.Tensor) -> torch.Tensor:
        """Rows [N, T * C] as layer-normed tokens [N, T, C]."""
        return self.norm1(X.reshape(len(X), self.n_tokens, self.width))

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        x = self.tokens(X)
        h, c = self.heads, self.width // self.heads
        query = self.q(self.query_tokens[0]).reshape(-1, h, c).transpose(0, 1)  # [h, Q, c]
        w_k, w_v = self.kv.weight[:self.width].reshape(h, c, self.width), self.kv.weight[self.width:].reshape(h, c, self.width)
        folded = torch.einsum("hqc,hci->hqi", query, w_k)  # each head's query in token space [h, Q, C]
        attention = (torch.einsum("nti,hqi->nhqt", x, folded) * c ** -0.5).softmax(-1)  # q . bk is the same for all t
        pooled = torch.einsum("nhqt,nti->nhqi", attention, x)  # each head's weighted mean token [N, h, Q, C]
        values = torch.einsum("nhqi,hci->nqhc", pooled, w_v) + self.kv.bias[self.width:].reshape(h, c)
        out = self.query_tokens + self.proj(values.reshape(len(x), -1, self.width))
        out = out + self.mlp(self.norm2(out))
        return self.linear(out.mean(1))
