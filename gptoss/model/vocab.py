"""The data vocabulary's kept set: the ids a training split uses, plus the specials every run keeps (the model's
side is `gptoss.model.head`, the export's `gptoss.export.vocab`)."""

from __future__ import annotations

from collections.abc import Iterable

from gptoss.tokenizer import BOS_ID, CHANNEL_ID, END_ID, EOT_ID, MESSAGE_ID, RETURN_ID, START_ID

# Always kept: <|endoftext|> (every story starts there) and the harmony control tokens a chat fine-tune needs.
HARMONY_SPECIAL_IDS = (BOS_ID, EOT_ID, RETURN_ID, CHANNEL_ID, START_ID, END_ID, MESSAGE_ID)


def kept_set(train_ids: Iterable[int], vocab_size: int) -> list[int]:
    """The kept set S: every id the training split uses plus the special ids (those inside the vocabulary)."""
    ids = {int(i) for i in train_ids} | {i for i in HARMONY_SPECIAL_IDS if i < vocab_size}
    return sorted(ids)
