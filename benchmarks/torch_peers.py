"""The PyTorch peers that `compare_torch.py` measures llm_jax against, on the same shapes.

- `hf`: Hugging Face `transformers` GPT2LMHeadModel (its default attention, SDPA), eager.
- `nanogpt` / `nanogpt_compile`: a nanoGPT-style GPT-2 written here (fused QKV projection,
  `F.scaled_dot_product_attention(is_causal=True)`, tied head), eager or under `torch.compile`.

Every peer trains like llm_jax's step: AdamW (b1 0.9, b2 0.95, weight decay 0.1 on matrices only),
gradients clipped to norm 1, fp32, on random tokens; tokens/s counts batch x seq_len per step.
torch and transformers are the `[bench]` extra: this module imports them only inside functions.
"""
from __future__ import annotations

import math
import os
import statistics
import time


def _torch():
    import torch

    return torch


def build_nanogpt(shape: dict):
    """A GPT-2-style decoder in plain torch: the same architecture and init as llm_jax's gpt2 style
    (learned positions, pre-LayerNorm, exact GELU, biases, tied embeddings)."""
    torch = _torch()
    nn = torch.nn
    F = torch.nn.functional
    d, n_layers, n_heads = shape["d_model"], shape["n_layers"], shape["n_heads"]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn_norm = nn.LayerNorm(d)
            self.qkv = nn.Linear(d, 3 * d)
            self.attn_out = nn.Linear(d, d)
            self.mlp_norm = nn.LayerNorm(d)
            self.up = nn.Linear(d, 4 * d)
            self.down = nn.Linear(4 * d, d)

        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = self.qkv(self.attn_norm(x)).split(d, dim=2)
            q, k, v = (t.view(B, T, n_heads, d // n_heads).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.attn_out(y.transpose(1, 2).reshape(B, T, d))
            return x + self.down(F.gelu(self.up(self.mlp_norm(x))))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.token_embed = nn.Embedding(shape["vocab_size"], d)
            self.position_embed = nn.Embedding(shape["seq_len"], d)
            self.blocks = nn.ModuleList(Block() for _ in range(n_layers))
            self.final_norm = nn.LayerNorm(d)
            for name, p in self.named_parameters():
                if p.dim() == 2:  # residual projections get GPT-2's scaled init, as llm_jax's
                    std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("attn_out.weight", "down.weight")) else 0.02
                    nn.init.normal_(p, 0.0, std)
                elif name.endswith("bias"):
                    nn.init.zeros_(p)

        def forward(self, tokens, targets):
            positions = torch.arange(tokens.shape[1], device=tokens.device)
            x = self.token_embed(tokens) + self.position_embed(positions)
            for block in self.blocks:
                x = block(x)
            logits = self.final_norm(x) @ self.token_embed.weight.t()  # tied head
            return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets[:, 1:].reshape(-1))

    return GPT()


def build_hf_gpt2(shape: dict, positions: int | None = None):
    """transformers' GPT2LMHeadModel with this shape, dropout off."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=shape["vocab_size"], n_positions=positions or shape["seq_len"],
                        n_embd=shape["d_model"], n_layer=shape["n_layers"], n_head=shape["n_heads"],
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    return GPT2LMHeadModel(config)


def _adamw(torch, model):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=3e-4, betas=(0.9, 0.95), eps=1e-8)


def _set_threads(torch, threads: int):
    torch.set_num_threads(threads or os.cpu_count() or 1)


def train_row(impl: str, shape: dict, *, steps: int, warmup: int, seed: int, threads: int = 0) -> dict:
    """Times `steps` training steps of one peer after `warmup` untimed ones (the first of which
    includes torch.compile's compilation, reported as compile_s)."""
    torch = _torch()
    _set_threads(torch, threads)
    torch.manual_seed(seed)
    if impl == "hf":
        model = build_hf_gpt2(shape)
        forward = lambda tokens: model(input_ids=tokens, labels=tokens).loss  # noqa: E731  (shifts inside)
    elif impl in ("nanogpt", "nanogpt_compile"):
        model = build_nanogpt(shape)
        compiled = torch.compile(model) if impl == "nanogpt_compile" else model
        forward = lambda tokens: compiled(tokens, tokens)  # noqa: E731
    else:
        raise ValueError(f"unknown torch implementation {impl!r}")
    model.train()
    optimizer = _adamw(torch, model)
    params = list(model.parameters())
    generator = torch.Generator().manual_seed(seed)
    B, T, V = shape["batch_size"], shape["seq_len"], shape["vocab_size"]
    batches = [torch.randint(0, V, (B, T), generator=generator) for _ in range(4)]

    def step(tokens):
        loss = forward(tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss = step(batches[i % len(batches)])
        times.append(time.perf_counter() - start)
    timed = times[warmup:]
    step_time = statistics.median(timed)
    return dict(impl=impl, params_total=sum(p.numel() for p in params), step_time_ms=1e3 * step_time,
                step_time_ms_min=1e3 * min(timed), step_time_ms_max=1e3 * max(timed),
                tokens_per_sec=B * T / step_time, compile_s=max(0.0, times[0] - step_time), loss=loss,
                threads=torch.get_num_threads(), torch_version=torch.__version__)


def sample_row(shape: dict, *, batch_size: int, prompt_len: int, new_tokens: int, repeats: int, seed: int,
               use_cache: bool = True, threads: int = 0) -> dict:
    """HF `generate`: temperature-1 sampling of exactly `new_tokens` tokens per row (no EOS)."""
    torch = _torch()
    import transformers

    _set_threads(torch, threads)
    torch.manual_seed(seed)
    model = build_hf_gpt2(shape, positions=prompt_len + new_tokens).eval()
    prompt = torch.randint(3, shape["vocab_size"], (batch_size, prompt_len),
                           generator=torch.Generator().manual_seed(seed))

    def call():
        with torch.inference_mode():
            return model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0,
                                  top_k=0, top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  use_cache=use_cache, pad_token_id=0, eos_token_id=None)

    start = time.perf_counter()
    out = call()  # warm-up
    first_s = time.perf_counter() - start
    if out.shape != (batch_size, prompt_len + new_tokens):
        raise RuntimeError(f"generate returned shape {tuple(out.shape)}")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return dict(tokens_per_sec=batch_size * new_tokens / median, call_s=median, first_call_s=first_s,
                threads=torch.get_num_threads(), transformers_version=transformers.__version__)
