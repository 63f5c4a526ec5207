"""Checkpoint manifests: the size and crc32 of every file of a checkpoint tag, written into its train_state.json
before `latest` names the tag, and checked before the checkpoint is resumed, exported or sampled from. Kept apart
from `read` because the trainer's save and resume use it too.

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

import os
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gptoss.checkpoint.layout import EXPERT_FILE, TRAIN_STATE, ancestors, read_train_state
from gptoss.errors import CheckpointError

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
    for part in reversed(list(parts)):  # a file two ranks claim is described by the first
        files.update(part)
    unclaimed = [p for p in tag_dir.rglob("*") if p.is_file() and _relative(tag_dir, p) not in files
                 and p.name not in (TRAIN_STATE, TRAIN_STATE + ".tmp")]
    files.update(describe(tag_dir, unclaimed, 0))
    return {"algorithm": ALGORITHM, "files": dict(sorted(files.items()))}


def manifest_bytes(manifest: dict[str, Any]) -> int:
    return sum(e["size"] for e in manifest["files"].values())


# ---- verification ------------------------------------------------------------------------------------------

def _missing(tag_dir: Path, name: str, entry: dict[str, Any], files: dict[str, Any]) -> str:
    if m := EXPERT_FILE.match(name):
        experts = [n for n in files if EXPERT_FILE.match(n)]
        found = sum((tag_dir / n).is_file() for n in experts)
        return (f"{tag_dir / name}: expert file missing (layer {m[1]}, expert {m[2]}); found {found} of "
                f"{len(experts)} expert files in {tag_dir}. With expert parallelism each rank writes its own "
                "experts: copy the files of every rank/node")
    return f"{tag_dir / name}: missing (the manifest lists {entry['size']:,} bytes written by rank {entry['rank']})"


def verify(tag_dir: Path, full: bool = False) -> str | None:
    """None when every file the manifest lists exists with its size (with `full`, also its crc32: reads every
    byte); else the first damaged file, with what was expected and found."""
    try:
        manifest = read_train_state(tag_dir)[MANIFEST]
        files = dict(manifest["files"])
    except CheckpointError as e:
        return str(e)
    except (KeyError, TypeError, ValueError) as e:
        return f"{tag_dir / TRAIN_STATE}: malformed manifest ({type(e).__name__}: {e})"
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
        return problems[0] + (f" (and {len(problems) - 1} more file(s))" if len(problems) > 1 else "")
    if full:
        if manifest.get("algorithm") != ALGORITHM:
            return f"{tag_dir / TRAIN_STATE}: checksum algorithm {manifest.get('algorithm')!r}, this version knows " \
                   f"{ALGORITHM!r}"
        for name, entry in files.items():
            found = crc32_file(tag_dir / name)
            if found != entry[ALGORITHM]:
                return (f"{tag_dir / name}: {ALGORITHM} {found}, the manifest says {entry[ALGORITHM]} (same size: the "
                        "content changed)")
    return None


def check_checkpoint(tag_dir: Path, full: bool, way_out: str, prefix: str = "") -> None:
    """Raise CheckpointError with one line when tag_dir fails verification: the damaged file, expected and found,
    and the newest older tag of its chain that verifies, offered as `way_out TAG`."""
    problem = verify(tag_dir, full)
    if problem is not None:
        older = next((p.name for p in ancestors(tag_dir) if verify(p, full) is None), None)
        then = (f"the newest older checkpoint that verifies is {older}: {way_out} {older}" if older else
                "no older checkpoint verifies (restore the files from a copy)")
        raise CheckpointError(f"{prefix}checkpoint {tag_dir.name} fails verification: {problem}; {then}")
