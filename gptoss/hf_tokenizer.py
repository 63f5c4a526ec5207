"""Hugging Face tokenizer files for o200k_harmony, so an export loads with `AutoTokenizer.from_pretrained`.

An export of a model with o200k_harmony's 201,088 ids gets `tokenizer.json`, `tokenizer_config.json` and
`special_tokens_map.json` next to its weights; `transformers.AutoTokenizer` (and so
`pipeline("text-generation", model=export_dir)`) then encodes and decodes exactly as tiktoken does.

The tokenizer is built from tiktoken's own encoding (offline: `gptoss.tokenizer.get_encoding`) with the
Hugging Face `tokenizers` library alone, by the recipe of transformers' `TikTokenConverter` (the one behind
OpenAI's released gpt-oss tokenizer.json): a byte-level BPE over the 199,998 mergeable ranks with every
split of a token into two ranked halves as a merge, ranked by the token, whole-word lookups first
(`ignore_merges`), tiktoken's split regex, then the 1,090 special tokens as added tokens. The converter
itself is not called because its signature and loading differ between the transformers versions we support
(4.57: `additional_special_tokens`, ranks read only from a file; 5.x: `extra_special_tokens`), and reading
ranks from a file would copy that file into tiktoken's cache under a new key on every export.

tiktoken lists 1,091 special names for the 1,090 ids 199998..201087: id 200018 is both '<|endofprompt|>' and
'<|reserved_200018|>'. Added tokens get ids in the order given, so they are added sorted by id with the
reserved alias dropped (as in OpenAI's release). Every build is checked against tiktoken before anything is
written (`_verify`), so a `tokenizers` release that behaves differently fails the export instead of shipping a
tokenizer that silently disagrees with the weights. `tokenizers` comes with transformers, not with gptoss.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import Any

from gptoss.config import ModelConfig
from gptoss.errors import UserError
from gptoss.hf import hf_max_position_embeddings, special_ids
from gptoss.tokenizer import VOCAB_SIZE, get_encoding

log = logging.getLogger(__name__)

MODES = ("auto", "yes", "no")
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE)

# gptoss.tokenizer.render_chat as a Jinja template (plus the harmony generation prompt). Identical ids for
# messages whose text holds no special-token strings; render_chat encodes such strings as plain text, a
# chat template cannot.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|start|>{{ message['role'] }}"
    "{% if message.get('channel') %}<|channel|>{{ message['channel'] }}{% endif %}"
    "<|message|>{{ message['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}"
)

# Checked against tiktoken on every build: contractions, digits, whitespace runs, accents, CJK, emoji and
# harmony specials (each pre-tokenizer branch of the o200k regex, and the added-token split).
PROBE = ("Once upon a time, Lily's dog didn't RUN 12345 miles!\n\n  \tTabs  and  spaces\r\n"
         "café naïve Привет 世界 こんにちは 🐱🌍 “hi” — ok."
         "<|endoftext|><|startoftext|><|start|>user<|message|>hi<|end|><|start|>assistant"
         "<|channel|>final<|message|>bye<|return|><|endofprompt|><|reserved_200013|>")


class TokenizerExportError(UserError):
    """Hugging Face tokenizer files cannot be written as asked (wrong vocab, `tokenizers` missing, a build
    that disagrees with tiktoken)."""


def harmony_special_tokens() -> dict[str, int]:
    """o200k_harmony's special tokens, name -> id, sorted by id, one name per id (the alias
    '<|reserved_200018|>' of '<|endofprompt|>' dropped); the ids must be exactly 199998..201087."""
    enc = get_encoding()
    by_id: dict[int, str] = {}
    # At a shared id, a real name sorts before its '<|reserved_N|>' alias and wins.
    for name, i in sorted(enc._special_tokens.items(), key=lambda kv: (kv[1], kv[0].startswith("<|reserved_"))):
        by_id.setdefault(i, name)
    specials = {name: i for i, name in by_id.items()}
    n_ranks = len(enc._mergeable_ranks)
    if list(specials.values()) != list(range(n_ranks, enc.n_vocab)):
        raise TokenizerExportError(f"tiktoken's o200k_harmony special ids are not {n_ranks}..{enc.n_vocab - 1} "
                                   "without gaps: cannot map them to Hugging Face added tokens")
    return specials


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, the alphabet of byte-level BPE."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@functools.cache
def build_tokenizer() -> Any:
    """The o200k_harmony `tokenizers.Tokenizer`, built once per process (~3 s) and checked against tiktoken.
    Shared: save it, do not modify it."""
    import tokenizers
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    enc = get_encoding()
    ranks: dict[bytes, int] = enc._mergeable_ranks
    byte_char = _bytes_to_unicode()

    def to_str(token: bytes) -> str:
        return "".join(byte_char[b] for b in token)

    vocab: dict[str, int] = {}
    merges: list[tuple[bytes, bytes, int]] = []
    for token, rank in ranks.items():
        vocab[to_str(token)] = rank
        splits = [(token[:k], token[k:], rank) for k in range(1, len(token))
                  if token[:k] in ranks and token[k:] in ranks]
        merges.extend(sorted(splits, key=lambda s: (ranks[s[0]], ranks[s[1]])))
    merges.sort(key=lambda s: s[2])  # stable: within a token, the order by the halves' ranks stays
    try:
        model = BPE(vocab, [(to_str(a), to_str(b)) for a, b, _ in merges], fuse_unk=False, ignore_merges=True)
    except TypeError as e:  # ignore_merges arrived in tokenizers 0.19
        raise TokenizerExportError(f"tokenizers {tokenizers.__version__} is too old for o200k_harmony's BPE "
                                   f"({e}); install tokenizers>=0.19 or pass --tokenizer no") from e
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(enc._pat_str), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = harmony_special_tokens()
    tok.add_special_tokens([AddedToken(name, normalized=False, special=True) for name in specials])
    _verify(tok, specials, tokenizers.__version__)
    return tok


def _verify(tok: Any, specials: dict[str, int], version: str) -> None:
    """The built tokenizer has tiktoken's vocab size, special ids and ids for PROBE, or the export fails."""
    enc = get_encoding()

    def fail(what: str) -> TokenizerExportError:
        return TokenizerExportError(f"the Hugging Face tokenizer built with tokenizers {version} disagrees with "
                                    f"tiktoken's o200k_harmony: {what}; pass --tokenizer no to export without it")

    if tok.get_vocab_size(with_added_tokens=True) != enc.n_vocab:
        raise fail(f"vocab size {tok.get_vocab_size(with_added_tokens=True)}, expected {enc.n_vocab}")
    for name, i in specials.items():
        got = tok.token_to_id(name)
        if got != i:
            raise fail(f"{name} has id {got}, expected {i}")
    ids = tok.encode(PROBE, add_special_tokens=False).ids
    want = enc.encode(PROBE, allowed_special="all")
    if ids != want:
        k = next((j for j, (a, b) in enumerate(zip(ids, want)) if a != b), min(len(ids), len(want)))
        raise fail(f"probe text ids differ at position {k}: {ids[k:k + 4]} vs {want[k:k + 4]}")
    if tok.decode(want, skip_special_tokens=False) != PROBE:
        raise fail("the probe text does not decode back to itself")


