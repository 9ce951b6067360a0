"""Shared pieces of the training tests: a fast tiny-model config and a metrics reader."""

from __future__ import annotations

import json
import math
from pathlib import Path

from adgen.config import deep_merge


def tiny_overrides(model_dir, data, out, **over) -> dict:
    """Fast settings: 8 short AdGen examples (no system prompt, cut at 64 tokens), fp32, no dropout."""
    base = {
        "model": str(model_dir),
        "train_data": str(data),
        "output_dir": str(out),
        "max_samples": 8,
        "system_prompt": None,
        "max_length": 64,
        "batch_size": 2,
        "grad_accum": 1,
        "max_steps": 6,
        "lr": 5e-3,
        "warmup_steps": 0,
        "save_every": 0,
        "eval_every": 0,
        "precision": "fp32",
        "progress": False,
        "plot": False,
        "lora": {"dropout": 0.0, "target_modules": "all-linear"},
    }
    return deep_merge(base, over)


def tiny_config(model_dir, data, out, **over):
    from adgen.train.config import load_train_config

    return load_train_config(None, tiny_overrides(model_dir, data, out, **over))


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def train_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def eval_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["eval_loss"] for r in read_metrics(run_dir) if "eval_loss" in r}


# ---- error bounds for comparing two float computations of the same sums -------------------------------------------

FP32_EPS = 2.0**-23  # fp32's machine epsilon: twice its unit roundoff (room for exp / log, good to an ulp, not half)
BF16_EPS = 2.0**-7  # bf16's (8 significant bits)


def gamma(n: int, eps: float = FP32_EPS) -> float:
    """gamma_n = n u / (1 - n u) with u = eps: a sum of n terms computed in floating point, in any order or blocking,
    is within gamma_{n-1} * sum|terms| of the exact sum (Higham, Accuracy and Stability of Numerical Algorithms,
    2nd ed., eq. 3.5 and section 4.2); a dot product of length n, within gamma_n * sum|products|."""
    k = n * eps
    assert k < 0.5, (n, eps)
    return k / (1 - k)


def gamma_prob(n: int, lam: float = 10.0, eps: float = FP32_EPS) -> float:
    """The probabilistic gamma_n of Higham & Mary ("A new approach to probabilistic rounding error analysis", SIAM J.
    Sci. Comput. 41(5), 2019): with rounding errors modelled as independent and mean-zero, an n-term dot product is
    within exp(lam sqrt(n) u + n u^2 / (1 - u)) - 1 times sum|products| of the exact one, with probability at least
    1 - 2n exp(-lam^2 (1 - u)^2 / 2) (lam = 10: 1 - 5e-17 for n = 128k). For sums as long as a 128k vocabulary, where
    the worst case n u is 1.5%, far above any rounding actually seen, and too loose to catch a wrong result."""
    k = lam * n**0.5 * eps + n * eps * eps / (1 - eps)
    assert k < 0.5, (n, lam, eps)
    return math.expm1(k)


def sum_bound(abs_terms, n: int, eps: float = FP32_EPS, computations: int = 2):
    """How far `computations` evaluations of the same n-term sums (matmul entries, reductions) may be apart,
    whatever BLAS, order or blocking each uses: computations * gamma_n * sum|terms|. `abs_terms`: the sums of the
    terms' absolute values, from the actual tensors (|A| @ |B| for A @ B)."""
    return computations * gamma(n, eps) * abs_terms


def assert_within(actual, expected, bound, what: str = "") -> None:
    """|actual - expected| <= bound elementwise (bound broadcasts), compared in fp64."""
    import torch

    err = (actual.detach().double() - expected.detach().double()).abs()
    bound = torch.as_tensor(bound).detach().to(device=err.device, dtype=torch.float64).expand_as(err)
    over = err > bound
    if bool(over.any()):
        ratio = (err / bound.clamp_min(1e-300))[over]
        raise AssertionError(f"{what}: {int(over.sum())} of {err.numel()} elements over their bound; worst "
                             f"|diff| / bound {float(ratio.max()):.3g}, largest |diff| {float(err.max()):.3g}")


