"""The trainer's flags: `TrainArgs` (one field per flag, its help text beside it), the argparse command line
built from it, and the checks a flag can fail on its own. Kept apart so `--help` and the flag rules read in one
place, without the config, data or DeepSpeed code behind them."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from gptoss.errors import TrainError

VOCAB_CHOICES = ("data", "full")


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class TrainArgs:
    """Everything `launch/train.py` accepts; each field's help is the flag's `--help` text."""

    ds_config: str = _help("DeepSpeed JSON config (batch sizes, precision, ZeRO, optimizer, LR schedule)",
                           default="ds_configs/a40.json")
    model: str = _help("model preset (nano, tiny, gpt2-nano, ...) or a ModelConfig JSON file", default="nano")
    data: str = _help("prepared data dir (launch/prepare_data.py): train.bin, val.bin, meta.json",
                      default="data/tinystories")
    out: str = _help("run dir: metrics.jsonl, run_args.json, model_config.json, checkpoints/",
                     default="runs/nano")
    tokens: int | None = _help("train for this many tokens (steps = ceil(tokens / (train_batch_size x "
                               "seq_len))); exclusive with --max_steps", default=None)
    max_steps: int | None = _help("train for this many optimizer steps; exclusive with --tokens", default=None)
    seq_len: int = _help("tokens per training sequence (<= the model's max_position_embeddings)", default=1024)
    ep_size: int | None = _help("expert-parallel size: ranks sharing one copy of the experts (divides the "
                                "world size and the expert count); default: the config's gptoss.ep_size or 1",
                                default=None)
    seed: int = _help("seed of the weight init and the data order", default=0)
    attn_impl: str = _help("attention kernel: auto (FlexAttention on GPU, banded sliding window + SDPA on CPU), "
                           "flex, cpu (the banded/SDPA kernels on any device) or eager (reference)", default="auto")
    loss_impl: str = _help("cross-entropy of the output head (none materialises all logits): auto (fused on CUDA, "
                           "chunked elsewhere), chunked (checkpointed chunks: the logits matmul runs again in "
                           "backward), fused (loss and both gradients in one pass over the chunks, nothing "
                           "recomputed; pure torch, any device); the same loss and gradients within bf16 rounding; "
                           "evaluation is always the chunked loss", default="auto")
    attend_across_stories: bool = _help("let attention cross <|endoftext|> and positions run on across stories; "
                                        "default: each story attends to itself only and its positions restart at "
                                        "its <|endoftext|>, as when sampling", default=False)
    vocab: str = _help("data: embedding and unembedding rows only for the ids the train split uses (plus "
                       "<|endoftext|> and the harmony specials) and one shared tail row for every other id, exactly "
                       "the full-vocabulary model whose unused rows are equal (exports hold all 201,088 ids); "
                       "full: a row per id of the vocabulary", default="full")
    activation_checkpointing: bool = _help("recompute each transformer block's activations in the backward pass "
                                           "(torch.utils.checkpoint per block): less memory, about one more "
                                           "forward per step", default=False)
    compile: bool = _help("torch.compile each transformer block (inductor) before DeepSpeed starts; the loss head "
                          "stays eager. Off by default everywhere until a GPU check shows it pays (bench/"
                          "gpu_check.py measures tokens/s with and without it)", default=False)
    resume: bool = _help("continue from <out>/checkpoints/latest (same model, global batch and --seq_len; any "
                         "world size or --ep_size)", default=False)
    resume_from: str | None = _help("continue from this checkpoint tag of <out>/checkpoints (e.g. step00001000; "
                                    "same checks as --resume) instead of the one `latest` names, which then names "
                                    "it; newer checkpoints are replaced as the run reaches their steps, the others "
                                    "are left as they are", default=None)
    verify_checkpoint: bool = _help("on resuming, read every checkpoint file and compare its crc32 with the "
                                    "manifest (file sizes are always checked)", default=False)
    wandb: bool = _help("also log to Weights & Biases (WANDB_MODE=offline works without network)",
                        default=False)
    wandb_project: str = _help("W&B project name", default="gptoss")
    eval_every: int = _help("evaluate on the val split every N steps and at the end (0: never)", default=200)
    eval_batches: int | str = _help("micro-batches per evaluation (fixed windows; rounded up to a multiple of "
                                    "the world size), or 'all': every target of the val split once", default=20)
    save_every: int = _help("checkpoint every N steps (0: only at the end); always saved at the end",
                            default=1000)
    keep_last: int = _help("keep the newest K checkpoints of this run's chain (the tags it saved or resumed from, "
                           "one after the other), delete older ones of that chain (0: keep all)", default=3)
    log_every: int = _help("write a metrics.jsonl record every N steps (and on eval steps and the last)",
                           default=10)
    max_bad_steps: int = _help("stop (exit 3, checkpoint of the last good state) after N consecutive "
                               "skipped steps with non-finite loss or gradient norm", default=5)
    timeout_min: float = _help("collective timeout in minutes: a dead or hung rank makes the others fail (exit 4) "
                               "instead of hanging", default=30.0)
    verify_data: bool = _help("before training, hash the data files against meta.json's sha256 and scan every "
                              "token id against the vocabulary (reads all the data; sizes and meta.json's "
                              "max_token_id are always checked)", default=False)


def arg_parser(description: str | None = None) -> Any:
    """The command line of `launch/train.py`: one flag per `TrainArgs` field, help from the field."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    types = {"int | None": int, "int": int, "float": float, "str": str, "int | str": _int_or_all,
             "str | None": str}
    for f in dataclasses.fields(TrainArgs):
        help_text = f.metadata["help"]
        if f.type == "bool":
            p.add_argument(f"--{f.name}", action="store_true", help=help_text)
        else:
            default = "" if f.default is None else " (default: %(default)s)"
            p.add_argument(f"--{f.name}", type=types[f.type], default=f.default, help=help_text + default,
                           metavar="N" if types[f.type] in (int, float, _int_or_all) else f.name.upper())
    p.add_argument("--local_rank", type=int, default=None,
                   help="set by the deepspeed launcher; ignored (the LOCAL_RANK environment variable is used)")
    return p


