"""MoE pieces: gating (hash / learned), the shared expert, and ExpertBank (routed experts).

Owns: gate and shared-expert weights (part of the dense model) and, in ExpertBank, the routed
expert weights of any subset of expert ids across all MoE layers. The serving split is:
gating yields (token rows, expert ids, weights) -> ExpertBank(s) compute their experts' share ->
combine = sum of shares + shared expert. A single process is one bank holding every expert.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import HASH_MOE, ModelConfig
from .cpu_experts import DecodeExperts
from .cpu_kernels import linear
from .fused import Compiled, FusedLinear
from .ops import linear_f32, score_fn, stable_topk, swiglu


class Gate(nn.Module):
    """Router of one layer. `hash_moe`: experts from the frozen `tid2eid[token]`; `moe`: top-k of
    score(logits) + e_score_correction_bias (`bias`). Weights are the unbiased scores of the chosen
    experts, renormalised, times routed_scaling_factor."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.cfg = cfg
        self.is_hash = cfg.mlp_layer_types[layer_id] == HASH_MOE
        self.weight = nn.Parameter(torch.zeros(cfg.n_routed_experts, cfg.hidden_size))
        if self.is_hash:
            self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, cfg.num_experts_per_tok, dtype=torch.int64))
        else:
            self.bias = nn.Parameter(torch.zeros(cfg.n_routed_experts))

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden], token_ids [T] -> expert_ids [T, k] int64, weights [T, k] float32."""
        return gate(x, token_ids, *self.tensors(), *self.consts())

    def tensors(self) -> tuple:
        """(weight, bias or None, tid2eid or None): `gate`'s tensor arguments."""
        return self.weight, None if self.is_hash else self.bias, self.tid2eid if self.is_hash else None

    def consts(self) -> tuple:
        return self.cfg.scoring_func, self.cfg.num_experts_per_tok, self.cfg.routed_scaling_factor


