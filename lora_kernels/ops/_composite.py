"""The ops written as plain differentiable torch ops, for what the kernels cannot serve.

The kernels' outputs are constants to autograd. Two routes therefore take these compositions:
* a backward recorded for a second derivative (``create_graph=True`` with anything it reads
  requiring grad: gradient penalties, Hessian-vector products): the gradient formulas below, so
  that autograd differentiates them;
* forward-mode AD and torch.func transforms (dual tensors, jvp, vmap, grad): the forward below,
  whose every op has its own derivative rules.
Same maths as the kernels, same dropout mask (the serving backend's, passed in as `keep`), in the
input dtype. Slower than the kernels (no fusion, Python loop over adapters): never the common path.
Everything is 2-D: x (M, K), weight (N, K), bias (N,) | None; single adapter lora_a (r, K),
lora_b (N, r); multi-adapter lora_a (L, R, K), lora_b (L, N, R), scales (L,).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import fallback


def dropped(t: Tensor, keep: Tensor | None, dropout_p: float) -> Tensor:
    """dropout(t) with the (M, K) bool keep-mask `keep`; t itself when keep is None (no dropout)."""
    return t if keep is None else fallback.apply_keep_mask(t, keep, dropout_p)


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                scale: float, dropout_p: float, keep: Tensor | None) -> Tensor:
    """y (M, N) = x W0ᵀ + b + s · (dropout(x) Aᵀ) Bᵀ."""
    hidden = dropped(x, keep, dropout_p) @ lora_a.T                              # (M, r)
    return F.linear(x, weight, bias) + scale * (hidden @ lora_b.T)              # scale last, as the reference


def lora_linear_grads(
    grad_y: Tensor, x: Tensor | None, weight: Tensor | None, lora_a: Tensor | None, lora_b: Tensor | None,
    hidden: Tensor | None, scale: float, dropout_p: float, keep: Tensor | None,
    need_x: bool, need_a: bool, need_b: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(dX (M, K), dA (r, K), dB (N, r)), None where not asked for:
    dT = s·dY·B;  dX = dY·W0 + dropout(dT·A);  dA = dTᵀ·dropout(x);  dB = s·dYᵀ·T,
    hidden being T = dropout(x) Aᵀ (M, r), differentiable in x and A wherever they require grad."""
    grad_x = grad_a = grad_b = None
    if need_x or need_a:
        grad_t = (grad_y @ lora_b) * scale                                      # (M, r)
        if need_x:
            grad_x = grad_y @ weight + dropped(grad_t @ lora_a, keep, dropout_p)
        if need_a:
            grad_a = grad_t.T @ dropped(x, keep, dropout_p)
    if need_b:
        grad_b = grad_y.T @ (hidden * scale)
    return grad_x, grad_a, grad_b


def _adapter_blocks(sorted_rows: Tensor, adapter_starts: Tensor, ranks: Tensor | None, scales: Tensor,
                    max_rank: int) -> list[tuple[int, Tensor, int, float]]:
    """(j, rows of adapter j (m_j,), its rank, its scale) for each adapter with rows and rank > 0,
    grouped exactly as the torch backend groups them."""
    counts, host_ranks, host_scales, active = fallback.host_groups(adapter_starts, ranks, scales, max_rank)
    starts = adapter_starts.tolist()
    return [(j, sorted_rows[starts[j]:starts[j] + counts[j]], host_ranks[j], host_scales[j]) for j in active]


def multi_lora_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scales: Tensor,
    sorted_rows: Tensor, adapter_starts: Tensor, ranks: Tensor | None,
) -> Tensor:
    """y (M, N): F.linear, then per adapter j over its rows, + s_j · (X_j A_jᵀ) B_jᵀ."""
    y = F.linear(x, weight, bias)
    for j, rows, rank, scale in _adapter_blocks(sorted_rows, adapter_starts, ranks, scales, lora_a.shape[1]):
        hidden = x.index_select(0, rows) @ lora_a[j, :rank].T                   # (m_j, r_j)
        y = y.index_add(0, rows, scale * (hidden @ lora_b[j, :, :rank].T))     # scale last, as the reference
    return y


def multi_lora_linear_grads(
    grad_y: Tensor, x: Tensor | None, weight: Tensor, lora_a: Tensor, lora_b: Tensor,
    saved_hidden: Tensor | None, scales: Tensor, sorted_rows: Tensor, adapter_starts: Tensor,
    ranks: Tensor | None, need_x: bool, need_a: bool, need_b: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(dX (M, K), dA (L, R, K), dB (L, N, R)), None where not asked for. Per adapter j over its rows:
    dU_j = s_j·dY_j·B_j;  dX_j += dU_j·A_j;  dA_j = dU_jᵀ·X_j;  dB_j = s_j·dY_jᵀ·T_j, with
    T_j = X_j A_jᵀ recomputed from x when x was saved (differentiable), else read from saved_hidden
    (M, R) (x and A are then constants). Unused adapters and padded ranks get zero gradients."""
    max_rank = lora_a.shape[1]
    grad_x = grad_y @ weight if need_x else None                                # (M, K)
    grads_a, grads_b = {}, {}
    for j, rows, rank, scale in _adapter_blocks(sorted_rows, adapter_starts, ranks, scales, max_rank):
        a_j, b_j = lora_a[j, :rank], lora_b[j, :, :rank]                        # (r_j, K), (N, r_j)
        grad_y_j = grad_y.index_select(0, rows)                                 # (m_j, N)
        if need_x or need_a:
            grad_u = (grad_y_j @ b_j) * scale                                   # (m_j, r_j)
            if need_x:
                grad_x = grad_x.index_add(0, rows, grad_u @ a_j)
            if need_a:   # padded to (R, K)
                grads_a[j] = F.pad(grad_u.T @ x.index_select(0, rows), (0, 0, 0, max_rank - rank))
        if need_b:
            if x is not None:
                hidden = x.index_select(0, rows) @ a_j.T                        # (m_j, r_j)
            else:
                hidden = saved_hidden.index_select(0, rows)[:, :rank].to(grad_y.dtype)
            grads_b[j] = F.pad(grad_y_j.T @ (hidden * scale), (0, max_rank - rank))   # (N, R)
    grad_a = _stack(grads_a, lora_a) if need_a else None
    grad_b = _stack(grads_b, lora_b) if need_b else None
    return grad_x, grad_a, grad_b


def _stack(grads: dict[int, Tensor], like: Tensor) -> Tensor:
    """The (L, ...) gradient of stack `like` from the grads of its adapters with rows (zeros elsewhere)."""
    zeros = like.new_zeros(like.shape[1:])
    return torch.stack([grads.get(j, zeros) for j in range(like.shape[0])])
