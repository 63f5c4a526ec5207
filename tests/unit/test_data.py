"""Text → uint32 files → batches: real tiktoken, real `datasets`, tiny inputs in tmp dirs."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken
import torch

from gptoss.data import BatchSampler, DataError, TokenDataset, eval_batches, prepare_dataset
from gptoss.data import prepare as data_prepare
from gptoss.data.layout import read_token_counts
from gptoss.tokenizer import seed_tiktoken_cache

REPO = Path(__file__).resolve().parents[2]
seed_tiktoken_cache()  # offline machines: tiktoken finds the shipped ranks instead of downloading
ENC = tiktoken.get_encoding("o200k_harmony")  # the reference the .bin files must equal
EOT = 199999
STORIES = [
    "Once upon a time there was a cat named Tom.\nTom liked milk.",
    "Lily found a shiny stone. “Wow!” she said. It was 3 o'clock.",
    "A café in Zürich served 12345 cookies 🍪 — all gone by noon.",
    "The dog said <|endoftext|> out loud, which is just text inside a story.",
    "Ben and Mia built a tall tower of blocks, and then it fell down.",
    "The sun was hot. The little bird sang a song in the tree.",
]


@pytest.fixture(autouse=True)
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep datasets' arrow caches out of the user's ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def write_txt(path: Path, stories: list[str]) -> Path:
    path.write_text("".join(f"{s}\n<|endoftext|>\n" for s in stories), encoding="utf-8")
    return path


def reference(stories: list[str]) -> np.ndarray:
    return np.array([t for s in stories for t in [*ENC.encode_ordinary(s), EOT]], dtype=np.uint32)


def read_docs(path: Path) -> list[str]:
    """Decode a .bin back into its documents (split at EOT)."""
    ids = np.fromfile(path, dtype=np.uint32)
    assert ids[-1] == EOT
    cuts = np.flatnonzero(ids == EOT)
    return [ENC.decode(ids[a + 1 if i else 0 : b].tolist()) for i, (a, b) in enumerate(zip([0, *cuts], cuts))]


def test_txt_directory_uses_its_validation_file_and_equals_tiktoken(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    write_txt(src / "TinyStoriesV2-GPT4-train.txt", STORIES[:4])
    write_txt(src / "TinyStoriesV2-GPT4-valid.txt", STORIES[4:])
    meta = prepare_dataset(str(src), tmp_path / "out", num_proc=1)

    out = tmp_path / "out"
    np.testing.assert_array_equal(np.fromfile(out / "train.bin", dtype=np.uint32), reference(STORIES[:4]))
    np.testing.assert_array_equal(np.fromfile(out / "val.bin", dtype=np.uint32), reference(STORIES[4:]))
    assert meta == json.loads((out / "meta.json").read_text())
    assert meta["val_from"] == "source validation split"
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_id"], meta["dtype"]) == (
        "o200k_harmony", 201088, 199999, "uint32")
    for split, stories in (("train", STORIES[:4]), ("val", STORIES[4:])):
        info = meta["splits"][split]
        assert info["documents"] == len(stories) and info["tokens"] == len(reference(stories))
        assert info["sha256"] == hashlib.sha256((out / f"{split}.bin").read_bytes()).hexdigest()
        assert info["bytes"] == sum(len(st.strip().encode("utf-8")) for st in stories)  # as the reader strips
        ids, counts = read_token_counts(out, split)
        want_ids, want_counts = np.unique(reference(stories), return_counts=True)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(counts, want_counts)
        assert info["distinct_ids"] == len(want_ids)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "token_counts.npz", "train.bin", "val.bin"]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_jsonl_and_parquet_with_a_text_column_and_seeded_holdout(tmp_path: Path, fmt: str) -> None:
    rows = [{"id": i, "story": s} for i, s in enumerate(STORIES)] + [{"id": 99, "story": "   "}]  # blank: dropped
    path = tmp_path / f"stories.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    meta = prepare_dataset(str(path), tmp_path / "out", text_column="story", num_proc=2, val_fraction=0.3, seed=1)

    train, val = read_docs(tmp_path / "out/train.bin"), read_docs(tmp_path / "out/val.bin")
    assert sorted(train + val) == sorted(STORIES) and len(val) == 2  # round(7 * 0.3) documents held out
    assert [s for s in STORIES if s in train] == train  # source order kept
    assert meta["val_from"].startswith("seeded holdout")
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == len(STORIES)
    again = prepare_dataset(str(path), tmp_path / "again", text_column="story", num_proc=1, val_fraction=0.3, seed=1)
    assert again["splits"] == meta["splits"]  # the holdout is a function of the seed


def test_parquet_directory_validation_split_and_glob(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(pa.table({"text": STORIES[:5]}), src / "train-00000.parquet")
    pq.write_table(pa.table({"text": STORIES[5:]}), src / "validation-00000.parquet")
    meta = prepare_dataset(str(src / "*.parquet"), tmp_path / "out", num_proc=1)
    assert read_docs(tmp_path / "out/val.bin") == STORIES[5:]
    assert read_docs(tmp_path / "out/train.bin") == STORIES[:5]
    assert meta["val_from"] == "source validation split"


@pytest.mark.parametrize("fmt", ["txt", "jsonl"])
def test_gzipped_sources_equal_the_plain_ones(tmp_path: Path, fmt: str) -> None:
    """TinyStories mirrors often ship .txt.gz / .jsonl.gz: same tokens as the uncompressed file."""
    plain = tmp_path / f"stories.{fmt}"
    if fmt == "txt":
        write_txt(plain, STORIES)
    else:
        plain.write_text("".join(json.dumps({"text": s}) + "\n" for s in STORIES), encoding="utf-8")
    packed = tmp_path / f"stories.{fmt}.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    a = prepare_dataset(str(plain), tmp_path / "plain", num_proc=1, val_fraction=0.3, seed=2)
    b = prepare_dataset(str(packed), tmp_path / "packed", num_proc=1, val_fraction=0.3, seed=2)
    assert {k: v["sha256"] for k, v in a["splits"].items()} == {k: v["sha256"] for k, v in b["splits"].items()}
    docs = read_docs(tmp_path / "packed/train.bin") + read_docs(tmp_path / "packed/val.bin")
    assert sorted(docs) == sorted(STORIES)


def test_tiny_source_still_gets_a_validation_document(tmp_path: Path) -> None:
    meta = prepare_dataset(str(write_txt(tmp_path / "two.txt", STORIES[:2])), tmp_path / "out", val_fraction=0.01)
    assert meta["splits"]["val"]["documents"] == 1 and meta["splits"]["train"]["documents"] == 1


def test_synthetic_rerun_is_a_noop_unless_forced(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "sample"
    first = prepare_dataset(None, out, synthetic=20)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    caplog.set_level(logging.INFO, logger="gptoss.data")
    assert prepare_dataset(None, out, synthetic=20) == first
    assert "nothing to do" in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    with pytest.raises(DataError, match="other settings.*force"):
        prepare_dataset(None, out, synthetic=20, seed=7)
    forced = prepare_dataset(None, out, synthetic=20, seed=7, force=True)
    assert forced["settings"]["seed"] == 7 and (out / "meta.json").stat().st_mtime_ns != stamps["meta.json"]
    assert {k: i["documents"] for k, i in forced["splits"].items()} == {"train": 20, "val": 2}
    assert forced["synthetic"]["stories"] == {"train": 20, "val": 2} and forced["synthetic"]["seed"] == 7


def test_the_datasets_free_writer_writes_what_prepare_writes(tmp_path: Path) -> None:
    """`write_prepared` (tests, the GPU check) and `prepare_dataset` share one writer: the same ids give the same
    files, the same split entries and the same format keys."""
    from gptoss.data import write_prepared
    from gptoss.tokenizer import VOCAB_SIZE

    meta = prepare_dataset(str(write_txt(tmp_path / "s.txt", STORIES)), tmp_path / "a", num_proc=1)
    arrays = {split: np.fromfile(tmp_path / "a" / f"{split}.bin", dtype=np.uint32) for split in ("train", "val")}
    again = write_prepared(tmp_path / "b", arrays, tokenizer=meta["tokenizer"], vocab_size=VOCAB_SIZE, eot_id=EOT,
                           source=meta["source"], utf8_bytes={k: v["bytes"] for k, v in meta["splits"].items()})
    assert again["splits"] == meta["splits"] and set(again) <= set(meta) and again["format_version"] == 1
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    for split in arrays:  # token_counts.npz: a zip, whose entries carry the time they were written
        assert all(np.array_equal(x, y) for x, y in zip(read_token_counts(tmp_path / "a", split),
                                                        read_token_counts(tmp_path / "b", split)))
    assert json.loads((tmp_path / "b" / "meta.json").read_text()) == again


def test_interrupted_prepare_leaves_nothing_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, out = write_txt(tmp_path / "s.txt", STORIES), tmp_path / "out"
    real_write = data_prepare._write_split

    def write_then_die(ds, path, split):  # train completes, val dies half-way through writing
        if split == "val":
            path.write_bytes(b"\0" * 8)
            raise RuntimeError("killed")
        return real_write(ds, path, split)

    monkeypatch.setattr(data_prepare, "_write_split", write_then_die)
    with pytest.raises(RuntimeError, match="killed"):
        prepare_dataset(str(src), out)
    assert list(out.iterdir()) == []  # no .bin, no meta.json, no temp files

    # Over finished output, an interrupted --force keeps the old data intact and consistent.
    monkeypatch.setattr(data_prepare, "_write_split", real_write)
    prepare_dataset(str(src), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(data_prepare, "_write_split", write_then_die)
    with pytest.raises(RuntimeError, match="killed"):
        prepare_dataset(str(src), out, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    TokenDataset(out, "val", seq_len=8).verify_checksum()


def test_bad_sources_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="source file not found: .*missing.txt"):
        prepare_dataset(str(tmp_path / "missing.txt"), tmp_path / "out")
    with pytest.raises(DataError, match="no files match"):
        prepare_dataset(str(tmp_path / "nothing-*.jsonl"), tmp_path / "out")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n<|endoftext|>\n\n")
    with pytest.raises(DataError, match=r"empty.txt: empty dataset"):
        prepare_dataset(str(empty), tmp_path / "out")
    jsonl = tmp_path / "stories.jsonl"
    jsonl.write_text('{"story": "a"}\n{"story": "b"}\n')
    with pytest.raises(DataError, match=r"no text column 'text'.*columns: \['story'\]"):
        prepare_dataset(str(jsonl), tmp_path / "out")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(DataError, match="output dir .*file exists and is a file"):
        prepare_dataset(str(jsonl), a_file, text_column="story")
    one = write_txt(tmp_path / "one.txt", STORIES[:1])
    with pytest.raises(DataError, match="has 1 document; need at least 2"):
        prepare_dataset(str(one), tmp_path / "out")
    with pytest.raises(DataError, match="val_fraction"):
        prepare_dataset(str(one), tmp_path / "out", val_fraction=0.0)
    assert not (tmp_path / "out").exists()


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    """Train on 40 stories (~600 tokens), validate on 6."""
    stories = [f"Story {i}: {STORIES[i % len(STORIES)]}" for i in range(46)]
    src = tmp_path / "src"
    src.mkdir()
    write_txt(src / "train.txt", stories[:40])
    write_txt(src / "valid.txt", stories[40:])
    prepare_dataset(str(src), tmp_path / "out", num_proc=1)
    return tmp_path / "out"


def test_windows_shift_by_one(prepared: Path) -> None:
    ds = TokenDataset(prepared, "train", seq_len=16, vocab_size=201088)
    ids = np.fromfile(prepared / "train.bin", dtype=np.uint32).astype(np.int64)
    assert isinstance(ds.tokens, np.memmap) and len(ds) == len(ids) - 16
    x, y = ds.batch(np.array([0, 7, len(ds) - 1]))
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (3, 16)
    for row, start in enumerate((0, 7, len(ds) - 1)):
        assert x[row].tolist() == ids[start:start + 16].tolist()
        assert y[row].tolist() == ids[start + 1:start + 17].tolist()
    sampler = BatchSampler(ds, 4, seed=0)
    starts = sampler.starts(0)
    x, y = sampler.next_batch()
    assert x.shape == y.shape == (4, 16) and sampler.step == 1
    assert all(torch.equal(a, b) for a, b in zip((x, y), ds.batch(starts)))
    assert ds.check_token_range() == EOT
    assert ds.verify_checksum() == json.loads((prepared / "meta.json").read_text())["splits"]["train"]["sha256"]


def test_sampler_is_a_pure_function_of_seed_and_step(prepared: Path) -> None:
    ds = TokenDataset(prepared, "train", seq_len=8)
    a, b = BatchSampler(ds, 8, seed=3), BatchSampler(ds, 8, seed=3)
    for _ in range(3):
        assert all(torch.equal(u, v) for u, v in zip(a.next_batch(), b.next_batch()))
    assert not np.array_equal(BatchSampler(ds, 8, seed=4).starts(0), a.starts(0))
    assert np.array_equal(a.starts(5), BatchSampler(ds, 8, seed=3).starts(5))


def test_resume_continues_the_identical_stream(prepared: Path) -> None:
    ds = TokenDataset(prepared, "train", seq_len=8)
    run = BatchSampler(ds, 4, seed=11)
    for _ in range(3):
        run.next_batch()
    state = json.loads(json.dumps(run.state_dict()))  # as a checkpoint would store it
    expected = [run.next_batch() for _ in range(3)]
    resumed = BatchSampler(ds, 4, seed=0)
    resumed.load_state_dict(state)
    assert resumed.step == 3 and resumed.seed == 11
    for (x, y), (ex, ey) in zip((resumed.next_batch() for _ in range(3)), expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    with pytest.raises(DataError, match="batch_size"):
        BatchSampler(ds, 8, seed=11).load_state_dict(state)
    with pytest.raises(DataError, match="seq_len"):
        BatchSampler(TokenDataset(prepared, "train", seq_len=16), 4, seed=11).load_state_dict(state)


def test_eval_batches_are_fixed_and_evenly_spaced(prepared: Path) -> None:
    ds = TokenDataset(prepared, "val", seq_len=8)
    first, second = list(eval_batches(ds, 2, 3)), list(eval_batches(ds, 2, 3))
    assert len(first) == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(first, second))
    edges = ds.batch(np.array([0, len(ds) - 1]))
    assert torch.equal(first[0][0][0], edges[0][0]) and torch.equal(first[-1][1][-1], edges[1][1])
    sharded = [b for r in range(2) for b in eval_batches(ds, 2, 3, rank=r, world_size=2)]
    assert sorted(b[0].sum().item() for b in sharded) == sorted(b[0].sum().item() for b in first)


def test_token_dataset_rejects_bad_files(prepared: Path) -> None:
    with pytest.raises(DataError, match="vocab_size 201088 .*model's vocab_size is 50257"):
        TokenDataset(prepared, "train", seq_len=8, vocab_size=50257)
    with pytest.raises(DataError, match=r"split 'val' has \d+ tokens, fewer than one window .* 100001"):
        TokenDataset(prepared, "val", seq_len=100_000)
    with pytest.raises(DataError, match="no split 'test'"):
        TokenDataset(prepared, "test", seq_len=8)
    train = prepared / "train.bin"
    size = train.stat().st_size
    good = train.read_bytes()
    train.write_bytes(good[:-2])  # truncated mid-token
    with pytest.raises(DataError, match=rf"train.bin is {size - 2} bytes, not a whole .*, expected {size}"):
        TokenDataset(prepared, "train", seq_len=8)
    bad = bytearray(good)
    bad[-8:-4] = b"\xff\xff\xff\xff"  # same size, one id far outside the vocabulary
    train.write_bytes(bytes(bad))
    ds = TokenDataset(prepared, "train", seq_len=8)  # opening does not read the file
    with pytest.raises(DataError, match="train.bin has sha256 .* meta.json says"):
        ds.verify_checksum()
    with pytest.raises(DataError, match=r"token id 4294967295 at position \d+ is outside the vocabulary of 201088"):
        ds.check_token_range()
    (prepared / "meta.json").unlink()
    with pytest.raises(DataError, match="meta.json not found"):
        TokenDataset(prepared, "train", seq_len=8)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "launch/prepare_data.py"), *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_help_synthetic_and_bad_source(tmp_path: Path) -> None:
    help_ = run_cli("--help")
    assert help_.returncode == 0
    for flag in ("--synthetic", "--source", "--out", "--text_column", "--num_proc", "--val_fraction", "--seed",
                 "--force"):
        assert flag in help_.stdout
    bad = run_cli("--source", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "out"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr == f"prepare_data.py: error: source file not found: {tmp_path / 'missing.txt'}\n"
    sys.path.insert(0, str(REPO / "launch"))  # the happy path in-process: faster than another interpreter
    try:
        import prepare_data
    finally:
        sys.path.remove(str(REPO / "launch"))
    assert prepare_data.main(["--synthetic", "30", "--out", str(tmp_path / "sample"), "--num_proc", "1"]) == 0
    assert (tmp_path / "sample/meta.json").is_file()


def test_one_epoch_of_windows_covers_every_token_once(prepared: Path) -> None:
    """The targets of one epoch's windows cover tokens 1 .. n*L exactly once (only a tail shorter than one window
    is left out), and the next epoch is another permutation."""
    ds = TokenDataset(prepared, "train", seq_len=8)
    sampler = BatchSampler(ds, 6, seed=7)
    n, L = sampler.dataset.num_windows, 8
    assert n == (ds.num_tokens - 1) // L and ds.num_tokens - 1 - n * L < L
    steps = -(-n // 6)  # the last step straddles into epoch 2
    starts = np.concatenate([sampler.starts(i) for i in range(steps)])
    first_epoch = starts[:n]
    covered = np.sort(np.concatenate([np.arange(s + 1, s + L + 1) for s in first_epoch]))
    assert np.array_equal(covered, np.arange(1, n * L + 1))
    second = np.concatenate([sampler.starts(i) for i in range(steps, 2 * steps)])
    second_epoch = np.concatenate([starts[n:], second])[:n]
    assert sorted(second_epoch) == sorted(first_epoch) and not np.array_equal(second_epoch, first_epoch)


def test_whole_split_batches_cover_every_target_once_and_even_out_the_ranks(prepared: Path) -> None:
    from gptoss.data import IGNORE_INDEX, whole_split_batches

    ds = TokenDataset(prepared, "val", seq_len=8)
    ids = np.fromfile(prepared / "val.bin", dtype=np.uint32).astype(np.int64)
    n = (ds.num_tokens - 1) // 8
    per_rank = [list(whole_split_batches(ds, 3, rank=r, world_size=2)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) >= -(-n // 3) / 2  # equal forwards on every rank
    targets = torch.cat([y.flatten() for batches in per_rank for _, y in batches])
    kept = targets[targets != IGNORE_INDEX]
    assert len(kept) == n * 8  # every target of the non-overlapping windows, once; padding counts in no loss
    assert sorted(kept.tolist()) == sorted(ids[1:n * 8 + 1].tolist())


REAL_STORIES = REPO / ".." / "shared" / "data" / "tinystories"


@pytest.mark.skipif(not (REAL_STORIES / "valid.txt").is_file(), reason="real TinyStories not in ../shared/data")
def test_real_tinystories_bytes_ids_and_stories(tmp_path: Path) -> None:
    """On the real subset: both files become the two splits, the recorded UTF-8 bytes are the bytes the ids
    decode to (what bits per byte divides by), and the token counts match the files."""
    from gptoss.tokenizer import token_byte_lengths

    meta = prepare_dataset(str(REAL_STORIES / "*.txt"), tmp_path / "ts")
    assert meta["val_from"] == "source validation split"
    assert meta["splits"]["train"]["documents"] == 5431 and meta["splits"]["val"]["documents"] == 3115
    lengths = token_byte_lengths()
    for split in ("train", "val"):
        ids = np.fromfile(tmp_path / "ts" / f"{split}.bin", dtype=np.uint32)
        assert int(lengths[ids].sum()) == meta["splits"][split]["bytes"]
        kept, counts = read_token_counts(tmp_path / "ts", split)
        assert int(counts.sum()) == len(ids) and len(kept) == meta["splits"][split]["distinct_ids"]