def gate(x: torch.Tensor, token_ids: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
         tid2eid: torch.Tensor | None, scoring: str, k: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate's math: hash routing when `tid2eid` is given, else top-k of score + bias."""
    scores = score_fn(linear_f32(x, weight), scoring)                           # [T, E] float32
    if tid2eid is not None:
        expert_ids = tid2eid[token_ids].long()
    else:
        # Top-k ties (equal biased scores) go to the lower expert id: see ops.stable_topk.
        expert_ids = stable_topk(scores + bias.float(), k)
    weights = scores.gather(1, expert_ids)
    weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return expert_ids, weights * scaling


class SharedExpert(nn.Module):
    """The always-on expert: w2(swiglu(w1 x, w3 x)) with V4's clamps."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.limit = cfg.swiglu_limit
        self.w1 = nn.Linear(cfg.hidden_size, cfg.moe_intermediate_size, bias=False)
        self.w2 = nn.Linear(cfg.moe_intermediate_size, cfg.hidden_size, bias=False)
        self.w3 = nn.Linear(cfg.hidden_size, cfg.moe_intermediate_size, bias=False)
        self._w13 = FusedLinear([self.w1, self.w3])   # gate and up in one matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return shared_expert(x, self._w13.weight(), self.w2.weight, self.limit)


def shared_expert(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, limit: float) -> torch.Tensor:
    """SharedExpert's math with w1 and w3 stacked: w2(swiglu(x w1^T, x w3^T))."""
    gate_up = linear(x, w13)                                                     # [T, 2I]
    inter = w2.shape[1]
    return linear(swiglu(gate_up[..., :inter], gate_up[..., inter:], limit), w2)


class ExpertBank(nn.Module):
    """Routed experts `expert_ids` of every MoE layer.

    Per layer: w13 [E, 2I, hidden] (w1 then w3, so one matmul gives gate and up) and w2t [E, I, hidden]
    (the checkpoint's w2 transposed), E = len(expert_ids); `local_index[global id]` is -1 for experts
    this bank does not hold. (token, expert) pairs are sorted by expert and each expert hit runs one
    matmul pair over its rows: every expert in one `torch._grouped_mm` call where the backend has it
    (no per-expert Python), else a loop. (An "every held expert on every token" variant measured 3x
    slower on CPU at decode batch 8, so it was removed.) CPU steps with a few pairs per expert
    (decode) take `cpu_experts.DecodeExperts` instead: a C kernel that reads each hit expert's
    weights once, 2-4x faster there than the grouped GEMM.
    """

    def __init__(self, cfg: ModelConfig, expert_ids: list[int], dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", allocate: bool = True):
        super().__init__()
        self.cfg = cfg
        self.expert_ids = sorted(int(e) for e in expert_ids)
        if len(set(self.expert_ids)) != len(self.expert_ids) or any(
                not 0 <= e < cfg.n_routed_experts for e in self.expert_ids):
            raise ValueError(f"expert ids must be distinct and in [0, {cfg.n_routed_experts}): {expert_ids}")
        local = [-1] * cfg.n_routed_experts
        for i, e in enumerate(self.expert_ids):
            local[e] = i
        self.register_buffer("local_index", torch.tensor(local, dtype=torch.int64, device=device), persistent=False)
        self._is_grouped_mm_ok = True   # set False (fallback to the loop) if the backend refuses it
        self.decode_experts = DecodeExperts()   # CPU decode steps: the C kernel
        # GPU grouped path: the routing, activation and combine around the grouped GEMMs, compiled
        # (built on first use; pair / token counts vary between steps, so dim 0 is dynamic)
        self._route = Compiled(route_pairs, {"x": (0,), "flat_local": (0,), "held": (0,)})
        self._act = Compiled(grouped_swiglu, {"h": (0,)})
        self._combine = Compiled(combine_pairs, {"y": (0,), "dest": (0,), "weights": (0,)})
        E, I, Dm = len(self.expert_ids), cfg.moe_intermediate_size, cfg.hidden_size
        make = (lambda *s: torch.zeros(*s, dtype=dtype, device=device)) if allocate else (
            lambda *s: torch.empty(0, dtype=dtype, device=device))
        self.w13 = nn.ParameterList([nn.Parameter(make(E, 2 * I, Dm), requires_grad=False) for _ in range(cfg.num_layers)])
        self.w2t = nn.ParameterList([nn.Parameter(make(E, I, Dm), requires_grad=False) for _ in range(cfg.num_layers)])

    @property
    def num_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def forward(self, layer_id: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                num_valid: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, hidden], expert_ids / weights [T, k] -> Σ over held experts of weight * expert(x), [T, hidden].
        Rows routed to no held expert stay zero. `num_valid` (a 0-dim int64 tensor on x's device):
        rows >= num_valid are padding, routed to no expert (fixed-shape callers: a captured graph's
        rows bucket, see expert_graphs.py); their output rows are not defined."""
        if x.shape[0] == 0:
            return torch.zeros_like(x)
        if self.local_index.device != expert_ids.device:   # once, if the bank was moved by hand
            self.local_index = self.local_index.to(expert_ids.device)
        local = self.local_index[expert_ids]                                       # [T, k]
        if num_valid is not None:   # padding rows: routed to no expert, on the device
            rows = torch.arange(x.shape[0], device=x.device)[:, None]                # [T, 1]
            local = local.masked_fill(rows >= num_valid, -1)
        if self.decode_experts.can_run(x, self.w13[layer_id], local.numel(), len(self.expert_ids)):
            return self.decode_experts(x, local, weights, self.w13[layer_id], self.w2t[layer_id], self.cfg.swiglu_limit)
        flat_local = local.flatten()
        is_full = len(self.expert_ids) == self.cfg.n_routed_experts and num_valid is None
        if x.is_cuda and self.is_sync_free(x.device, x.dtype, x.shape[0]):
            # no nonzero (a host sync): pairs not held ride along, past the last group
            try:
                return self._grouped_cuda(x, flat_local, None, weights, self.w13[layer_id], self.w2t[layer_id],
                                          is_partial=not is_full)
            except (RuntimeError, NotImplementedError):  # a backend without this layout / dtype
                self._is_grouped_mm_ok = False
        if is_full:
            held = None
        else:
            held = (flat_local >= 0).nonzero().squeeze(1)
            if held.numel() == 0:
                return torch.zeros_like(x)
        return self._grouped(layer_id, x, flat_local, held, weights, expert_ids.shape[1])

    def _grouped(self, layer_id, x, flat_local, held, weights, k) -> torch.Tensor:
        """The held pairs through the grouped GEMMs (or the per-expert loop); `held` [P]: indices of
        the held (token, slot) pairs in flat_local [T*k], None when every pair is held."""
        I = self.cfg.moe_intermediate_size
        w13, w2t = self.w13[layer_id], self.w2t[layer_id]
        if x.is_cuda and self._can_grouped_mm(x):
            try:
                return self._grouped_cuda(x, flat_local, held, weights, w13, w2t)
            except (RuntimeError, NotImplementedError):  # a backend without this layout / dtype
                self._is_grouped_mm_ok = False
        if held is None:
            held = torch.arange(flat_local.numel(), device=flat_local.device)
        order = held[torch.argsort(flat_local[held], stable=True)]               # (token, slot) pairs by expert
        # [E] pairs per expert (a scatter, not bincount: bincount reads its max back to the host)
        counts = torch.zeros(len(self.expert_ids), dtype=torch.int64, device=x.device).index_add_(
            0, flat_local[order], torch.ones_like(order))
        token_rows, flat_w = order // k, weights.flatten()[order]
        xs = x[token_rows]                                                         # [P, hidden], by expert
        y = None
        if self._can_grouped_mm(xs):
            # one call for every expert: group e multiplies rows [offs[e-1], offs[e]) by its weights
            offs = counts.cumsum(0).to(torch.int32)
            try:
                h = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)          # [P, 2I]
                y = torch._grouped_mm(swiglu(h[:, :I], h[:, I:], self.cfg.swiglu_limit), w2t, offs=offs)
            except (RuntimeError, NotImplementedError):  # a backend without this layout / dtype
                self._is_grouped_mm_ok = False
        if y is None:
            y = torch.empty_like(xs)
            self._run_segments(xs, y, w13, w2t, _segments(counts.tolist()))
        return torch.zeros_like(x).index_add_(0, token_rows, y * flat_w[:, None].to(x.dtype))

    def _grouped_cuda(self, x, flat_local, held, weights, w13, w2t, is_partial: bool = False) -> torch.Tensor:
        """`_grouped` on a GPU: the same grouped GEMMs, with the work around them as three compiled
        pieces (`route_pairs`, `grouped_swiglu`, `combine_pairs`: ~6 kernels instead of ~25 small
        eager ones and a radix sort per layer). The combine gathers each token's k rows and sums
        them in float32 (deterministic; the eager path's bf16 index_add_ rounds every partial sum).
        `is_partial` (held None): some of flat_local is -1, routed with fixed shapes (route_pairs)."""
        # inside an outer torch.compile (DecodeGraphs(is_compiled=True)) the plain functions are
        # traced into that graph instead of calling a nested compiled one
        compiled = not torch.compiler.is_compiling()
        route = self._route if compiled else route_pairs
        act = self._act if compiled else grouped_swiglu
        combine = self._combine if compiled else combine_pairs
        xs, dest, offs = route(x, flat_local, held, weights.shape[1], len(self.expert_ids), is_partial)
        h = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)                 # [P, 2I]
        y = torch._grouped_mm(act(h, self.cfg.swiglu_limit), w2t, offs=offs)       # [P, hidden]
        return combine(y, dest, weights)

    def _run_segments(self, xs, y, w13, w2t, segments: list[tuple[int, int, int]]) -> None:
        """y[b:b+n] = expert e(xs[b:b+n]) for each (e, b, n): the per-expert loop."""
        I = self.cfg.moe_intermediate_size
        for e, begin, n in segments:
            h = xs[begin: begin + n] @ w13[e].T                                    # [n, 2I]
            y[begin: begin + n] = swiglu(h[:, :I], h[:, I:], self.cfg.swiglu_limit) @ w2t[e]

    def is_sync_free(self, device: torch.device, dtype: torch.dtype, num_tokens: int | None = None) -> bool:
        """Whether forward() on `device` in `dtype` needs no host round trip (a CUDA graph can
        capture it): the GPU grouped path, for any step when every expert is held; a bank holding
        a subset routes fixed shapes (every pair, the ones not held past the last group) for steps
        of up to SYNC_FREE_MAX_PAIRS (token, slot) pairs, and filters larger ones (nonzero)."""
        if not (device.type == "cuda" and self._can_grouped_mm_on(device, dtype)):
            return False
        if len(self.expert_ids) == self.cfg.n_routed_experts:
            return True
        return num_tokens is not None and num_tokens * self.cfg.num_experts_per_tok <= SYNC_FREE_MAX_PAIRS

    def _can_grouped_mm(self, x: torch.Tensor) -> bool:
        return self._can_grouped_mm_on(x.device, x.dtype)

    def _can_grouped_mm_on(self, device: torch.device, dtype: torch.dtype) -> bool:
        """torch._grouped_mm runs on CPU for any float dtype; on CUDA only bf16 on sm90+ (else loop)."""
        if not hasattr(torch, "_grouped_mm") or not self._is_grouped_mm_ok:
            return False
        if device.type == "cpu":
            return True
        return (device.type == "cuda" and dtype == torch.bfloat16
                and torch.cuda.get_device_capability(device)[0] >= 9)


def _segments(counts: list[int]) -> list[tuple[int, int, int]]:
    """(local expert, first row, number of rows) of every hit expert, rows sorted by expert."""
    segments, begin = [], 0
    for e, n in enumerate(counts):
        if n:
            segments.append((e, begin, n))
            begin += n
    return segments


# A bank holding a subset of the experts routes steps of up to this many (token, slot) pairs with
# fixed shapes (every pair gathered, the ones it does not hold past the last group): decode steps,
# which a CUDA graph captures. Larger steps (prefill) gather only the held pairs (a nonzero).
SYNC_FREE_MAX_PAIRS = 4096

# Above this many [pairs x experts] one-hot entries `expert_order` falls back to the radix sort
# (prefill: the one-hot would take too much memory); both give the same order.
MAX_COUNTING_ENTRIES = 1 << 22


def expert_order(keys: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable counting sort of expert ids: keys [P] int64 in [0, num_experts) -> (dest [P], counts
    [num_experts]): pair p goes to row dest[p] of the by-expert order, i.e. order[dest] = arange(P)
    is exactly torch.argsort(keys, stable=True) (equal keys keep their pair order).

    Why: a GPU sorts a few hundred int64 keys with one-block radix passes (~27 us per MoE layer
    measured on an H200), while this is a cumulative sum over a small one-hot table, which
    compiles into a couple of fused kernels. The row of pair p is
        (pairs of lower experts) + (earlier pairs of the same expert)
        = starts[keys[p]] + ranks[keys[p], p] - 1,
    with ranks[e, p] = number of pairs q <= p whose key is e (the inclusive scan of the one-hot
    row e) and starts the exclusive scan of the counts."""
    experts = torch.arange(num_experts, device=keys.device)
    one_hot = (keys[None, :] == experts[:, None]).to(torch.int32)               # [E, P]
    ranks = one_hot.cumsum(1)                                                    # [E, P] inclusive
    counts = one_hot.sum(1)                                                      # [E]
    starts = counts.cumsum(0) - counts                                           # [E] exclusive
    rank = ranks.gather(0, keys[None, :]).squeeze(0)                            # [P] ranks[keys[p], p]
    return (starts[keys] + rank - 1).long(), counts.long()


def route_pairs(x: torch.Tensor, flat_local: torch.Tensor, held: torch.Tensor | None, k: int,
                num_experts: int, is_partial: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The grouped GEMMs' inputs: x [T, hidden], flat_local [T*k] local expert id of each (token,
    slot) pair (-1: not held), held [P] the held pairs' indices (None: every pair) -> xs [P, hidden]
    the pairs' rows sorted by expert (stable), dest [T*k] each pair's row in xs (P for pairs not
    held), offs [E] int32 the groups' end rows.

    `is_partial` (held None): fixed shapes without knowing which pairs are held. The -1 pairs sort
    as an extra expert E after the real ones, so xs holds all T*k rows and the held ones come
    first, in the same order as with `held`; offs ends at the last held row. The grouped GEMMs
    leave rows past offs[-1] unwritten, and no dest points at them (the -1 pairs get P, the zero
    row of combine_pairs)."""
    if is_partial:
        keys = torch.where(flat_local < 0, num_experts, flat_local)              # [T*k]
    else:
        keys = flat_local if held is None else flat_local[held]                 # [P]
    num_keys = num_experts + 1 if is_partial else num_experts
    P = keys.shape[0]
    if P * num_keys <= MAX_COUNTING_ENTRIES:
        dest_held, counts = expert_order(keys, num_keys)
    else:   # radix sort; the inverse permutation is each pair's row
        order = torch.argsort(keys, stable=True)
        dest_held = torch.empty_like(order).scatter_(0, order, torch.arange(P, device=keys.device))
        counts = torch.zeros(num_keys, dtype=torch.int64, device=keys.device).index_add_(
            0, keys, torch.ones_like(keys))
    pairs = torch.arange(P, device=keys.device) if held is None else held
    order = torch.empty_like(pairs).scatter_(0, dest_held, pairs)               # [P] pair index by row
    xs = x[order // k]                                                           # [P, hidden]
    if is_partial:
        dest = torch.where(flat_local < 0, P, dest_held)
        counts = counts[:num_experts]
    elif held is None:
        dest = dest_held
    else:
        dest = torch.full_like(flat_local, P).scatter_(0, held, dest_held)      # [T*k]
    return xs, dest, counts.cumsum(0).to(torch.int32)


def grouped_swiglu(h: torch.Tensor, limit: float) -> torch.Tensor:
    """h [P, 2I] (gate | up) -> swiglu [P, I]."""
    inter = h.shape[-1] // 2
    return swiglu(h[:, :inter], h[:, inter:], limit)


def combine_pairs(y: torch.Tensor, dest: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_j weights[t, j] * y[dest[t*k + j]] in float32: y [P, hidden] the experts' rows, dest [T*k]
    (P: a pair not held, contributes zero), weights [T, k] -> [T, hidden] in y's dtype."""
    T, k = weights.shape
    rows = torch.cat([y, y.new_zeros(1, y.shape[1])])[dest].unflatten(0, (T, k))   # [T, k, hidden]
    return (rows.float() * weights.float()[..., None]).sum(1).to(y.dtype)
