"""The plan of a run: every check that needs no process group, done on every rank before any exists, so a bad
flag, config, data dir or checkpoint fails in seconds as one line (exit 2) instead of on every rank after setup.
`plan_run` resolves the flags, the DeepSpeed config, the model config, the rank layout and the data into one
`Plan`, takes the run lock (rank 0: one training process per --out), and decides whether (and from which tag) the
run resumes, after checking that tag against its manifest."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptoss.checkpoint.layout import (
    CHECKPOINTS_DIR,
    latest_tag,
    rank_state_file,
    read_train_state,
    train_state_file,
)
from gptoss.checkpoint.lock import RunLock, acquire_run_lock
from gptoss.checkpoint.manifest import check_checkpoint
from gptoss.config import ModelConfig, get_config
from gptoss.data import DataError, TokenDataset
from gptoss.errors import TrainError
from gptoss.train.args import TrainArgs, check_args
from gptoss.train.distributed import env_int
from gptoss.train.ds_config import check_batch, check_with_deepspeed, load_ds_config, set_schedule_length

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """The validated run: resolved DeepSpeed config, model config, layout and data."""

    args: TrainArgs
    ds_config: dict[str, Any]
    cfg: ModelConfig
    rank: int
    world_size: int
    ep_size: int
    micro: int  # train_micro_batch_size_per_gpu
    accum: int  # gradient accumulation steps, derived: train_batch_size / (micro x world)
    global_batch: int  # train_batch_size, sequences per optimizer step
    total_steps: int
    train_data: TokenDataset
    val_data: TokenDataset | None
    resume_tag: str | None  # checkpoint tag to load, when --resume or --resume_from
    eot_id: int | None = None  # story-aware attention: stories start at this id; None: one causal sequence
    lock: RunLock | None = None  # rank 0's lock on the run dir, held until `release`

    def release(self) -> None:
        """Let the next run on this --out start (the end of the process does it too)."""
        if self.lock is not None:
            self.lock.release()

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.args.seq_len

    @property
    def out(self) -> Path:
        return Path(self.args.out)

    @property
    def ckpt_dir(self) -> Path:
        return self.out / CHECKPOINTS_DIR


def _resume_from_tag(a: TrainArgs, ckpt_dir: Path) -> str:
    tag = a.resume_from
    if not tag or Path(tag).name != tag or not (ckpt_dir / tag).is_dir():
        tags = sorted(p.name for p in ckpt_dir.glob("step*") if p.is_dir()) if ckpt_dir.is_dir() else []
        raise TrainError(f"--resume_from {tag}: no checkpoint tag {ckpt_dir / str(tag)}; pass the name of a tag "
                         f"directory of {ckpt_dir}" + (f", one of {', '.join(tags)}" if tags else " (there are none)"))
    return tag


def _check_resume(plan: Plan) -> None:
    """--resume (`latest`) or --resume_from TAG only onto a complete checkpoint that verifies against its manifest,
    of the same model and layout; no new run over an old one. A `latest` that fails verification stops the run:
    the line names the newest older tag that verifies, for --resume_from (the user decides)."""
    a, ckpt_dir = plan.args, plan.ckpt_dir
    if a.resume_from is not None:  # whatever `latest` says, even when it is broken
        flag, tag = "--resume_from", _resume_from_tag(a, ckpt_dir)
    else:
        flag, tag = "--resume", latest_tag(ckpt_dir)
    if not a.resume and a.resume_from is None:
        if tag is not None:
            raise TrainError(f"{a.out} already holds checkpoints (latest: {tag}); pass --resume to continue "
                             "that run or choose another --out")
        return
    if tag is None:
        raise TrainError(f"--resume: no checkpoint to resume in {ckpt_dir} (no 'latest' file); "
                         "drop --resume to start a new run")
    train_state_file(ckpt_dir, tag)
    # Every rank checks the sizes (a stat per file, the same verdict everywhere); the checksums, which read every
    # byte, rank 0 alone: the others wait for it at the rendezvous, and its exit 2 stops them through the launcher.
    check_checkpoint(ckpt_dir / tag, a.verify_checkpoint and plan.rank == 0, TrainError,
                     "resume from it with --resume_from", prefix=f"{flag}: ")
    state = read_train_state(ckpt_dir, tag)
    mine = rank_state_file(ckpt_dir / tag, plan.rank)
    if state.get("world_size") == plan.world_size and not mine.is_file():
        raise TrainError(f"--resume: {mine} not found; {ckpt_dir / tag} is incomplete (copied partially?)")
    # Checkpoints from before the data vocabulary have no kept_ids: they trained the full vocabulary.
    saved_cfg, cfg = {"kept_ids": None, **state["model_config"]}, plan.cfg.to_dict()
    _check_same_vocabulary(tag, saved_cfg.get("kept_ids"), cfg.get("kept_ids"))
    if saved_cfg != cfg:
        diff = ", ".join(f"{k}: {saved_cfg.get(k)!r} -> {cfg.get(k)!r}"
                         for k in sorted(set(saved_cfg) | set(cfg)) if saved_cfg.get(k) != cfg.get(k))
        raise TrainError(f"--resume: checkpoint {tag} was trained with another model config ({diff}); "
                         f"use the same --model, or a new --out to start over")
    layout = {"world_size": plan.world_size, "ep_size": plan.ep_size, "train_batch_size": plan.global_batch,
              "seq_len": a.seq_len}
    changed = {k: (state[k], v) for k, v in layout.items() if state[k] != v}
    if changed:
        what = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
        raise TrainError(f"--resume: checkpoint {tag} was written with another layout ({what}); resume with "
                         "the same number of ranks, --ep_size, train_batch_size and --seq_len "
                         "(ZeRO optimizer shards and the data stream depend on them)")
    story_aware = bool(state.get("story_aware", False))  # checkpoints from before it trained without
    if story_aware != (plan.eot_id is not None):
        log.info("--resume: %s was trained %s story-aware attention; continuing %s it", tag,
                 "with" if story_aware else "without", "with" if story_aware else "without")
        plan.eot_id = _eot_id(plan.train_data) if story_aware else None
    plan.resume_tag = tag


def _check_same_vocabulary(tag: str, saved: list[int] | None, mine: list[int] | None) -> None:
    """One line, not a diff of thousands of ids, when the kept set (--vocab data) differs from the checkpoint's."""
    if saved == mine:
        return
    detail = ""
    if saved is not None and mine is not None:
        s, m = set(saved), set(mine)
        detail = f" ({len(m - s)} ids new, {len(s - m)} no longer used)"
    raise TrainError(f"--resume: checkpoint {tag} was trained with {_vocabulary(saved)}, this run has "
                     f"{_vocabulary(mine)}{detail}; resume with the same --vocab and --data, or a new --out to "
                     "start over")


