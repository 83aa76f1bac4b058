"""PyTorch contenders for `jaxgrok bench`: how the reference implementations train, one model at a
time (`torch_loop`), and the strongest PyTorch alternative for many small models, a torch.func
ensemble (`torch_vmap`). Same task, model, optimizer, step count and evaluation cadence as jaxgrok."""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap


class MLP(nn.Module):
    """The quick-start model in PyTorch: two embeddings, concatenated, one hidden layer."""

    def __init__(self, n_symbols, n_classes, d_embed, d_hidden):
        super().__init__()
        self.embed_a = nn.Embedding(n_symbols, d_embed)
        self.embed_b = nn.Embedding(n_symbols, d_embed)
        self.hidden = nn.Linear(2 * d_embed, d_hidden)
        self.out = nn.Linear(d_hidden, n_classes)

    def forward(self, pairs):
        x = torch.cat([self.embed_a(pairs[:, 0]), self.embed_b(pairs[:, 1])], -1)
        return self.out(torch.relu(self.hidden(x)))


class Transformer(nn.Module):
    """Nanda et al.'s 1-layer transformer, no LayerNorm, logits at the last position."""

    def __init__(self, n_symbols, n_classes, d_model, n_heads, d_mlp):
        super().__init__()
        self.h, self.dh = n_heads, d_model // n_heads
        self.embed = nn.Embedding(n_symbols + 1, d_model)
        self.pos = nn.Parameter(torch.randn(3, d_model) / d_model**0.5)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.o = nn.Linear(d_model, d_model, bias=False)
        self.mlp_in, self.mlp_out = nn.Linear(d_model, d_mlp), nn.Linear(d_mlp, d_model)
        self.unembed = nn.Linear(d_model, n_classes, bias=False)
        self.register_buffer("eq", torch.tensor([n_symbols]))
        self.register_buffer("causal", ~torch.tril(torch.ones(3, 3, dtype=torch.bool)))

    def forward(self, pairs):
        tokens = torch.cat([pairs, self.eq.expand(len(pairs)).unsqueeze(1)], 1)
        x = self.embed(tokens) + self.pos
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.h, self.dh).permute(2, 0, 3, 1, 4)
        # Explicit attention: torch.func has no batching rule for the fused CPU kernel of
        # scaled_dot_product_attention, which would handicap torch_vmap.
        scores = (q @ k.transpose(-1, -2)) / self.dh**0.5
        z = torch.softmax(scores.masked_fill(self.causal, float("-inf")), -1) @ v
        x = x + self.o(z.transpose(1, 2).reshape(n, t, d))
        x = x + self.mlp_out(torch.relu(self.mlp_in(x)))
        return self.unembed(x[:, -1])


def _model(static, table):
    m = static.model
    if m.kind == "mlp":
        return MLP(table.n_symbols, table.n_classes, m.d_embed, m.d_hidden)
    if m.kind == "transformer" and m.n_layers == 1 and not m.layer_norm:
        return Transformer(table.n_symbols, table.n_classes, m.d_model, m.n_heads, m.d_mlp)
    raise ValueError(f"no PyTorch contender for {m}")


def _data(static, table, n_train):
    inputs = torch.as_tensor(table.inputs, dtype=torch.long)
    targets = torch.as_tensor(table.targets, dtype=torch.long)
    order = torch.as_tensor(np.random.default_rng(0).permutation(len(targets)))
    return inputs, targets, order[:n_train]


def _adamw(params, cfg, lr, wd):
    """AdamW with jaxgrok's betas and a linear warm-up from 0, as in the reference implementations."""
    opt = torch.optim.AdamW(params, lr=lr, betas=(cfg.beta1, cfg.beta2), weight_decay=wd)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(s / max(cfg.warmup_steps, 1), 1.0))


def _train(cfg, params, lr, wd, loss_fn, eval_fn) -> None:
    """The training loop both contenders share: AdamW steps on loss_fn(), eval_fn() every eval_every
    steps (it ends in a host sync, as the reference implementations' logging does)."""
    opt, sched = _adamw(params, cfg, lr, wd)
    for step in range(1, cfg.steps + 1):
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % cfg.eval_every == 0:
            with torch.no_grad():
                eval_fn()


def torch_loop(static, table, n_train, n_runs, lr, wd) -> float:
    """Seconds to train n_runs models one after another, the reference implementations' way."""
    inputs, targets, train_idx = _data(static, table, n_train)
    x, y = inputs[train_idx], targets[train_idx]
    start = time.perf_counter()
    for r in range(n_runs):
        torch.manual_seed(r)
        model = _model(static, table)
        _train(static.train, model.parameters(), lr, wd,
               loss_fn=lambda model=model: nn.functional.cross_entropy(model(x), y),
               eval_fn=lambda model=model: (model(inputs).argmax(-1) == targets).float().mean().item())
    return time.perf_counter() - start


def torch_vmap(static, table, n_train, n_runs, lr, wd) -> float:
    """Seconds to train n_runs models together as a torch.func ensemble (stacked parameters, vmap
    over functional_call, one AdamW over the stacked tensors)."""
    inputs, targets, train_idx = _data(static, table, n_train)
    x, y = inputs[train_idx], targets[train_idx]
    models = []
    for r in range(n_runs):
        torch.manual_seed(r)
        models.append(_model(static, table))
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    forward = vmap(lambda p, b, data: functional_call(base, (p, b), (data,)), in_dims=(0, 0, None))

    def loss_fn():
        logits = forward(params, buffers, x)  # [runs, n_train, classes]
        # The sum of per-run mean losses: each run's gradient is its own loss's gradient.
        return nn.functional.cross_entropy(logits.flatten(0, 1), y.repeat(n_runs), reduction="sum") / len(y)

    start = time.perf_counter()
    _train(static.train, params.values(), lr, wd, loss_fn,
           eval_fn=lambda: (forward(params, buffers, inputs).argmax(-1) == targets).float().mean(-1).cpu().numpy())
    return time.perf_counter() - start