def tokenizer_config(cfg: ModelConfig) -> dict[str, Any]:
    """tokenizer_config.json: read by transformers 4.x and 5.x alike (`PreTrainedTokenizerFast` is the
    tokenizers-backed class in both); no token_type_ids, which GptOss and GPT-2 generate() do not take. The
    bos/eos/pad names are those of the ids in the export's config.json (`gptoss.hf.special_ids`)."""
    by_id, ids = {i: name for name, i in harmony_special_tokens().items()}, special_ids(cfg)
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{f"{k}_token": by_id[ids[f"{k}_token_id"]] for k in ("bos", "eos", "pad")},
        "model_max_length": hf_max_position_embeddings(cfg),
        "model_input_names": ["input_ids", "attention_mask"],
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def tokenizer_files_wanted(cfg: ModelConfig, mode: str, where: str | os.PathLike = "export") -> bool:
    """Whether an export of `cfg` gets tokenizer files. mode "auto": when the vocab is o200k_harmony's and
    `tokenizers` is installed (one warning naming `where` when only the package is missing); "yes": the
    same, but either missing is a TokenizerExportError; "no": never. Call before writing anything."""
    if mode not in MODES:
        raise TokenizerExportError(f"tokenizer mode {mode!r}: expected one of {list(MODES)}")
    if mode == "no":
        return False
    if cfg.vocab_size != VOCAB_SIZE:
        if mode == "yes":
            raise TokenizerExportError(f"--tokenizer yes: the model's vocab_size is {cfg.vocab_size}, but Hugging "
                                       f"Face tokenizer files exist only for o200k_harmony's {VOCAB_SIZE} ids")
        return False
    try:
        import tokenizers  # noqa: F401
    except ImportError as e:
        if mode == "yes":
            raise TokenizerExportError(f"--tokenizer yes needs the Hugging Face tokenizers package ({e}); "
                                       "pip install transformers, or pass --tokenizer no") from e
        log.warning("%s: no Hugging Face tokenizer files (tokenizer.json ...): the tokenizers package is not "
                    "installed (%s); pip install transformers to get them, or pass --tokenizer no", where, e)
        return False
    return True


def write_tokenizer_files(out_dir: str | os.PathLike, cfg: ModelConfig) -> None:
    """Write TOKENIZER_FILES into `out_dir` for a model with o200k_harmony's vocabulary (`tokenizer_files_wanted`
    said yes)."""
    out_dir = Path(out_dir)
    build_tokenizer().save(str(out_dir / TOKENIZER_FILE), pretty=False)  # 12 MB instead of 28
    config = tokenizer_config(cfg)
    (out_dir / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special_map = {k: v for k, v in config.items() if k in ("bos_token", "eos_token", "pad_token")}
    (out_dir / SPECIAL_TOKENS_MAP_FILE).write_text(json.dumps(special_map, indent=2) + "\n")