def _vocabulary(kept_ids: list[int] | None) -> str:
    return "the full vocabulary" if kept_ids is None else f"a data vocabulary of {len(kept_ids)} kept ids"


def with_data_vocabulary(cfg: ModelConfig, train_data: TokenDataset) -> ModelConfig:
    """`cfg` with kept_ids = the ids the train split uses, <|endoftext|> and the harmony specials (token_counts.npz,
    or a one-time scan of train.bin for a dir prepared before it); unchanged when that is every id."""
    import dataclasses

    from gptoss.data.layout import read_token_counts
    from gptoss.model.vocab import kept_set

    found = read_token_counts(train_data.data_dir, "train")
    ids = found[0] if found is not None else _scan_ids(train_data)
    eot = train_data.meta.get("eot_id")
    kept = kept_set([*ids.tolist(), *([eot] if isinstance(eot, int) else [])], cfg.vocab_size)
    if len(kept) >= cfg.vocab_size:
        log.info("--vocab data: the train split uses every id of the vocabulary; training the full vocabulary")
        return cfg
    log.info("--vocab data: %d kept ids + 1 tail row for the other %d (of %d)", len(kept),
             cfg.vocab_size - len(kept), cfg.vocab_size)
    return dataclasses.replace(cfg, kept_ids=kept)


