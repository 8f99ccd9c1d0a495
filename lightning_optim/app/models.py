"""The main job's model: a tiny GPT in plain PyTorch.

GPT-2 style (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"):
learned token and position embeddings, pre-LayerNorm blocks of causal self-attention and a
4x GELU MLP with residual connections, a final LayerNorm, and an output head whose weight IS
the token embedding (weight tying, Press & Wolf 2017, "Using the Output Embedding to Improve
Language Models"). Tying makes the embedding receive a gradient for every vocabulary row at
every step, through the softmax, which is where Adam's per-row second moment makes the
embeddings drift together and Coupled Adam matters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..validation import invalid

__all__ = ["TinyGPT"]


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    """A GPT-2-style causal language model with the output head tied to the token embedding.

    ``forward(idx)`` maps token ids ``(batch, time)``, ``time <= seq_len``, to next-token
    logits ``(batch, time, vocab)``. Parameter names follow GPT-2's: ``wte`` (token
    embedding, also the head's weight), ``wpe`` (positions), ``h.<i>`` (blocks), ``ln_f``.
    Initialisation as GPT-2: normal(0, 0.02), residual projections scaled by
    ``1/sqrt(2 * n_layers)``.
    """

    def __init__(self, vocab: int, d_model: int, n_layers: int, n_heads: int, seq_len: int, dropout: float = 0.0) -> None:
        super().__init__()
        for name, value in (("vocab", vocab), ("d_model", d_model), ("n_layers", n_layers), ("n_heads", n_heads),
                            ("seq_len", seq_len)):
            if isinstance(value, bool) or not (isinstance(value, int) and value >= 1):
                raise invalid("TinyGPT", name, value, "must be an int >= 1")
        if d_model % n_heads:
            raise invalid("TinyGPT", "d_model", d_model, f"must be a multiple of n_heads={n_heads}")
        if isinstance(dropout, bool) or not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise invalid("TinyGPT", "dropout", dropout, "must be in [0, 1)")
        self.seq_len = seq_len
        self.wte = nn.Embedding(vocab, d_model)
        self.wpe = nn.Embedding(seq_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(Block(d_model, n_heads, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.wte.weight  # weight tying: one tensor
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, 0.0, 0.02 / (2 * n_layers) ** 0.5)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, 0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.seq_len:
            raise ValueError(f"TinyGPT: sequence length {t} is longer than seq_len={self.seq_len}")
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(t, device=idx.device)))
        for block in self.h:
            x = block(x)
        return self.head(self.ln_f(x))