def _int_or_all(text: str) -> int | str:
    """`--eval_batches`: a count, or the word 'all'."""
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'all', got {text!r}") from None


def args_from_namespace(ns: Any) -> TrainArgs:
    return TrainArgs(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(TrainArgs)})


def check_args(a: TrainArgs) -> None:
    """The checks each flag can fail on its own, before any file is read."""
    if (a.tokens is None) == (a.max_steps is None):
        raise TrainError("pass exactly one of --tokens N or --max_steps N (the LR schedule length follows from it)")
    for name, low in (("tokens", 1), ("max_steps", 1), ("seq_len", 1), ("eval_every", 0), ("eval_batches", 1),
                      ("save_every", 0), ("keep_last", 0), ("log_every", 1), ("max_bad_steps", 1), ("seed", 0)):
        v = getattr(a, name)
        if name == "eval_batches" and isinstance(v, str):
            if v != "all":
                raise TrainError(f"--eval_batches={v}: expected a number or 'all'")
            continue
        if v is not None and v < low:
            raise TrainError(f"--{name}={v}: must be >= {low}")
    if a.timeout_min <= 0:
        raise TrainError(f"--timeout_min={a.timeout_min}: must be > 0")
    from gptoss.model.kernels.attention import ATTENTION_IMPLS
    from gptoss.model.kernels.head_loss import LOSS_IMPLS

    for name, choices in (("vocab", VOCAB_CHOICES), ("attn_impl", ATTENTION_IMPLS), ("loss_impl", LOSS_IMPLS)):
        if getattr(a, name) not in choices:
            raise TrainError(f"--{name}={getattr(a, name)}: expected one of {', '.join(choices)}")
