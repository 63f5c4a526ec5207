"""Checkpoint manifests: the size and crc32 of every file of a checkpoint tag, written into its train_state.json
before `latest` names the tag, and checked before the checkpoint is resumed, exported or sampled from. Kept apart
from `save` and `read` because the writer, the trainer's plan and the offline reader all use it, each raising its
own error type with its own way out.

What it protects against: files truncated, missing or changed by accident after the save (a full disk, an
interrupted or partial copy between clusters, a storage fault that flips bits). Sizes are always checked (one
stat per file); the checksums with --verify_checkpoint (reads every byte). crc32 catches every error burst of up
to 32 bits and other random damage with probability 1 - 2^-32; it is not a cryptographic hash, so it does not
protect against deliberate tampering. It was chosen for speed: ~4.5 GB/s here against sha256's ~1.6 GB/s
(BENCHMARKS.md, section 5), so saving stays dominated by writing.

Each rank hashes the files it wrote itself (`recording_writes`, `describe`), right after writing them (they are
still in the page cache), and rank 0 merges the parts it gathers (`merge`): with expert parallelism across nodes on
a filesystem that is not shared, rank 0 never sees the other nodes' files.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptoss.checkpoint.layout import EXPERT_FILE, TRAIN_STATE, missing_expert_message, tag_step
from gptoss.errors import UserError

log = logging.getLogger(__name__)

MANIFEST = "manifest"  # the key of train_state.json that holds it
ALGORITHM = "crc32"
_CHUNK = 16 << 20


def crc32_file(path: Path) -> str:
    """zlib's crc32 of a file, as 8 hex digits, read in 16 MiB pieces."""
    crc = 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return f"{crc:08x}"


@contextmanager
def recording_writes(engine: Any) -> Iterator[list[str]]:
    """The paths DeepSpeed's checkpoint engine writes on this rank while the block runs: the files this rank
    describes. An engine without one (not DeepSpeed's) records nothing; rank 0's sweep in `merge` covers it."""
    written: list[str] = []
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None:
        yield written
        return
    had_own, save = "save" in vars(ce), ce.save

    def recorded(state_dict: Any, path: str, *args: Any, **kwargs: Any) -> Any:
        result = save(state_dict, path, *args, **kwargs)
        written.append(str(path))
        return result

    ce.save = recorded
    try:
        yield written
    finally:
        if had_own:
            ce.save = save
        else:
            del ce.save


def _relative(tag_dir: Path, path: str | os.PathLike) -> str | None:
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(tag_dir))
    return None if rel.startswith("..") else Path(rel).as_posix()


def describe(tag_dir: Path, paths: Iterable[str | os.PathLike], rank: int) -> dict[str, dict[str, Any]]:
    """{name relative to tag_dir: size, crc32, writer rank} of the files of `paths` inside tag_dir."""
    out: dict[str, dict[str, Any]] = {}
    for p in paths:
        name = _relative(tag_dir, p)
        if name is not None and name not in out:
            out[name] = {"size": os.path.getsize(p), ALGORITHM: crc32_file(Path(p)), "rank": rank}
    return out


