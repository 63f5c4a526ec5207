"""o200k_harmony through tiktoken, usable offline, plus harmony chat rendering.

tiktoken downloads the o200k ranks on first use and keeps them in a cache directory. Cluster compute nodes
often have no internet, so before asking tiktoken for the encoding we seed that cache from the gzipped copy
shipped in `gptoss/assets`, verified by the same sha256 tiktoken checks. A machine whose cache already holds
a valid file is left alone, so online behaviour is stock tiktoken's.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import logging
import os
import tempfile
import uuid
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import tiktoken

from gptoss.errors import UserError

log = logging.getLogger(__name__)

ENCODING_NAME = "o200k_harmony"
VOCAB_SIZE = 201088  # n_vocab of o200k_harmony, reserved specials included = the model's vocab size
EOT_ID = 199999  # <|endoftext|>, appended after every document
BOS_ID = 199998  # <|startoftext|>, the released configs' bos_token_id
RETURN_ID = 200002  # <|return|>, the end of a harmony reply: the released configs' eos_token_id

ASSET_PATH = Path(__file__).parent / "assets" / "o200k_base.tiktoken.gz"
O200K_BASE_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
# The expected_hash in tiktoken_ext/openai_public.py; tiktoken re-checks it when reading the cache.
O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"

# Harmony control tokens (spec: "o200k_harmony" section).
START_ID, END_ID, MESSAGE_ID, CHANNEL_ID = 200006, 200007, 200008, 200005


class TokenizerError(UserError):
    """The tokenizer cannot be loaded as specified (corrupt ranks file, unwritable cache, wrong vocab)."""


def cached_ranks_path() -> Path | None:
    """Where tiktoken looks for the o200k ranks, by `tiktoken.load.read_file_cached`'s own rules:
    `<cache dir>/sha1(blob URL)`; None if caching is off (TIKTOKEN_CACHE_DIR="")."""
    default = os.environ.get("DATA_GYM_CACHE_DIR", os.path.join(tempfile.gettempdir(), "data-gym-cache"))
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR", default)
    return Path(cache_dir) / hashlib.sha1(O200K_BASE_URL.encode()).hexdigest() if cache_dir else None


def _sha256_matches(path: Path) -> bool:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() == O200K_BASE_SHA256
    except OSError:
        return False


def read_shipped_ranks(asset: str | os.PathLike = ASSET_PATH) -> bytes:
    """Unpack the shipped ranks file and verify it; never hands back a different vocabulary."""
    asset = Path(asset)
    try:
        data = gzip.decompress(asset.read_bytes())
    except (OSError, EOFError, zlib.error) as e:  # missing file, bad gzip header, truncated stream
        raise TokenizerError(
            f"cannot read the shipped tokenizer ranks {asset}: {e}; expected a gzipped o200k_base.tiktoken "
            f"with sha256 {O200K_BASE_SHA256} (reinstall gptoss)"
        ) from e
    actual = hashlib.sha256(data).hexdigest()
    if actual != O200K_BASE_SHA256:
        raise TokenizerError(
            f"shipped tokenizer ranks {asset} are corrupt: sha256 of the unpacked file is {actual}, "
            f"expected {O200K_BASE_SHA256} (reinstall gptoss)"
        )
    return data


def seed_tiktoken_cache(asset: str | os.PathLike = ASSET_PATH) -> Path | None:
    """Put the shipped o200k ranks into tiktoken's cache unless a valid copy is already there.

    Returns the cache file, or None when tiktoken caching is disabled (TIKTOKEN_CACHE_DIR="").
    """
    target = cached_ranks_path()
    if target is None:
        log.warning("TIKTOKEN_CACHE_DIR is empty (caching off): tiktoken will download the o200k ranks")
        return None
    if target.is_file() and _sha256_matches(target):
        return target
    data = read_shipped_ranks(asset)
    tmp = target.with_name(f"{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, target)  # atomic: a concurrent reader sees the old file or the whole new one
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if "TIKTOKEN_CACHE_DIR" in os.environ or "DATA_GYM_CACHE_DIR" in os.environ:
            raise TokenizerError(f"cannot write tiktoken's cache file {target}: {e}") from e
        # tiktoken itself tolerates an unwritable default cache; online it can still download.
        log.warning("cannot seed tiktoken's default cache %s (%s); set TIKTOKEN_CACHE_DIR", target, e)
        return None
    log.info("seeded tiktoken cache %s from %s", target, asset)
    return target


def load_encoding(asset: str | os.PathLike = ASSET_PATH) -> tiktoken.Encoding:
    """Uncached loader behind `get_encoding`; `asset` lets tests point it at another ranks file."""
    seed_tiktoken_cache(asset)
    enc = tiktoken.get_encoding(ENCODING_NAME)
    if enc.n_vocab != VOCAB_SIZE or enc.eot_token != EOT_ID:
        raise TokenizerError(
            f"tiktoken's {ENCODING_NAME} has n_vocab={enc.n_vocab}, eot={enc.eot_token}; "
            f"expected {VOCAB_SIZE}, {EOT_ID}"
        )
    return enc


@functools.cache
def get_encoding() -> tiktoken.Encoding:
    """The o200k_harmony encoding (n_vocab 201088), loaded once per process, offline if need be."""
    return load_encoding()


def encode(text: str) -> list[int]:
    """Ordinary text to ids; special-token strings in the text are encoded as plain text."""
    return get_encoding().encode_ordinary(text)


def decode(ids: Iterable[int]) -> str:
    """Ids (specials included) back to text."""
    return get_encoding().decode([int(i) for i in ids])


@functools.cache
def token_byte_lengths() -> np.ndarray:
    """UTF-8 bytes of every id's text, (VOCAB_SIZE,) int64; special and reserved ids are no text: 0.

    Bits per byte divides a loss in bits by the bytes of the predicted tokens, so that tokenizers (and the
    <|endoftext|> between stories) compare fairly: the ordinary ids of a text decode to exactly its bytes.
    """
    lengths = np.zeros(VOCAB_SIZE, dtype=np.int64)
    for token, i in get_encoding()._mergeable_ranks.items():  # the ordinary ids; specials lie above them
        lengths[i] = len(token)
    return lengths


def encode_documents(texts: Sequence[str]) -> list[int]:
    """Concatenate documents, each followed by <|endoftext|>: the layout of the training .bin files."""
    return [i for doc in get_encoding().encode_ordinary_batch(list(texts)) for i in (*doc, EOT_ID)]


def render_chat(messages: Sequence[dict[str, str]]) -> list[int]:
    """Harmony rendering: `<|start|>{role}[<|channel|>{channel}]<|message|>{content}<|end|>` per message.

    Control tokens are inserted as ids and the text parts are encoded as ordinary text, so a message that
    contains "<|end|>" cannot forge a control token.
    """
    ids: list[int] = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise TokenizerError(f"message {i} needs string 'role' and 'content', got {sorted(message)}")
        ids += [START_ID, *encode(role)]
        if message.get("channel"):
            ids += [CHANNEL_ID, *encode(message["channel"])]
        ids += [MESSAGE_ID, *encode(content), END_ID]
    return ids
