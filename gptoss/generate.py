"""Sampling from a trained model: load it (export dir or training checkpoint), then decode with KV caches.

GPT-OSS decodes with one `KVCache` per layer (`model.new_caches`): the prompt is run once through `forward`,
then one token per row and step through `model.decode_step`, which reads weights derived once per change of the
parameters (`prepare_decode`: fused, [in, out]), writes the preallocated caches in place and runs only the chosen
experts. Sliding layers keep a ring buffer of W positions, full layers the whole sequence, so a step costs
O(context) instead of re-running the prefix; a row that ended leaves the batch. On CUDA the step runs compiled
(`compiled_decode_step`: CUDA graphs over static caches and gathered experts). The GPT-2 baseline has no cache:
each step re-runs the last `max_position_embeddings` tokens (nanoGPT's crop), which is exact within the
trained context and slower; the same recompute path serves as the reference the cache is tested against.

Sampling: logits / temperature -> top-k -> top-p (nucleus), the order of transformers' warpers; temperature
0 is greedy. Row i of a batch draws from its own CPU `torch.Generator` seeded with `seed + i` (one uniform
per step, inverted through the CDF), so a row samples what a single run with seed + i samples, and a seed
gives the same tokens on CPU and GPU, as long as the logits agree (a batched forward rounds like a single
one on CPU; a draw within rounding of a CDF step could still differ). Seed None draws from torch's global
CPU generator (`torch.manual_seed` applies).

A run trained with a data vocabulary (`--vocab data`, `gptoss.model.head`) samples full-vocabulary ids: its
last-position logits are expanded to all 201,088 ids with the tail logit itself for every id outside the kept
set (not plus ln N: the N equal logits together carry it), so softmax, top-k/top-p, sampling and greedy are
exactly those of its export in transformers (greedy ties resolve to the lowest id in both).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from gptoss.config import ModelConfig
from gptoss.errors import UserError

if TYPE_CHECKING:
    from gptoss.model import ModelOptions

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class SampleError(UserError):
    """A sampling request that cannot work (bad setting, tokenizer and model disagree); says why."""


# ---- loading ---------------------------------------------------------------------------------------------

def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise SampleError(f"device {device!r}: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SampleError(f"device {device!r}: CUDA is not available on this machine")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, stored: torch.dtype) -> torch.dtype:
    """None/"auto": the stored dtype on an accelerator; fp32 on CPU, where bf16 matmuls are slow (bf16
    weights become fp32 exactly, so nothing is lost)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float32 if device.type == "cpu" else stored
    if dtype not in DTYPES:
        raise SampleError(f"dtype {dtype!r}: expected auto or one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def model_from_state_dict(cfg: ModelConfig, state: dict[str, torch.Tensor], options: ModelOptions | None = None
                          ) -> nn.Module:
    """Build on the meta device and adopt the given tensors (no random init of weights we replace)."""
    from gptoss.model import ModelOptions, build_model
    from gptoss.model.layers import RotaryEmbedding

    model = build_model(cfg, device="meta", options=options or ModelOptions())
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings and hasattr(model, "wte"):
        model.lm_head.weight = model.wte.weight  # assign=True replaced the shared Parameter by two
    if hasattr(model, "rotary"):  # its inv_freq is a plain tensor, created on meta above
        model.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    return model


def load_model(path: str | os.PathLike, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None, *, tag: str | None = None,
               master_weights: bool = False, options: ModelOptions | None = None) -> nn.Module:
    """A model ready for `generate`, in eval mode, from an export dir (model.safetensors + gptoss_config.json,
    HF names with config.json or our own names without, see `gptoss.export.read_export`) or a run /
    checkpoints / tag dir (consolidated in memory by `gptoss.checkpoint.read`, nothing written); `options` the
    kernels it runs (`gptoss.model.ModelOptions`)."""
    from gptoss.checkpoint.read import load_state_dict
    from gptoss.export import CONFIG_NAME, HF_CONFIG_NAME, read_export

    path = Path(path)
    if (path / CONFIG_NAME).is_file() or (path / HF_CONFIG_NAME).is_file():
        cfg, state = read_export(path)
    else:
        cfg, state = load_state_dict(path, tag=tag, master_weights=master_weights)
    dev = resolve_device(device)
    stored = next(iter(state.values())).dtype
    model = model_from_state_dict(cfg, state, options)
    return model.to(device=dev, dtype=resolve_dtype(dtype, dev, stored)).eval()