def decoder_chain(config, seq_len: int) -> int:
    """The summed lengths of the sums one value passes through in a decoder forward or backward: per layer the
    norm's and projections' widths, a head's dot products, the keys (up to the row) and the MLP. Errors along a
    chain add up (gamma_a + gamma_b <= gamma_{a+b}); a bound with this length covers the whole chain."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers * (3 * config.hidden_size + head_dim + seq_len + config.intermediate_size)


def head_bounds(hidden, weight, targets, chain: int = 0):
    """How far two fp32 computations of an LM head's summed cross-entropy and its gradients may be apart, from the
    actual tensors: (loss bound, hidden-gradient bound [N, H], weight-gradient bound [V, H]). Logits: sums over the
    width, plus `chain` for hidden states that two computations reached by different routes. p = softmax: relative
    error of exp per term and a vocabulary-long sum, plus what the logits' errors do to it (<= 2 max |logit
    error|). Gradients: (p - one-hot) @ weight, a sum over the vocabulary; (p - one-hot).T @ hidden, over the rows.
    Probabilistic gammas (`gamma_prob`): the worst case over a 128k vocabulary allows ~10% of the hidden gradient."""
    import torch

    n, (vocab, width) = hidden.shape[0], weight.shape
    rows = torch.arange(n)
    with torch.no_grad():
        h_abs, w_abs = hidden.abs().float(), weight.abs().float()
        probs = (hidden.float() @ weight.float().T).softmax(-1)
        logit_err = gamma_prob(width + chain) * (h_abs @ w_abs.T).amax(-1, keepdim=True)
        delta = gamma_prob(vocab + 50) + 2 * logit_err  # + eps |log p|
        g_abs = probs.clone()
        g_abs[rows, targets] = 1 - probs[rows, targets]  # |p - one-hot|
        loss = -probs[rows, targets].log()
        g_err = delta * probs + FP32_EPS * g_abs
        loss_bound = 2 * (float(delta.sum() + FP32_EPS * loss.sum()) + gamma_prob(n) * float(loss.sum()))
        gh_bound = 2 * (g_err @ w_abs + gamma_prob(vocab) * (g_abs @ w_abs))
        gw_bound = 2 * (g_err.T @ h_abs + gamma_prob(n) * (g_abs.T @ h_abs))
    return loss_bound, gh_bound, gw_bound


def backprop_bound(outputs, params, bound, draws: int = 4, seed: int = 0) -> list:
    """An error bound on `outputs` (elementwise) carried back to the gradients of `params`, the way rounding errors
    travel: with random signs (independent, mean-zero), `draws` draws, 4x their RMS per element. The graph is kept."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    spread = [torch.zeros_like(p) for p in params]
    for _ in range(draws):
        signs = torch.randint(0, 2, bound.shape, generator=gen).to(bound.dtype) * 2 - 1
        grads = torch.autograd.grad(outputs, params, (signs * bound).to(outputs.dtype), retain_graph=True,
                                    allow_unused=True)
        for s, g in zip(spread, grads):
            if g is not None:
                s += g.double().square() / draws
    return [4 * s.sqrt() for s in spread]


def logits_bound(model, hidden, seq_len: int):
    """How far two fp32 forwards of the same tokens by different routes (kernels, layouts, caches) may put each logit
    apart: the decoder's chain of sums (`decoder_chain`) and the head's width, carried to the logits by the head's
    |hidden| @ |weight|.T (hidden: the last hidden states, [..., H]). Probabilistic gammas (`gamma_prob`)."""
    config = model.config
    weight = model.get_output_embeddings().weight.detach().abs().to(hidden.dtype)
    chain = decoder_chain(config, seq_len) + config.hidden_size
    return 2 * gamma_prob(chain) * (hidden.detach().abs() @ weight.T)
