"""The ignored-target id where `gptoss.data.sampler` and `gptoss.train.step` import it from."""

from gptoss.model.kernels.head_loss import IGNORE_INDEX

__all__ = ["IGNORE_INDEX"]