# ---- sampling --------------------------------------------------------------------------------------------

def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf what top-k and then top-p (nucleus) exclude; logits (B, V), already temperature-scaled.

    top-k keeps the k largest (ties with the k-th kept, as transformers does). top-p keeps the smallest
    set of most probable tokens whose probability reaches top_p: token i stays if the mass strictly
    before it (in descending order) is < top_p, so the most probable token always stays.
    """
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits.float(), dim=-1)
        mass_before = probs.cumsum(-1) - probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    """Next token per row (B,) from the last-position logits (B, V); `generator` one for all rows, or one per
    row (B of them: a row's draws then do not depend on how many rows there are)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    if generator is None or isinstance(generator, torch.Generator):
        u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64)
    else:
        u = torch.stack([torch.rand(1, generator=g, dtype=torch.float64) for g in generator])
    u = u.to(probs.device)
    cdf = probs.double().cumsum(-1)
    # First index with cdf > u * total: always a token of positive probability; u * total makes it
    # immune to the rounding of the cdf's last value.
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)
    return idx.clamp_max(probs.shape[-1] - 1)


def generate(model: nn.Module, prompt_ids: Sequence[int] | torch.Tensor, max_new_tokens: int, *,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, stop_ids: Sequence[int] = (),
             on_token: Callable[[int], None] | None = None, use_cache: bool = True,
             compile: bool | None = None) -> list[int]:
    """New token ids after `prompt_ids` (one sequence), ending with a stop id if one was produced.

    `on_token` is called with each new id as soon as it is sampled (for streaming output).
    """
    return generate_batch(model, torch.as_tensor(prompt_ids).reshape(1, -1), max_new_tokens,
                          temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop_ids=stop_ids,
                          use_cache=use_cache, compile=compile,
                          on_token=(lambda _row, t: on_token(t)) if on_token else None)[0]


