"""nanoGPT's training iteration in PyTorch, of a config's shape, for a same-machine comparison.

Only for `gpt-jax bench train --torch_baseline` (needs the `hf` extra's torch). What nanoGPT's
`train.py` does per iteration on a CPU (`--device=cpu --compile=False`), written here for this
comparison: sample the batch (a fresh `np.memmap` of uint16 tokens, `torch.randint` offsets,
`torch.stack` of int64 windows), forward (pre-LayerNorm blocks,
`F.scaled_dot_product_attention(is_causal=True)`, tied head), cross-entropy, backward,
`clip_grad_norm_(1.0)`, AdamW (weight decay 0.1 on the matrices only, betas (0.9, 0.99); the
fused kernel only where nanoGPT asks for it, on CUDA), `zero_grad(set_to_none=True)` and
`loss.item()` (its `--log_interval=1`); nanoGPT's initialisation. The tokens are uniform
random, like `bench train`'s.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np


def torch_iteration(n_layer: int, n_head: int, n_embd: int, seq_len: int, batch_size: int,
                    vocab_size: int, use_bias: bool = True):
    """(one nanoGPT iteration as a function returning its loss, torch's version, its thread
    count, the model's parameter count)."""
    try:  # optional: torch comes with the hf extra
        import torch
        import torch.nn.functional as F
        from torch import nn
    except ImportError as e:
        raise SystemExit(f"--torch_baseline needs torch (pip install 'gpt_jax[hf]'): {e}") from None

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            norm = lambda: nn.LayerNorm(n_embd, bias=use_bias)  # noqa: E731
            linear = lambda i, o: nn.Linear(i, o, bias=use_bias)  # noqa: E731
            self.ln_1, self.ln_2 = norm(), norm()
            self.qkv, self.proj = linear(n_embd, 3 * n_embd), linear(n_embd, n_embd)
            self.fc, self.out = linear(n_embd, 4 * n_embd), linear(4 * n_embd, n_embd)

        def forward(self, x):
            B, T, D = x.shape
            q, k, v = self.qkv(self.ln_1(x)).split(D, dim=2)
            q, k, v = (t.view(B, T, n_head, D // n_head).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(y.transpose(1, 2).reshape(B, T, D))
            return x + self.out(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(seq_len, n_embd)
            self.blocks = nn.ModuleList(Block() for _ in range(n_layer))
            self.ln_f = nn.LayerNorm(n_embd, bias=use_bias)

        def forward(self, tokens):
            x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1]))
            for block in self.blocks:
                x = block(x)
            return self.ln_f(x) @ self.wte.weight.T  # tied head

    torch.manual_seed(0)
    model = GPT()
    for name, p in model.named_parameters():  # nanoGPT's init: N(0, 0.02), residual outputs
        if p.dim() >= 2:                       # scaled by 1/sqrt(2 n_layer), zero biases
            residual = name.endswith(("proj.weight", "out.weight"))
            nn.init.normal_(p, 0.0, 0.02 / (2 * n_layer) ** 0.5 if residual else 0.02)
        elif ".ln_" not in name and not name.startswith("ln_"):
            nn.init.zeros_(p)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99))
    folder = tempfile.TemporaryDirectory(prefix="gpt_jax-torch-")  # held by `iteration` below
    path = os.path.join(folder.name, "train.bin")
    rng = np.random.default_rng(0)
    rng.integers(0, vocab_size, 1_000_000 + seq_len + 1, dtype=np.uint16).tofile(path)

    def get_batch():
        data = np.memmap(path, dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - seq_len, (batch_size,))
        x = torch.stack([torch.from_numpy(data[i:i + seq_len].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + seq_len].astype(np.int64))
                         for i in ix])
        return x, y

    def iteration() -> float:
        inputs, targets = get_batch()
        logits = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, vocab_size), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    iteration.folder = folder  # the token file goes when the iteration does
    n_params = sum(p.numel() for p in params)
    return iteration, torch.__version__, torch.get_num_threads(), n_params


def time_iterations(iteration, steps: int) -> list[float]:
    """Seconds of each of `steps` calls."""
    times_s = []
    for _ in range(steps):
        t0 = time.perf_counter()
        iteration()
        times_s.append(time.perf_counter() - t0)
    return times_s
