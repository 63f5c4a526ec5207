"""What a run reports: metrics.jsonl records (rank 0; on resume, records past the checkpoint are dropped), the
optional W&B mirror of them, run_args.json, and the throughput inputs (MFU peaks, memory peaks). Apart from the
loop so the record format and its sinks read in one place."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import resource
import uuid
from typing import Any

import torch

from gptoss.train.plan import Plan

log = logging.getLogger(__name__)

# Dense (no 2:4 sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, for MFU, by the exact name that
# torch.cuda.get_device_name() reports: a substring would give "NVIDIA RTX A4000" the A40's peak and an H100
# PCIe (756) the SXM part's (989.4). A name not listed gets no MFU rather than a wrong one.
PEAK_FLOPS = {
    "NVIDIA A40": 149.7e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA H100 80GB HBM3": 989.4e12,  # SXM5
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835.5e12,  # datasheet: 1,671 with sparsity
    "NVIDIA H200": 989.4e12,  # SXM
    "NVIDIA H200 NVL": 835.5e12,  # datasheet: 1,671 with sparsity
    "NVIDIA L40S": 362.05e12,
    "NVIDIA L40": 181.05e12,
}


def peak_flops_of(name: str) -> float | None:
    """Dense bf16 peak of the device called `name` (exactly as torch.cuda.get_device_name() says), else None
    and one log line naming it (the trainer asks once per run)."""
    peak = PEAK_FLOPS.get(name.strip())
    if peak is None:
        log.info("no dense bf16 peak known for device %r: MFU is not reported (add it to PEAK_FLOPS in %s)",
                 name, __name__)
    return peak


def peak_flops() -> float | None:
    """Per-device dense bf16 peak of a known GPU, else None (no MFU on CPU or unknown devices)."""
    if not torch.cuda.is_available():
        return None
    return peak_flops_of(torch.cuda.get_device_name())


def memory_stats() -> dict[str, float | None]:
    """Peak accelerator memory allocated (GPU only) and peak host RSS, GiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"mem_gpu_gib": gpu, "mem_rss_gib": round(rss, 3)}


class MetricsLog:
    """metrics.jsonl (rank 0) and optionally W&B; on resume, records past the checkpoint are dropped."""

    def __init__(self, plan: Plan, resume_step: int | None) -> None:
        self.path = plan.out / "metrics.jsonl"
        self.active = plan.rank == 0
        self.wandb = None
        if not self.active:
            return
        kept = []
        if resume_step is not None and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        if plan.args.wandb:
            import wandb

            id_file = plan.out / "wandb_id.txt"
            run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
            id_file.write_text(run_id)
            self.wandb = wandb.init(project=plan.args.wandb_project, name=plan.out.name, id=run_id,
                                    resume="allow", dir=str(plan.out), config=run_args(plan))

    def write(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v  # NaN/inf are not JSON: null
                  for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            flat = {k: v for k, v in record.items() if not isinstance(v, list) and v is not None}
            for i, layer in enumerate(record.get("expert_load") or []):
                flat[f"expert_load_max/layer{i}"] = max(layer) * len(layer)
            self.wandb.log(flat, step=record["step"])

    def close(self, exit_code: int) -> None:
        if self.wandb is not None:
            self.wandb.finish(exit_code=exit_code)  # W&B marks the run failed unless it is 0


def run_args(plan: Plan) -> dict[str, Any]:
    """run_args.json and the W&B config: the flags and the layout they resolved to."""
    return {"args": dataclasses.asdict(plan.args), "world_size": plan.world_size, "ep_size": plan.ep_size,
            "train_batch_size": plan.global_batch, "micro_batch_size": plan.micro,
            "gradient_accumulation_steps": plan.accum, "tokens_per_step": plan.tokens_per_step,
            "total_steps": plan.total_steps, "ds_config": plan.ds_config}