@torch.no_grad()
def generate_batch(model: nn.Module, prompts: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                   top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                   stop_ids: Sequence[int] = (), use_cache: bool = True,
                   on_token: Callable[[int, int], None] | None = None, compile: bool | None = None
                   ) -> list[list[int]]:
    """New ids per row for equal-length prompts (B, T), row i what `generate` gives with seed + i. A row ends
    at its first stop id (kept) and emits nothing after it; decoding ends when every row has.
    `on_token(row, id)` is called with each id a row keeps, as soon as it is sampled.

    With caches the prompt runs through `forward` once, then each token through `decode_step`; a row that ended
    leaves the batch (its cache rows are dropped), except under `compile`, whose graph keeps its shapes. `compile`
    (None: on CUDA) runs the step through torch.compile (`compiled_decode_step`). `use_cache=False` recomputes
    the whole sequence each step (the reference; the only path for GPT-2).
    """
    if prompts.dim() != 2 or prompts.shape[1] == 0:
        raise ValueError(f"prompts must be (batch, length >= 1), got shape {tuple(prompts.shape)}")
    param = next(model.parameters())
    seq, batch = prompts.to(param.device), prompts.shape[0]
    generators = None if seed is None else [torch.Generator().manual_seed(seed + i) for i in range(batch)]
    cached = use_cache and hasattr(model, "decode_step")  # GPT-2 decodes by recomputing
    compile = cached and (param.device.type == "cuda" if compile is None else compile)
    limit = getattr(model.config, "max_position_embeddings", None)
    crop = -limit if model.config.arch == "gpt2" and limit else 0
    stops = set(stop_ids)
    rows: list[list[int]] = [[] for _ in range(batch)]
    active = list(range(batch))  # the rows still in the batch, in batch order
    if cached:
        model.prepare_decode(stacked_experts=compile)
        caches = (static_caches(model, batch, seq.shape[1] + max_new_tokens) if compile else
                  model.new_caches(batch, seq.shape[1] + max_new_tokens, param.dtype, param.device))
        step = compiled_decode_step(model) if compile else model.decode_step
        logits = model(seq, caches=caches).logits[:, -1]  # the prompt, once
        position = torch.tensor([seq.shape[1]], device=param.device)
    else:
        logits = model(seq[:, crop:]).logits[:, -1]
    for n in range(max_new_tokens):
        row_generators = None if generators is None else [generators[i] for i in active]
        nxt = sample_next(logits, temperature, top_k, top_p, row_generators)
        ended = []
        for j, t in enumerate(nxt.tolist()):
            i = active[j]
            if rows[i] and rows[i][-1] in stops:
                continue  # ended earlier but kept in a compiled batch
            rows[i].append(t)
            if on_token is not None:
                on_token(i, t)
            if t in stops:
                ended.append(j)
        if n == max_new_tokens - 1 or all(r and r[-1] in stops for r in rows):
            break
        if ended and not compile:  # finished rows leave the batch
            keep = torch.tensor([j for j in range(len(active)) if j not in ended], device=param.device)
            active = [active[j] for j in keep.tolist()]
            nxt, seq = nxt[keep], seq[keep]
            for cache in caches if cached else ():
                cache.select(keep)
        if cached:
            if compile and param.device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's logits are no longer read
            logits = step(nxt, caches, position)
            position += 1
        else:  # only the recompute path re-reads the whole sequence
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            logits = model(seq[:, crop:]).logits[:, -1]
    return rows


def compiled_decode_step(model: nn.Module) -> Callable[..., torch.Tensor]:
    """The model's `decode_step` under torch.compile, once per model: whole graph, static shapes; on CUDA
    mode "reduce-overhead" (CUDA graphs: a step is one graph replay, no per-op launch cost), elsewhere the
    backend GPTOSS_COMPILE_BACKEND names (inductor by default). The MoE gathers its chosen experts' weights
    (`MoEFeedForward.decode`); the weights and caches it reads keep their addresses (`static_caches`)."""
    from gptoss.model.options import COMPILE_BACKEND_ENV

    step, cuda = model.__dict__.get("_compiled_decode_step"), next(model.parameters()).is_cuda
    if step is None:
        backend = os.environ.get(COMPILE_BACKEND_ENV, "inductor")
        mode = "reduce-overhead" if cuda and backend == "inductor" else None
        step = torch.compile(model.decode_step, backend=backend, mode=mode, fullgraph=True, dynamic=False)
        model.__dict__["_compiled_decode_step"] = step
    if cuda:  # derived weights are no parameters: say they stay put
        for t in _derived_weights(model):
            torch._dynamo.mark_static_address(t)
    return step


def _derived_weights(model: nn.Module) -> list[torch.Tensor]:
    out = [model.decode_lm_head]
    for block in model.layers:
        out += block.self_attn.decode_weights
        w, b, stacked = block.mlp.decode_weights
        out += [w, b, *stacked.values()]
    return out


