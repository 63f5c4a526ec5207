"""The plan of a run: every check of flags, configs and data that needs no process group, done on every rank
before any exists, so a bad flag, config or data dir fails in seconds as one line (exit 2) instead of on every
rank after setup. `plan_run` resolves them into one frozen `Plan`; whether the run resumes is decided from it
(`resume.decide_resume`), and the run lock is taken by the trainer's setup (`loop.main`)."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptoss.checkpoint.layout import CHECKPOINTS_DIR
from gptoss.config import ModelConfig, get_config
from gptoss.data import DataError, TokenDataset, data_kept_ids
from gptoss.errors import TrainError
from gptoss.train.args import TrainArgs, check_args
from gptoss.train.distributed import env_int
from gptoss.train.ds_config import check_batch, check_with_deepspeed, load_ds_config, set_schedule_length

log = logging.getLogger(__name__)


@dataclass(frozen=True)
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
    eot_id: int | None  # story-aware attention: stories start at this id; None: one causal sequence

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.args.seq_len

    @property
    def out(self) -> Path:
        return Path(self.args.out)

    @property
    def ckpt_dir(self) -> Path:
        return self.out / CHECKPOINTS_DIR


def with_data_vocabulary(cfg: ModelConfig, train_data: TokenDataset) -> ModelConfig:
    """`cfg` with kept_ids = the data vocabulary's kept set (`gptoss.data.vocab`); unchanged when that is every id."""
    kept = data_kept_ids(train_data)
    if kept is None:
        log.info("--vocab data: the train split uses every id of the vocabulary; training the full vocabulary")
        return cfg
    log.info("--vocab data: %d kept ids + 1 tail row for the other %d (of %d)", len(kept),
             cfg.vocab_size - len(kept), cfg.vocab_size)
    return dataclasses.replace(cfg, kept_ids=kept)


def plan_run(args: TrainArgs) -> Plan:
    """Validate flags, configs and data before any process group or engine exists."""
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
    total = args.max_steps if args.max_steps is not None else math.ceil(args.tokens / (tbs * args.seq_len))
    set_schedule_length(ds, total)
    train_data, val_data = open_data(args, cfg)
    if args.vocab == "data":
        cfg = with_data_vocabulary(cfg, train_data)
    return Plan(args, ds, cfg, rank, world, ep_size, micro, accum, tbs, total, train_data, val_data,
                eot_id=None if args.attend_across_stories else train_data.eot_id)


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
                ds.check_token_range()
                log.info("verified %s: sha256 matches meta.json, ids < %d (%.1fs)", ds.path, cfg.vocab_size,
                         time.perf_counter() - t0)
    return train_data, val_data
