"""Mixture of Experts: top-k-then-softmax router, clamped SwiGLU experts, dropless expert parallelism.

`MoEFeedForward` is plain torch, so sampling, export and analysis run without DeepSpeed. A model a DeepSpeed
engine will wrap gets `deepspeed_moe_class()` instead (`ModelOptions.deepspeed_engine`): the same layer, also
DeepSpeed's `MoE`, so the engine recognises it (`isinstance(module, MoE)`: `has_moe_layers`) and treats the
expert parameters right under ZeRO-1/2 (expert-data-parallel groups, per-expert checkpoint files). Parameter
names are the same in both. DeepSpeed's own gate (GShard, capacity-based, token dropping, softmax before
top-k) is not GPT-OSS semantics, so routing and dispatch are ours:

    sort token->expert assignments by expert, exchange counts, all_to_all the tokens (split sizes),
    run the local experts on their contiguous segments, send results back, combine with router weights.

With ep_size = 1 the same code runs without communication. Rank r of an expert-parallel group holds
global experts [r * E_local, (r + 1) * E_local) (DeepSpeed's consecutive group layout). The local experts
run through `gptoss.model.kernels.experts` (a loop, grouped GEMM on Hopper, masked dense under compile).

Decoding (`MoEFeedForward.decode`, a few rows, no gradients, ep_size 1) skips the sort and dispatch and touches
only the chosen experts' weights: eagerly a loop over the experts some row chose (one host sync, free on CPU),
under torch.compile (CUDA graphs) a gather of their rows from stacked weights, with static shapes.
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from gptoss.config import ConfigError, ModelConfig
from gptoss.model.kernels.experts import expert_kernel
from gptoss.model.layers import clamped_swiglu

# Where a layer keeps its experts (DeepSpeed's layout), and so the state-dict key of one expert parameter
# (`layers.N.mlp.deepspeed_moe.experts.deepspeed_experts.E.name`, global ids E in full state dicts).
EXPERTS_PATH = ("deepspeed_moe", "experts", "deepspeed_experts")
EXPERT_KEY = re.compile(rf"^layers\.(\d+)\.mlp\.{re.escape('.'.join(EXPERTS_PATH))}\.(\d+)\.(\w+)$")
EXPERT_PARAMS = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")


def expert_key(layer: int, expert: int, name: str) -> str:
    return f"layers.{layer}.mlp.{'.'.join(EXPERTS_PATH)}.{expert}.{name}"


def validate_parallelism(cfg: ModelConfig, *, world_size: int, ep_size: int, zero_stage: int) -> None:
    """Refuse, before anything starts, the layouts DeepSpeed's native MoE cannot run."""
    if ep_size < 1:
        raise ConfigError(f"--ep_size={ep_size}: must be >= 1")
    if not cfg.is_moe:
        if ep_size != 1:
            raise ConfigError(f"--ep_size={ep_size}: the {cfg.arch} model has no experts; use --ep_size 1")
        return
    if zero_stage >= 3:
        raise ConfigError(f"zero_optimization.stage={zero_stage}: DeepSpeed's MoE layers do not support ZeRO-3; "
                          "use stage 1 or 2 (experts are sharded by --ep_size instead)")
    if cfg.num_local_experts % ep_size:
        raise ConfigError(f"--ep_size={ep_size} does not divide num_local_experts={cfg.num_local_experts}; "
                          "choose an ep_size that divides the number of experts")
    if world_size % ep_size:
        raise ConfigError(f"--ep_size={ep_size} does not divide the world size {world_size}; "
                          "choose an ep_size that divides the number of ranks")


