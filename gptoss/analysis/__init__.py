"""Looking at models and runs: comparisons, expert usage, attention maps, memory/FLOPs reports.

    runs       a run dir (metrics.jsonl, model_config.json) as curves against tokens and training seconds
    compare    several models trained by the real trainer on the same data, budget and schedule, compared
    experts    tokens per expert per layer, from a run's metrics or by running a model on text
    attention  per-head attention probabilities and sink mass, recomputed with the model's reference math
    report     parameters, KV-cache bytes and FLOPs per token, all from `gptoss.config` arithmetic
    plots      the matplotlib (Agg, PNG) figures of all of the above
    loading    a trained model from an export or run dir, prompts as token ids (for the commands)

Functions take an `nn.Module` or metric records, so tests use tiny models built in memory.
"""

from gptoss.errors import UserError


class AnalysisError(UserError):
    """Input that cannot be analysed (missing file, run without the needed metrics); says which and why."""
