"""Looking at models and runs: comparisons, expert usage, attention maps, memory/FLOPs reports.

- `runs`: read a run dir (metrics.jsonl, model_config.json) into curves (validation loss against tokens
  and against training seconds).
- `compare`: train several models with the real trainer on the same data, budget and schedule, then plot
  and tabulate them.
- `experts`: tokens per expert per layer, from a run's metrics or by running a model on text.
- `attention`: per-head attention probabilities and sink mass, recomputed with the model's reference math.
- `report`: parameters, KV-cache bytes and FLOPs per token, all from `gptoss.config` arithmetic.
- `plots`: the matplotlib (Agg, PNG) figures of all of the above.
- `loading`: a trained model from an export or run dir, prompts as token ids (for the commands).

Functions take an `nn.Module` or a list of metric records, so tests use tiny models built in memory;
the command-line tools (`launch/analyze.py`, `launch/compare.py`) load models with
`gptoss.generate.load_model`.
"""


from gptoss.errors import UserError


class AnalysisError(UserError):
    """Input that cannot be analysed (missing file, run without the needed metrics); says which and why."""
