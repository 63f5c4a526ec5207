"""gptoss: train a GPT-OSS-architecture language model from scratch with DeepSpeed.

Importing the package checks the one version floor that fails late otherwise: the fused loss calls
`torch.addmm(..., out_dtype=torch.float32)` with bf16 inputs and an fp32 output, legal from torch 2.10
(pytorch#167931); on 2.9 the first CUDA step would die with "self and mat2 must have the same dtype".
"""

from __future__ import annotations

import re

TORCH_FLOOR = (2, 10)  # pyproject.toml's `torch>=` says the same (tested)


def torch_version_problem(version: str) -> str | None:
    """Why torch `version` cannot run gptoss, or None when it can."""
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None or (int(m[1]), int(m[2])) >= TORCH_FLOOR:
        return None
    floor = ".".join(map(str, TORCH_FLOOR))
    return (f"gptoss needs torch >= {floor}, found torch {version} (its fused loss calls torch.addmm with "
            f"out_dtype, new in {floor}): pip install 'torch>={floor}'")


def _check_torch() -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("torch")
    except PackageNotFoundError:  # importing torch will say so itself
        return
    problem = torch_version_problem(found)
    if problem:
        raise ImportError(problem)


_check_torch()
