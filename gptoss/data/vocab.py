"""The kept set of the data vocabulary (`--vocab data`): the ids a train split uses, read from its
token_counts.npz, plus the ids a model must always have. The model only sees the resulting `kept_ids`."""

from __future__ import annotations

from collections.abc import Iterable

from gptoss.data.dataset import TokenDataset
from gptoss.data.layout import read_token_counts
from gptoss.tokenizer import BOS_ID, CHANNEL_ID, END_ID, EOT_ID, MESSAGE_ID, RETURN_ID, START_ID

# Always kept: <|endoftext|> (every story starts there) and the harmony control tokens a chat fine-tune needs.
HARMONY_SPECIAL_IDS = (BOS_ID, EOT_ID, RETURN_ID, CHANNEL_ID, START_ID, END_ID, MESSAGE_ID)


def kept_set(train_ids: Iterable[int], vocab_size: int) -> list[int]:
    """The kept set S: every id the training split uses plus the special ids (those inside the vocabulary)."""
    return sorted({int(i) for i in train_ids} | {i for i in HARMONY_SPECIAL_IDS if i < vocab_size})


def data_kept_ids(train_data: TokenDataset) -> list[int] | None:
    """The kept set of a train split (with its meta.json's eot_id); None when that is every id of the vocabulary."""
    ids, _ = read_token_counts(train_data.data_dir, train_data.split)
    kept = kept_set([*ids.tolist(), train_data.eot_id], train_data.vocab_size)
    return kept if len(kept) < train_data.vocab_size else None
