"""How a model runs, chosen once when it is built (`gptoss.model.build_model`); nothing changes it afterwards."""

from __future__ import annotations

from dataclasses import dataclass

from gptoss.model.kernels.attention import ATTENTION_IMPLS
from gptoss.model.kernels.head_loss import LOSS_IMPLS

COMPILE_BACKEND_ENV = "GPTOSS_COMPILE_BACKEND"  # the torch.compile backend; tests pick a cheaper one than inductor


@dataclass(frozen=True)
class ModelOptions:
    attention: str = "auto"
    """attention kernel (`gptoss.model.kernels.attention`): auto, flex, cpu or eager"""
    loss: str = "auto"
    """head loss kernel (`gptoss.model.kernels.head_loss`): auto, chunked or fused"""
    activation_checkpointing: bool = False
    """recompute each block's activations in the backward pass (torch.utils.checkpoint per block)"""
    compile: bool = False
    """torch.compile each block in place (names and state dicts unchanged); the loss head stays eager"""
    compile_backend: str = "inductor"
    deepspeed_engine: bool = False
    """a DeepSpeed engine will wrap the model: MoE layers are also DeepSpeed's `MoE` (`moe.deepspeed_moe_class`),
    which imports DeepSpeed; the same parameters and state dict either way"""

    def __post_init__(self) -> None:
        for kind, name, names in (("attention", self.attention, ATTENTION_IMPLS), ("loss", self.loss, LOSS_IMPLS)):
            if name not in names:
                raise ValueError(f"{kind} kernel {name!r}: expected one of {', '.join(names)}")


DEFAULT_OPTIONS = ModelOptions()