def _scan_ids(data: TokenDataset) -> Any:
    """The distinct ids of a split prepared before token_counts.npz existed (np.unique chunk by chunk)."""
    import numpy as np
    from tqdm.auto import tqdm

    seen = np.zeros(max(data.vocab_size, 1), dtype=bool)
    with tqdm(total=data.num_tokens, desc=f"--vocab data: ids in {data.path.name}", unit="tok",
              disable=env_int("RANK", 0) != 0) as bar:
        for start in range(0, data.num_tokens, 1 << 24):
            chunk = np.asarray(data.tokens[start:start + (1 << 24)])
            seen[np.unique(chunk)] = True
            bar.update(len(chunk))
    return np.flatnonzero(seen)


def plan_run(args: TrainArgs) -> Plan:
    """Validate flags, configs, data and checkpoint before any process group or engine exists."""
    from gptoss.model import validate_parallelism

    check_args(args)
    ds, ours = load_ds_config(args.ds_config)
    cfg = get_config(args.model)
    rank, world = env_int("RANK", 0), env_int("WORLD_SIZE", 1)
    ep_size = args.ep_size if args.ep_size is not None else int(ours.get("ep_size", 1))
    if not cfg.is_moe and args.ep_size is None:
        ep_size = 1  # a config's ep_size means nothing for the dense baseline
    tbs, micro, accum = check_batch(ds, args.ds_config, world)
    check_with_deepspeed(ds, args.ds_config, micro, accum)  # section types too, before reading any of them
    zero = int(ds.get("zero_optimization", {}).get("stage", 0))
    validate_parallelism(cfg, world_size=world, ep_size=ep_size, zero_stage=zero)
    if zero not in (1, 2):
        raise TrainError(f"{args.ds_config}: zero_optimization.stage={zero}: use stage 1 or 2 (the ZeRO "
                         "optimizer skips steps with non-finite gradients; stage 1 costs nothing on one GPU)")
    if args.seq_len > cfg.max_position_embeddings:
        raise TrainError(f"--seq_len={args.seq_len} exceeds the model's context "
                         f"max_position_embeddings={cfg.max_position_embeddings}")
    tokens_per_step = tbs * args.seq_len
    total = args.max_steps if args.max_steps is not None else math.ceil(args.tokens / tokens_per_step)
    set_schedule_length(ds, total)
    train_data, val_data = open_data(args, cfg)
    if args.vocab == "data":
        cfg = with_data_vocabulary(cfg, train_data)
    plan = Plan(args, ds, cfg, rank, world, ep_size, micro, accum, tbs, total, train_data, val_data, None,
                eot_id=None if args.attend_across_stories else _eot_id(train_data))
    # The lock before the checkpoint checks: a second run must hear "in use", not a verdict on a moving target.
    plan.lock = acquire_run_lock(plan.out) if rank == 0 else None
    try:
        _check_resume(plan)
    except BaseException:
        plan.release()
        raise
    return plan


def _eot_id(data: TokenDataset) -> int:
    """The id that starts each story: the data's <|endoftext|> (meta.json's eot_id)."""
    eot = data.meta.get("eot_id")
    if not isinstance(eot, int) or not 0 <= eot < data.vocab_size:
        raise DataError(f"{data.data_dir / 'meta.json'}: eot_id {eot!r} is not an id of the vocabulary "
                        f"({data.vocab_size}); story-aware attention needs it (or pass --attend_across_stories)")
    return eot


def open_data(args: TrainArgs, cfg: ModelConfig) -> tuple[TokenDataset, TokenDataset | None]:
    """Open the splits the run reads; cheap checks always (meta, sizes, vocab, max_token_id), the full sha256
    and token scan with --verify_data. Every rank checks for itself: a node may see a different copy."""
    train_data = TokenDataset(args.data, "train", seq_len=args.seq_len, vocab_size=cfg.vocab_size)
    val_data = None
    if args.eval_every:
        try:
            val_data = TokenDataset(args.data, "val", seq_len=args.seq_len, vocab_size=cfg.vocab_size)
        except DataError as e:
            raise DataError(f"{e} (validation is on: --eval_every 0 trains without it)") from e
    if args.verify_data:
        for ds in (train_data, val_data):
            if ds is not None:
                t0 = time.perf_counter()
                ds.verify_checksum()
                ds.check_token_range(cfg.vocab_size)
                log.info("verified %s: sha256 matches meta.json, ids < %d (%.1fs)", ds.path, cfg.vocab_size,
                         time.perf_counter() - t0)
    return train_data, val_data