class Expert(nn.Module):
    """One expert, in HF's [in, out] layout: gate/up fused and interleaved, then down, both with bias."""

    def __init__(self, hidden: int, intermediate: int, alpha: float, limit: float) -> None:
        super().__init__()
        self.alpha, self.limit = alpha, limit
        self.gate_up_proj = nn.Parameter(torch.empty(hidden, 2 * intermediate))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(2 * intermediate))
        self.down_proj = nn.Parameter(torch.empty(intermediate, hidden))
        self.down_proj_bias = nn.Parameter(torch.zeros(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.addmm(self.gate_up_proj_bias, x, self.gate_up_proj)
        return torch.addmm(self.down_proj_bias, clamped_swiglu(h, self.alpha, self.limit), self.down_proj)


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: object) -> torch.Tensor:
    """Differentiable all_to_all with split sizes (gloo on CPU, NCCL on GPU)."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

    return wait_tensor(all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group))


class MoEOutput(NamedTuple):
    """What the MoE layer computed, returned (not stored on the module) so each call owns its statistics.

    Same order as DeepSpeed's `MoE.forward`: (output, l_aux, exp_counts).
    """

    hidden: torch.Tensor  # same shape as the input
    aux_loss: torch.Tensor  # () fp32 load-balancing loss of this call, before router_aux_loss_coef
    counts: torch.Tensor  # (E,) int64 token->expert assignments of this call (all E experts, this rank's tokens)


class MoEFeedForward(nn.Module):
    """GPT-OSS MoE block: router (Linear with bias) -> top-k -> softmax over the k -> experts -> sum."""

    def __init__(self, cfg: ModelConfig, ep_size: int = 1) -> None:
        # Not super(): in deepspeed_moe_class() the next class is DeepSpeed's MoE, whose __init__ builds its
        # own GShard gate and experts.
        nn.Module.__init__(self)
        E = cfg.num_local_experts
        self.num_experts, self.top_k, self.ep_size = E, cfg.num_experts_per_tok, ep_size
        self.num_local_experts = E // ep_size
        self.ep_group: object | None = None
        self.ep_rank = dist.get_rank() % ep_size if ep_size > 1 else 0
        self.router = nn.Linear(cfg.hidden_size, E, bias=True)
        experts = nn.ModuleList(
            Expert(cfg.hidden_size, cfg.intermediate_size, cfg.swiglu_alpha, cfg.swiglu_limit)
            for _ in range(self.num_local_experts))
        holder = self
        for name in EXPERTS_PATH[:-1]:  # plain holders on DeepSpeed's parameter path
            holder.add_module(name, nn.Module())
            holder = getattr(holder, name)
        holder.add_module(EXPERTS_PATH[-1], experts)

    @property
    def local_experts(self) -> nn.ModuleList:
        return self.get_submodule(".".join(EXPERTS_PATH))

    @property
    def first_local_expert(self) -> int:
        return self.ep_rank * self.num_local_experts

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits (N, E), chosen experts (N, k), their weights (N, k)."""
        logits = self.router(x)
        return logits, *self.choose(logits, x.dtype)

    def choose(self, logits: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Chosen experts (N, k) and their weights (N, k) from router logits: top-k first, then softmax."""
        top_logits, top_idx = torch.topk(logits, self.top_k, dim=-1, sorted=True)
        return top_idx, torch.softmax(top_logits, dim=-1, dtype=torch.float32).to(dtype)

    def forward(self, x: torch.Tensor) -> MoEOutput:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, H)
        logits, top_idx, weights = self.route(x)
        flat_expert = top_idx.flatten()
        counts = expert_counts(flat_expert, self.num_experts)  # (E,)
        aux_loss = load_balancing_loss(logits, counts)

        order = torch.argsort(flat_expert, stable=True)  # assignments grouped by expert
        sorted_x = x[order // self.top_k]  # (N*k, H)
        if self.ep_size == 1:
            sorted_y = self._run_local_experts(sorted_x, counts)
        else:
            sorted_y = self._exchange_and_run(sorted_x, counts)
        y = torch.empty_like(sorted_y).index_copy_(0, order, sorted_y)  # back to (token, slot) order
        y = (y.view(-1, self.top_k, shape[-1]) * weights.unsqueeze(-1)).sum(dim=1)
        return MoEOutput(y.view(shape), aux_loss, counts.detach())

    def prepare_decode(self, stacked: bool) -> None:
        """The decode step's weights: the router [in, out]; with `stacked`, every expert parameter stacked
        (E, ...) for the gather path (a copy of the experts: compiled decoding only)."""
        experts = self.local_experts
        params = {n: torch.stack([getattr(m, n) for m in experts]) for n in EXPERT_PARAMS} if stacked else None
        self.decode_weights = (self.router.weight.t().contiguous(), self.router.bias, params)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output for rows x (N, H) of a decode step, after `prepare_decode`; no aux loss or counts."""
        if self.ep_size != 1:
            raise RuntimeError("decoding runs with ep_size 1 (load the model with gptoss.generate.load_model)")
        w_router, b_router, stacked = self.decode_weights
        top_idx, weights = self.choose(torch.addmm(b_router, x, w_router), x.dtype)  # (N, k) each
        if torch.compiler.is_compiling():
            if stacked is None:
                raise RuntimeError("compiled decoding needs prepare_decode(stacked=True)")
            return self._decode_gathered(x, top_idx, weights, stacked)
        return self._decode_looped(x, top_idx, weights)

    def _decode_looped(self, x: torch.Tensor, top_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Each chosen expert once, on the rows that chose it; rows add their k results in slot order."""
        N, k = top_idx.shape
        if N == 1:  # one row: its k experts in slot order
            y = torch.stack([self.local_experts[e](x) for e in top_idx[0].tolist()], dim=1)
            return (y * weights.unsqueeze(-1)).sum(dim=1)
        chosen: dict[int, tuple[list[int], list[int]]] = {}
        for i, row in enumerate(top_idx.tolist()):
            for j, e in enumerate(row):
                rows, slots = chosen.setdefault(e, ([], []))
                rows.append(i)
                slots.append(j)
        y = x.new_zeros(N, k, x.shape[-1])
        for e, (rows, slots) in chosen.items():
            r, s = torch.tensor(rows, device=x.device), torch.tensor(slots, device=x.device)
            y[r, s] = self.local_experts[e](x if len(rows) == N else x[r])  # a row chooses an expert once
        return (y * weights.unsqueeze(-1)).sum(dim=1)

    def _decode_gathered(self, x: torch.Tensor, top_idx: torch.Tensor, weights: torch.Tensor,
                         stacked: dict[str, torch.Tensor]) -> torch.Tensor:
        """Every (row, slot) through its expert's gathered weights in one batched matmul each: static shapes."""
        N, k = top_idx.shape
        e = top_idx.flatten()  # (N*k,)
        rows = x.repeat_interleave(k, dim=0).unsqueeze(1)  # (N*k, 1, H)
        h = torch.baddbmm(stacked["gate_up_proj_bias"][e].unsqueeze(1), rows, stacked["gate_up_proj"][e])
        first = self.local_experts[0]
        h = clamped_swiglu(h, first.alpha, first.limit)
        y = torch.baddbmm(stacked["down_proj_bias"][e].unsqueeze(1), h, stacked["down_proj"][e])  # (N*k, 1, H)
        return (y.view(N, k, -1) * weights.unsqueeze(-1)).sum(dim=1)

    def _run_local_experts(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x holds rows grouped by local expert, `counts[e]` rows for local expert e."""
        hidden, intermediate = self.local_experts[0].down_proj.shape[::-1]
        return expert_kernel(x, hidden, intermediate)(self.local_experts, x, counts)

    def _exchange_and_run(self, sorted_x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Send each row to the rank owning its expert, run the local experts, send the results back."""
        ep, E_local = self.ep_size, self.num_local_experts
        if self.ep_group is None:
            raise RuntimeError("expert parallelism needs the DeepSpeed engine: build the model with "
                               "ModelOptions(deepspeed_engine=True) and wrap it with deepspeed.initialize")
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.ep_group)  # (ep * E_local,) from each source
        send_splits = counts.view(ep, E_local).sum(1).tolist()
        recv_splits = recv_counts.view(ep, E_local).sum(1).tolist()
        recv_x = _all_to_all(sorted_x, recv_splits, send_splits, self.ep_group)  # grouped by (source, expert)
        expert_of_row = torch.arange(ep * E_local, device=counts.device).remainder(E_local)
        expert_of_row = expert_of_row.repeat_interleave(recv_counts)
        by_expert = torch.argsort(expert_of_row, stable=True)
        y = self._run_local_experts(recv_x[by_expert], recv_counts.view(ep, E_local).sum(0))
        y = torch.empty_like(y).index_copy_(0, by_expert, y)  # back to (source, expert) order
        return _all_to_all(y, send_splits, recv_splits, self.ep_group)


@functools.cache
def deepspeed_moe_class() -> type[MoEFeedForward]:
    """`MoEFeedForward` that is also DeepSpeed's `MoE`, for a model a DeepSpeed engine wraps; imports DeepSpeed.

    The engine finds its MoE layers by `isinstance(module, MoE)`, takes their `num_experts`,
    `num_local_experts` and `expert_group_name`, calls `set_deepspeed_parallelism`, and reduces a parameter
    with `allreduce = False` over the expert-data-parallel group `group_name` (`is_moe_param`). One class
    per process (cached), so every layer and isinstance check agree on it.
    """
    from deepspeed.moe.layer import MoE

    class DeepSpeedMoEFeedForward(MoEFeedForward, MoE):
        def __init__(self, cfg: ModelConfig, ep_size: int = 1) -> None:
            super().__init__(cfg, ep_size)
            self.expert_group_name = f"ep_size_{ep_size}"
            for p in self.local_experts.parameters():
                p.allreduce = False  # reduced over the expert-data-parallel group instead
                p.group_name = self.expert_group_name

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            """Called by the engine: create (once) and take the expert-parallel group."""
            from deepspeed.utils import groups

            if self.expert_group_name not in groups._get_expert_parallel_group_dict():
                groups._create_expert_and_data_parallel(
                    self.ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel_)
            self.ep_group = groups._get_expert_parallel_group(self.expert_group_name)

    return DeepSpeedMoEFeedForward


def moe_layer(cfg: ModelConfig, ep_size: int, deepspeed_engine: bool) -> MoEFeedForward:
    """A block's MoE layer: DeepSpeed's kind when an engine will wrap the model, plain torch otherwise."""
    return (deepspeed_moe_class() if deepspeed_engine else MoEFeedForward)(cfg, ep_size)


def expert_counts(flat_expert: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E,) int64 assignments per expert, sized by E (bincount's size depends on the data: a graph break)."""
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat_expert.device)
    return counts.scatter_add_(0, flat_expert, torch.ones_like(flat_expert))


def load_balancing_loss(router_logits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Switch-style auxiliary loss as HF computes it: E * sum_e (assignments_e / N) * mean_prob_e.

    Equals k when routing is uniform; its gradient flows through the router probabilities only.
    """
    N, E = router_logits.shape
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32).mean(0)
    return E * torch.sum(counts.float() / N * probs)


def init_experts(layer: MoEFeedForward, std: float, out_std: float, generator: torch.Generator | None = None
                 ) -> None:
    """Initialise expert weights so the result is the same for any ep_size: draw all E, keep ours."""
    for p_name, s in (("gate_up_proj", std), ("down_proj", out_std)):
        shape = getattr(layer.local_experts[0], p_name).shape
        full = torch.empty(layer.num_experts, *shape).normal_(0.0, s, generator=generator)
        for i, expert in enumerate(layer.local_experts):
            getattr(expert, p_name).data.copy_(full[layer.first_local_expert + i])
    for expert in layer.local_experts:
        nn.init.zeros_(expert.gate_up_proj_bias)
        nn.init.zeros_(expert.down_proj_bias)

