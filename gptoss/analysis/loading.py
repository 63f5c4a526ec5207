"""Models and text for the analysis commands: a trained model from disk, prompts as token ids.

Text goes through o200k_harmony; a model with a smaller vocabulary (the tests' 512-token models, a custom
tokenizer) takes its token ids directly (`--token_ids 1,2,3`), checked against its vocabulary here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from gptoss.analysis import AnalysisError
from gptoss.generate import load_model as _load
from gptoss.tokenizer import decode
from gptoss.tokenizer import encode as _encode


def load_model(path: str | Path, device: str = "cpu") -> nn.Module:
    """An export dir or a run / checkpoint dir, in fp32 eval mode (via `gptoss.generate.load_model`)."""
    if not Path(path).exists():
        raise AnalysisError(f"{path}: no such export or run dir")
    return _load(path, device=device, dtype="fp32")


def encode(text: str, vocab_size: int) -> list[int]:
    """o200k_harmony ids of text, checked against the model's vocabulary (test models use small ones)."""
    ids = _encode(text)
    if not ids:
        raise AnalysisError("the text is empty")
    if max(ids) >= vocab_size:
        raise AnalysisError(f"the tokenizer gives ids up to {max(ids)} but the model's vocabulary has {vocab_size} "
                            "entries; pass token ids directly for a small-vocabulary model")
    return ids


def parse_ints(text: str, flag: str = "--token_ids") -> list[int]:
    """Comma-separated integers (`1,2, 3`), at least one; else a one-line error naming the flag and value."""
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        ids = []
    if not ids:
        raise AnalysisError(f"{flag} {text!r}: expected comma-separated integers")
    return ids


def check_token_ids(ids: list[int], vocab_size: int, flag: str = "--token_ids") -> list[int]:
    """ids unchanged when all lie in [0, vocab_size); else an error naming the first bad one."""
    if not ids:
        raise AnalysisError(f"{flag}: no ids")
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise AnalysisError(f"{flag}: id {bad} is outside the model's vocabulary [0, {vocab_size})")
    return list(ids)


def token_strings(ids: list[int] | torch.Tensor) -> list[str]:
    """Each id decoded alone (axis labels); ids outside the tokenizer show as #id."""
    out = []
    for i in torch.as_tensor(ids).flatten().tolist():
        try:
            out.append(decode([i]).replace("\n", "\\n") or f"#{i}")
        except Exception:  # noqa: BLE001 (a reserved or unknown id: label it by number)
            out.append(f"#{i}")
    return out