def merge(tag_dir: Path, parts: Iterable[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Rank 0: the manifest from every rank's part, plus any file rank 0 sees that no rank claimed (described by
    rank 0 itself). train_state.json, which holds the manifest, is not in it."""
    files: dict[str, dict[str, Any]] = {}
    for part in parts:
        for name, entry in part.items():
            files.setdefault(name, entry)
    unclaimed = [p for p in tag_dir.rglob("*") if p.is_file() and _relative(tag_dir, p) not in files
                 and p.name not in (TRAIN_STATE, TRAIN_STATE + ".tmp")]
    files.update(describe(tag_dir, unclaimed, 0))
    return {"algorithm": ALGORITHM, "files": dict(sorted(files.items()))}


def manifest_bytes(manifest: dict[str, Any]) -> int:
    return sum(e["size"] for e in manifest["files"].values())


# ---- verification ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Verification:
    """The verdict on one tag: `problem` names the first damaged file with what was expected and found;
    `legacy` means there is no manifest to check (saved before manifests, or not by gptoss)."""

    tag_dir: Path
    problem: str | None = None
    legacy: bool = False

    @property
    def verified(self) -> bool:
        return self.problem is None and not self.legacy


def _missing(tag_dir: Path, name: str, entry: dict[str, Any], files: dict[str, Any]) -> str:
    m = EXPERT_FILE.match(name)
    if m:
        experts = [n for n in files if EXPERT_FILE.match(n)]
        found = sum((tag_dir / n).is_file() for n in experts)
        return missing_expert_message(tag_dir / name, int(m[1]), int(m[2]), found, len(experts))
    return f"{tag_dir / name}: missing (the manifest lists {entry['size']:,} bytes written by rank {entry['rank']})"


def verify(tag_dir: Path, full: bool = False) -> Verification:
    """Every file the manifest lists exists with its size; with `full`, also its crc32 (reads every byte)."""
    state_file = tag_dir / TRAIN_STATE
    if not state_file.is_file():
        return Verification(tag_dir, legacy=True)
    try:
        manifest = json.loads(state_file.read_text()).get(MANIFEST)
        files = None if manifest is None else dict(manifest["files"])
    except (OSError, ValueError, AttributeError, KeyError, TypeError) as e:
        return Verification(tag_dir, f"{state_file}: unreadable ({type(e).__name__}: {e})")
    if files is None:
        return Verification(tag_dir, legacy=True)
    problems = []
    for name, entry in files.items():
        path = tag_dir / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append(_missing(tag_dir, name, entry, files))
            continue
        if size != entry["size"]:
            problems.append(f"{path}: {size:,} bytes, the manifest says {entry['size']:,}")
    if problems:
        more = f" (and {len(problems) - 1} more file(s))" if len(problems) > 1 else ""
        return Verification(tag_dir, problems[0] + more)
    if full:
        if manifest.get("algorithm") != ALGORITHM:
            return Verification(tag_dir, f"{state_file}: checksum algorithm {manifest.get('algorithm')!r}, "
                                         f"this version knows {ALGORITHM!r}")
        for name, entry in files.items():
            found = crc32_file(tag_dir / name)
            if found != entry[ALGORITHM]:
                return Verification(tag_dir, f"{tag_dir / name}: {ALGORITHM} {found}, the manifest says "
                                             f"{entry[ALGORITHM]} (same size: the content changed)")
    return Verification(tag_dir)


def newest_verified_before(tag_dir: Path, full: bool = False) -> str | None:
    """The newest `step*` tag beside tag_dir, older than it, that verifies at the same depth (a tag without a
    manifest does not count: nothing vouches for it)."""
    step = tag_step(tag_dir.name)
    older = []
    for p in tag_dir.parent.iterdir():
        s = tag_step(p.name)
        if p.is_dir() and p != tag_dir and s is not None and (step is None or s < step):
            older.append((s, p))
    for _, p in sorted(older, reverse=True):
        if (p / TRAIN_STATE).is_file() and verify(p, full).verified:
            return p.name
    return None


def check_checkpoint(tag_dir: Path, full: bool, error: type[UserError], way_out: str, prefix: str = "") -> None:
    """Raise `error` with one line (the damaged file, expected and found, and the newest older tag that verifies,
    offered as `way_out TAG`) when tag_dir fails verification; a one-line notice when it has no manifest."""
    v = verify(tag_dir, full)
    if v.problem is not None:
        older = newest_verified_before(tag_dir, full)
        then = (f"the newest older checkpoint that verifies is {older}: {way_out} {older}" if older else
                "no older checkpoint verifies (restore the files from a copy)")
        raise error(f"{prefix}checkpoint {tag_dir.name} fails verification: {v.problem}; {then}")
    if v.legacy:
        log.warning("%s has no manifest (saved before checkpoints carried one, or not by gptoss): its files are "
                    "not verified", tag_dir)
