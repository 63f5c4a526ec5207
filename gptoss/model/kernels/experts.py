"""The local experts of one MoE layer on rows grouped by expert: `EXPERT_KERNELS` name ->
`fn(experts, x, counts) -> y`, where x (rows, H) holds `counts[e]` rows for local expert e, in order, and each
expert is a `gptoss.model.moe.Expert` (one module per expert: the layout DeepSpeed's expert files need).

- loop: one expert per contiguous segment; the split sizes need one host sync per layer call (the GPU queue
  drains while Python launches the experts' kernels; a graph break under torch.compile). Eager everywhere; faster
  on CPU than transformers' grouped_mm (BENCHMARKS 1, MoE row). bench/gpu_check.py measures what the sync costs.
- grouped: two `torch._grouped_mm` calls, offsets on the device (no host sync, so torch.compile traces it
  whole); chosen on Hopper only, the one platform where torch's kernel is both syncless and right
  (`grouped_mm_supported`).
- masked_dense: every expert on every row, each row keeping its own expert's result (E_local times the expert
  FLOPs): the platform is torch.compile off CUDA (CPU), where the loop's host sync would break the graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from gptoss.model.layers import clamped_swiglu


def _expert_of_row(x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(rows,) local expert index of each row, without a host sync (output size given)."""
    return torch.repeat_interleave(torch.arange(counts.numel(), device=x.device), counts, output_size=x.shape[0])


def looped_experts(experts: nn.ModuleList, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    pieces = x.split(counts.tolist())
    # An idle expert still runs in training (DeepSpeed expects a gradient, zeros, for each parameter);
    # at inference its empty (0, H) input already is its output.
    train = torch.is_grad_enabled()
    return torch.cat([expert(piece) if train or len(piece) else piece for expert, piece in zip(experts, pieces)])


def grouped_experts(experts: nn.ModuleList, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    offs = torch.cumsum(counts, 0).to(torch.int32)
    # each row's bias through a one-hot matmul rather than a gather: the bias gradient is then a GEMM that sums an
    # expert's rows in fp32, where the gather's backward adds thousands of bf16 rows in bf16
    one_hot = nn.functional.one_hot(_expert_of_row(x, counts), len(experts)).to(x.dtype)  # (rows, E_local)

    def stacked(name: str) -> torch.Tensor:  # one copy of the local experts' weights per call
        return torch.stack([getattr(m, name) for m in experts]).to(x.dtype)  # (E_local, ...)

    h = torch.addmm(torch._grouped_mm(x, stacked("gate_up_proj"), offs=offs), one_hot, stacked("gate_up_proj_bias"))
    h = clamped_swiglu(h, experts[0].alpha, experts[0].limit)
    return torch.addmm(torch._grouped_mm(h, stacked("down_proj"), offs=offs), one_hot, stacked("down_proj_bias"))


def masked_dense_experts(experts: nn.ModuleList, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    row_expert = _expert_of_row(x, counts).unsqueeze(-1)
    y = torch.zeros_like(x)
    for i, expert in enumerate(experts):
        y = torch.where(row_expert == i, expert(x), y)
    return y


ExpertKernel = Callable[[nn.ModuleList, torch.Tensor, torch.Tensor], torch.Tensor]
EXPERT_KERNELS: dict[str, ExpertKernel] = {
    "loop": looped_experts,
    "grouped": grouped_experts,
    "masked_dense": masked_dense_experts,
}


def grouped_mm_supported(capability: tuple[int, int] | None, dtype: torch.dtype, hidden: int,
                         intermediate: int) -> bool:
    """`torch._grouped_mm` where it is one syncless kernel and right: compute capability 9.x (Hopper), bf16,
    every row 16-byte aligned (hidden and intermediate multiples of 8).

    torch 2.10-2.13 (aten/src/ATen/native/cuda/GroupedBlas.cpp, `_grouped_mm_cuda`) runs its CUTLASS kernel only
    for bf16 on major 9 or 10. Every other CUDA device (sm_80/86/89 such as the A40, sm_12x) takes
    `_grouped_mm_fallback` (GroupedMMUtils.h): `offs.cpu()`, a host sync on every call, then one mm per group;
    right, but each layer would sync twice in forward and again in backward instead of the loop's once
    (pytorch#186620: no syncless Ampere kernel is planned; inductor's Triton template is gated to sm_90+ too).
    On Blackwell (10.x) the fast kernel gives non-zero weight gradients to zero-token groups (pytorch#172439,
    open), and an idle expert must get exactly zero. So elsewhere the loop runs, its sync measured by the GPU
    check."""
    return (capability is not None and capability[0] == 9 and dtype == torch.bfloat16 and hidden % 8 == 0
            and intermediate % 8 == 0 and hasattr(torch, "_grouped_mm"))


def expert_kernel(x: torch.Tensor, hidden: int, intermediate: int) -> ExpertKernel:
    """The kernel for rows x: grouped where supported, masked dense under torch.compile off CUDA, else the loop."""
    capability = torch.cuda.get_device_capability(x.device) if x.is_cuda else None
    if grouped_mm_supported(capability, x.dtype, hidden, intermediate):
        return grouped_experts
    if torch.compiler.is_compiling() and not x.is_cuda:
        return masked_dense_experts
    return looped_experts
