"""A PyTorch GPT of nanoGPT's shape, timed like `bench train`, for a same-machine comparison.

Only for `gpt-jax bench train --torch_baseline` (needs the `hf` extra's torch): the same
layers, heads, width, context, batch and vocabulary as the config, pre-LayerNorm blocks,
`F.scaled_dot_product_attention(is_causal=True)` (what nanoGPT uses), tied head, AdamW, one
forward + backward + optimizer step per iteration, the median over `steps`.
"""

from __future__ import annotations

import statistics
import time


def time_torch_step(n_layer: int, n_head: int, n_embd: int, seq_len: int, batch_size: int,
                    vocab_size: int, *, steps: int = 20, warmup: int = 3) -> dict:
    try:  # optional: torch comes with the hf extra
        import torch
        import torch.nn.functional as F
        from torch import nn
    except ImportError as e:
        raise SystemExit(f"--torch_baseline needs torch (pip install 'gpt_jax[hf]'): {e}") from None

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
            self.qkv, self.proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
            self.fc, self.out = nn.Linear(n_embd, 4 * n_embd), nn.Linear(4 * n_embd, n_embd)

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
            self.ln_f = nn.LayerNorm(n_embd)

        def forward(self, tokens):
            x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1]))
            for block in self.blocks:
                x = block(x)
            return self.ln_f(x) @ self.wte.weight.T  # tied head

    torch.manual_seed(0)
    model = GPT()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    tokens = torch.randint(0, vocab_size, (batch_size, seq_len + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step():
        logits = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, vocab_size), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    for _ in range(warmup):
        step()
    times_s = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times_s.append(time.perf_counter() - t0)
    return {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "torch_step_time_s": statistics.median(times_s),
            "torch_step_time_min_s": min(times_s)}