def static_caches(model: nn.Module, batch: int, max_len: int) -> list:
    """Caches for the compiled step, kept on the model and reused by later calls with the same shapes (full
    layers' capacity rounded up to 256 positions), so a new call neither recompiles nor re-records a graph."""
    param = next(model.parameters())
    capacity = -(-max_len // 256) * 256
    key = (batch, capacity, param.dtype, param.device)
    pool = model.__dict__.setdefault("_static_caches", {})
    if key not in pool:
        pool[key] = model.new_caches(batch, capacity, param.dtype, param.device)
        if param.is_cuda:
            for cache in pool[key]:
                for t in (cache.k, cache.v, cache.pos):
                    torch._dynamo.mark_static_address(t)
    for cache in pool[key]:
        cache.pos.fill_(-1)  # empty: stale keys are masked out
    return pool[key]


# ---- text in, text out (the CLI) -------------------------------------------------------------------------

class TextStreamer:
    """Token ids of rows generated together, decoded and written one row after another: the first unfinished
    row as it comes, a later row's text held until every row before it has ended. A token can end inside a
    UTF-8 character (o200k's byte pieces), so each row's bytes go through an incremental decoder that holds
    back an incomplete tail."""

    def __init__(self, write: Callable[[str], object], rows: int = 1, skip_ids: Sequence[int] = ()) -> None:
        import codecs

        from gptoss.tokenizer import get_encoding

        self.enc, self.write, self.skip = get_encoding(), write, set(skip_ids)
        self.decoders = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in range(rows)]
        self.held: list[list[str]] = [[] for _ in range(rows)]
        self.ended = [False] * rows
        self.current = 0  # the row being written

    def put_text(self, row: int, text: str) -> None:
        if text:
            self.held[row].append(text)
            self._flush()

    def put(self, token_id: int, row: int = 0) -> None:
        if token_id not in self.skip:
            self.put_text(row, self.decoders[row].decode(self.enc.decode_single_token_bytes(token_id)))

    def end(self, row: int = 0) -> None:
        if not self.ended[row]:
            self.put_text(row, self.decoders[row].decode(b"", final=True))
            self.ended[row] = True
            self._flush()

    def _flush(self) -> None:
        while self.current < len(self.held):
            if self.held[self.current]:
                self.write("".join(self.held[self.current]))
                self.held[self.current].clear()
            if not self.ended[self.current]:
                return
            self.current += 1


def sample_text(path: str | os.PathLike, prompt: str = "", *, max_new_tokens: int = 200,
                temperature: float = 0.8, top_k: int | None = 200, top_p: float | None = None,
                seed: int | None = None, num_samples: int = 1, device: str | None = None,
                dtype: str | None = None, write: Callable[[str], object] | None = None,
                model: nn.Module | None = None) -> list[str]:
    """Stories from a prompt, sampled as one batch and written through `write` (stdout by default) in order,
    separated by a `---` line, the first as it is generated.

    Every prompt is preceded by <|endoftext|>, as each story follows one in the training stream; sample i
    uses seed + i, so any one sample can be reproduced alone. A story stops at its <|endoftext|>.
    """
    from gptoss.tokenizer import EOT_ID, VOCAB_SIZE, decode, encode

    checks = [(max_new_tokens >= 1, "max_new_tokens must be >= 1"), (temperature >= 0, "temperature must be >= 0"),
              (top_k is None or top_k >= 1, "top_k must be >= 1 (or None)"),
              (top_p is None or 0 < top_p <= 1, "top_p must be in (0, 1]"),
              (num_samples >= 1, "num_samples must be >= 1")]
    for ok, msg in checks:
        if not ok:
            raise SampleError(msg)

    write = write or (lambda s: print(s, end="", flush=True))
    model = model if model is not None else load_model(path, device, dtype)
    vocab = model.config.vocab_size
    if vocab < VOCAB_SIZE:
        raise SampleError(f"{path}: the model's vocab_size is {vocab}, smaller than o200k_harmony's {VOCAB_SIZE}; "
                         "it cannot use the tokenizer (sample token ids with gptoss.generate.generate instead)")
    ids = torch.tensor([EOT_ID, *encode(prompt)]).repeat(num_samples, 1)
    out = TextStreamer(write, num_samples, skip_ids=[EOT_ID])
    for row in range(num_samples):
        out.put_text(row, ("\n\n---\n\n" if row else "") + prompt)

    def on_token(row: int, t: int) -> None:
        out.put(t, row)
        if t == EOT_ID:
            out.end(row)

    new = generate_batch(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                         stop_ids=[EOT_ID], on_token=on_token)
    for row in range(num_samples):  # the rows that reached max_new_tokens
        out.end(row)
    write("\n")
    return [prompt + decode([t for t in row if t != EOT_ID]) for row in new]
