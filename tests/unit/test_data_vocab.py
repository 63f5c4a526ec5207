"""The data vocabulary (`--vocab data`, `ModelConfig.kept_ids`): rows only for the ids the data uses, one shared
tail row for the rest, and exactly the full-vocabulary model whose unused rows all equal the tail.

Fast tests compare against that model built by hand and against transformers on a 201,088-id export; the slow
ones train with DeepSpeed on CPU (resume exactness, a val split with ids absent from train, a refused resume).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TRAIN, call_main, launch, ok, read_metrics, train_flags

from gptoss.config import ConfigError, ModelConfig, flops_per_token, get_config, param_counts
from gptoss.data import TokenDataset, kept_set, write_prepared
from gptoss.data.sampler import whole_split_batches
from gptoss.export.vocab import expand_state_dict
from gptoss.generate import generate, load_model
from gptoss.model import ModelOptions, build_model
from gptoss.model.head import VOCAB_KEYS
from gptoss.tokenizer import EOT_ID, VOCAB_SIZE

pytestmark = pytest.mark.usefixtures("one_thread")


def kept_for(vocab: int, n: int = 60, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(vocab, generator=g)[:n].tolist()
    return kept_set(ids, vocab)


def with_tied_rows(model: torch.nn.Module) -> torch.nn.Module:
    """The full-vocabulary model, built by hand: every unused row equals the tail row."""
    cfg = model.config
    full = build_model(cfg.exported()).eval()
    full.load_state_dict(expand_state_dict(model.state_dict(), cfg))
    return full


def mixed_ids(kept: list[int], vocab: int, shape: tuple[int, int], seed: int = 1) -> torch.Tensor:
    """Half kept ids, half others, so targets inside and outside the kept set both occur."""
    g = torch.Generator().manual_seed(seed)
    inside = torch.tensor(kept)[torch.randint(0, len(kept), shape, generator=g)]
    anywhere = torch.randint(0, vocab, shape, generator=g)
    return torch.where(torch.rand(shape, generator=g) < 0.5, inside, anywhere)


@pytest.mark.parametrize("name", ["tiny", "gpt2-tiny"])
def test_equals_the_full_model_with_tied_unused_rows(name):
    vocab = 512
    torch.manual_seed(0)
    cfg = get_config(name, vocab_size=vocab, kept_ids=kept_for(vocab))
    model = build_model(cfg).eval()
    assert model.lm_head.weight.shape[0] == cfg.embedding_rows == 64  # 60 kept + 3 pad + the tail
    full = with_tied_rows(model)
    ids, targets = mixed_ids(cfg.kept_ids, vocab, (2, 48)), mixed_ids(cfg.kept_ids, vocab, (2, 48), seed=2)
    outside = ~torch.isin(targets, torch.tensor(cfg.kept_ids))
    assert outside.any() and (~outside).any()
    with torch.no_grad():
        ours, ref = model(ids).logits, full(ids).logits
        assert ours.shape[-1] == vocab
        assert (torch.log_softmax(ours, -1) - torch.log_softmax(ref, -1)).abs().max() <= 1e-5
        loss, ref_loss = model(ids, targets).loss, full(ids, targets).loss
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-5)
    logp = torch.log_softmax(ref, -1).gather(-1, targets[..., None])[..., 0]
    assert -logp.mean().item() == pytest.approx(loss.item(), abs=1e-5)


def test_tail_log_probability_is_p_tail_over_n():
    vocab = 512
    torch.manual_seed(0)
    cfg = get_config("tiny", vocab_size=vocab, kept_ids=kept_for(vocab))
    model = build_model(cfg).eval()
    outside = next(i for i in range(vocab) if i not in set(cfg.kept_ids))
    ids = torch.tensor([[cfg.kept_ids[0], cfg.kept_ids[1]]])
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
        loss = model(ids[:, :1], torch.tensor([[outside]])).loss
        first = model(ids[:, :1]).logits[0, -1]
    n = vocab - len(cfg.kept_ids)
    others = [i for i in range(vocab) if i not in set(cfg.kept_ids)]
    assert len(others) == n and torch.equal(logits[others], logits[others[0]].expand(n))  # the tail logit itself
    # p_tail over the |S| + 1 compact outcomes (tail logit + ln N), then spread evenly over the N ids
    compact = torch.cat([first[cfg.kept_ids], first[outside:outside + 1] + math.log(n)])
    log_p_tail = torch.log_softmax(compact, -1)[-1]
    assert loss.item() == pytest.approx(-(log_p_tail - math.log(n)).item(), abs=1e-5)


def test_config_validation_and_json_round_trip(tmp_path):
    kept = kept_set([5, 17, 3], VOCAB_SIZE)
    cfg = get_config("tiny", kept_ids=kept)
    assert EOT_ID in cfg.kept_ids and cfg.trained_vocab_size == len(kept) + 1
    assert cfg.embedding_rows == 64 and cfg.exported().embedding_rows == VOCAB_SIZE
    assert get_config("tiny", kept_ids=kept_set(range(63), VOCAB_SIZE)).embedding_rows == 128  # 64 kept + tail
    cfg.save(tmp_path / "c.json")
    assert "embedding_rows" not in (tmp_path / "c.json").read_text()
    assert ModelConfig.load(tmp_path / "c.json") == cfg
    assert cfg.exported().kept_ids is None and cfg.exported().vocab_size == VOCAB_SIZE
    for bad, msg in [([3, 2, EOT_ID], "sorted"), ([2, 2, EOT_ID], "sorted"), ([1, 2], "endoftext"),
                     ([EOT_ID, VOCAB_SIZE], "vocab_size"), ([-1, EOT_ID], "vocab_size"),
                     ([1.5, EOT_ID], "integer")]:
        with pytest.raises(ConfigError, match=msg):
            get_config("tiny", kept_ids=bad)


def test_param_counts_and_flops_report_trained_and_exported():
    kept = kept_set(range(9000), VOCAB_SIZE)
    cfg, full = get_config("nano", kept_ids=kept), get_config("nano")
    rows, h = len(kept) + 1, cfg.hidden_size
    assert param_counts(cfg, vocab="exported") == param_counts(full)
    assert param_counts(cfg)["embedding"] == rows * h == param_counts(cfg)["unembedding"]
    assert param_counts(cfg)["non_embedding_total"] == param_counts(full)["non_embedding_total"]
    assert flops_per_token(cfg, 4096, vocab="exported") == flops_per_token(full, 4096)
    saved = 3 * 2 * (VOCAB_SIZE - rows) * h
    assert flops_per_token(full, 4096) - flops_per_token(cfg, 4096) == pytest.approx(saved)
    pad = cfg.embedding_rows - rows  # parameters only in the alignment: always zero, not counted
    assert cfg.embedding_rows % 64 == 0 and 0 < pad < 64
    model = build_model(cfg, device="meta")
    assert sum(p.numel() for p in model.parameters()) == param_counts(cfg)["total"] + 2 * pad * h
    tied = get_config("gpt2-nano", kept_ids=kept)
    assert sum(p.numel() for p in build_model(tied, device="meta").parameters()) == \
        param_counts(tied)["total"] + pad * h


def test_story_attention_finds_stories_by_the_full_eot_id():
    """eot_id is compared with the full ids (before they take compact rows): same as the full model."""
    torch.manual_seed(0)
    cfg = get_config("tiny", kept_ids=kept_for(VOCAB_SIZE, 30))
    model = build_model(cfg).eval()
    full = with_tied_rows(model)
    ids = mixed_ids(cfg.kept_ids, VOCAB_SIZE, (2, 40))
    ids[:, [0, 13, 29]] = EOT_ID
    with torch.no_grad():
        a = model(ids, ids.roll(-1, 1), eot_id=EOT_ID).loss
        b = full(ids, ids.roll(-1, 1), eot_id=EOT_ID).loss
        c = model(ids, ids.roll(-1, 1)).loss
    assert a.item() == pytest.approx(b.item(), abs=1e-5) and a.item() != pytest.approx(c.item(), abs=1e-6)


# ---- the pad rows: weights of a multiple of 64 rows, the model of |S| + 1 rows ---------------------------------

class Unpadded(ModelConfig):
    """The same data-vocabulary model with exactly |S| + 1 rows (kept, tail): the reference the pad rows must
    not change."""

    @property
    def embedding_rows(self) -> int:
        return self.trained_vocab_size


def unpadded_twin(model: torch.nn.Module) -> torch.nn.Module:
    """`model` as the unpadded reference: its kept and tail rows, every other weight as it is."""
    cfg = model.config
    ref = build_model(Unpadded(**cfg.to_dict()), options=model.options).train(model.training)
    k = len(cfg.kept_ids)
    ref.load_state_dict({name: torch.cat([t[:k], t[-1:]]) if name in VOCAB_KEYS else t
                         for name, t in model.state_dict().items()})
    return ref


def real_rows(grad: torch.Tensor, kept: int) -> torch.Tensor:
    return torch.cat([grad[:kept], grad[-1:]])


@pytest.mark.parametrize("impl", ["chunked", "fused"])
@pytest.mark.parametrize("name", ["tiny", "gpt2-tiny"])
def test_pad_rows_change_no_loss_gradient_or_logit(name, impl):
    """Against the model without pad rows: the same logits, loss and gradients (every weight, and the vocab
    weights' kept and tail rows), the pad rows' gradients exactly zero, and both zero at init."""
    vocab = 512
    torch.manual_seed(0)
    cfg = get_config(name, vocab_size=vocab, kept_ids=kept_for(vocab))
    model = build_model(cfg, options=ModelOptions(loss=impl)).train()
    ref = unpadded_twin(model)
    k, pad = len(cfg.kept_ids), cfg.embedding_rows - cfg.trained_vocab_size
    assert pad == 3 and ref.lm_head.weight.shape[0] == k + 1
    for n, p in model.named_parameters():
        if n in VOCAB_KEYS:
            assert not p[k:-1].any()
    ids, targets = mixed_ids(cfg.kept_ids, vocab, (2, 48)), mixed_ids(cfg.kept_ids, vocab, (2, 48), seed=2)
    targets[0, :5] = -100
    grads = {}
    for key, m in (("padded", model), ("ref", ref)):
        out = m(ids, targets)
        names, params = zip(*m.named_parameters())
        grads[key] = dict(zip(names, torch.autograd.grad(out.loss * 0.25 + out.aux_loss, params)))
        grads[key]["loss"] = out.loss.detach()
        with torch.no_grad():
            grads[key]["logits"] = m.eval()(ids).logits
    assert grads["padded"].keys() == grads["ref"].keys()
    for n, g in grads["padded"].items():
        want = grads["ref"][n]
        if n in VOCAB_KEYS:
            assert torch.count_nonzero(g[k:-1]) == 0, n  # exactly zero: pads take no probability, no lookups
            g = real_rows(g, k)
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-7, msg=n)
    assert torch.equal(grads["padded"]["logits"], grads["ref"]["logits"])


@pytest.mark.parametrize("name", ["tiny", "gpt2-tiny"])
def test_pad_rows_never_reach_an_export(tmp_path, name):
    """The export of the padded model (pad rows NaN here) is, tensor for tensor, that of the unpadded one."""
    from gptoss.export import read_export, save_model

    torch.manual_seed(0)
    cfg = get_config(name, vocab_size=512, kept_ids=kept_for(512))
    model = build_model(cfg).eval()
    want = expand_state_dict(unpadded_twin(model).state_dict(), cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in VOCAB_KEYS:
                p[len(cfg.kept_ids):-1] = float("nan")
    back_cfg, state = read_export(save_model(model, tmp_path / "export", tokenizer="no"))
    assert back_cfg == cfg.exported() and state.keys() == want.keys()
    assert state["lm_head.weight"].shape[0] == 512
    for k, t in state.items():
        assert torch.equal(t, want[k]), k


# ---- export: a standard 201,088-id model, transformers agrees for every id --------------------------------

@pytest.mark.parametrize("name,cls", [("tiny", "GptOssForCausalLM"), ("gpt2-tiny", "GPT2LMHeadModel")])
def test_export_is_a_full_vocabulary_model_transformers_agrees_with(tmp_path, name, cls):
    transformers = pytest.importorskip("transformers")
    from gptoss.export import read_export, save_model

    torch.manual_seed(0)
    overrides = {} if name == "tiny" else {"num_attention_heads": 4, "head_dim": 16}
    cfg = get_config(name, kept_ids=kept_for(VOCAB_SIZE, 200), **overrides)
    model = build_model(cfg).eval()
    with torch.no_grad():  # a non-degenerate tail: clearly different from the kept rows
        model.lm_head.weight[-1].mul_(8.0)
    out = save_model(model, tmp_path / "export", tokenizer="no")
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["vocab_size"] == VOCAB_SIZE and "kept_ids" not in json.dumps(hf_cfg)
    hf = getattr(transformers, cls).from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    assert hf.lm_head.weight.shape[0] == VOCAB_SIZE
    T = 3 * cfg.sliding_window if name == "tiny" else 48  # longer than the sliding window
    ids = mixed_ids(cfg.kept_ids, VOCAB_SIZE, (2, T))
    targets = mixed_ids(cfg.kept_ids, VOCAB_SIZE, (2, T), seed=3)
    assert (~torch.isin(ids, torch.tensor(cfg.kept_ids))).any()
    assert (~torch.isin(targets, torch.tensor(cfg.kept_ids))).any()
    with torch.no_grad():
        ours = torch.log_softmax(model(ids).logits.float(), -1)
        theirs = torch.log_softmax(hf(ids).logits.float(), -1)
        assert (ours - theirs).abs().max().item() <= 1e-5
        loss = model(ids, targets).loss.item()
    ref = -theirs.gather(-1, targets[..., None]).mean().item()
    assert loss == pytest.approx(ref, abs=5e-5)  # a mean near 12 of fp32 log-sum-exps over |S| + 1 vs 201,088
    # read back: a full-vocabulary model, same log-probs
    back_cfg, state = read_export(out)
    assert back_cfg.kept_ids is None and state["lm_head.weight"].shape[0] == VOCAB_SIZE
    back = load_model(out, dtype="fp32")
    with torch.no_grad():
        assert (torch.log_softmax(back(ids).logits, -1) - ours).abs().max().item() <= 1e-5
    # greedy: ours with the data vocabulary == transformers on the export
    prompt = ids[0, :5]
    mine = generate(model, prompt.tolist(), 12, temperature=0)
    hf_ids = hf.generate(prompt[None], max_new_tokens=12, do_sample=False, pad_token_id=0)[0, 5:].tolist()
    assert list(mine)[-12:] == hf_ids


# ---- training with --vocab data (DeepSpeed on CPU) ----------------------------------------------------------

VOCAB = 512


def write_data(out: Path, train_ids: int = 200) -> Path:
    """A prepared dir (vocabulary 512, <|endoftext|> = 0) whose train split uses ids < train_ids only and whose
    val split uses all 512: ids absent from train."""
    rng = np.random.default_rng(0)
    splits = {}
    for split, n, ids in (("train", 8192, train_ids), ("val", 1024, VOCAB)):
        tokens = np.empty(n, dtype="<u4")
        tokens[0] = 0
        for i in range(1, n):
            tokens[i] = (tokens[i - 1] * 5 + 3) % ids if rng.random() < 0.8 else rng.integers(ids)
        tokens[::97] = 0  # story starts
        splits[split] = tokens
    write_prepared(out, splits, tokenizer="synthetic", vocab_size=VOCAB, eot_id=0, source="test_data_vocab")
    get_config("tiny", vocab_size=VOCAB).save(out / "model.json")
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("dv_data"))


def test_kept_set_from_token_counts(data_dir, tmp_path):
    from gptoss.train.plan import with_data_vocabulary

    cfg = get_config(str(data_dir / "model.json"))
    train = TokenDataset(data_dir, "train", seq_len=32)
    assert with_data_vocabulary(cfg, train).kept_ids == list(range(200))
    every = write_data(tmp_path / "every", train_ids=VOCAB)  # every id used: nothing to save
    assert with_data_vocabulary(cfg, TokenDataset(every, "train", seq_len=32)).kept_ids is None


@pytest.fixture(scope="module")
def data_run(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dv_run") / "run"
    ok(launch(TRAIN, *train_flags(data_dir, out, "--vocab", "data", "--eval_batches", "all")))
    return out


@pytest.mark.slow
def test_val_ids_absent_from_train_get_the_full_vocabulary_loss(data_run, data_dir):
    """The run's val loss (every val target once) equals that of the full model with tied unused rows."""
    cfg = ModelConfig.load(data_run / "model_config.json")
    assert cfg.kept_ids == list(range(200))
    model = load_model(data_run, dtype="fp32")
    assert model.lm_head.weight.shape[0] == 256  # 200 kept, 55 pad, the tail
    full = with_tied_rows(model)
    val = TokenDataset(data_dir, "val", seq_len=32)
    sums = {"data": 0.0, "full": 0.0}
    n = 0
    with torch.no_grad():
        for x, y in whole_split_batches(val, 4):
            valid = int((y != -100).sum())
            assert (~torch.isin(y, torch.arange(200))).any() or valid == 0
            for name, m in (("data", model), ("full", full)):
                sums[name] += m(x, y, eot_id=0).loss.item() * valid
            n += valid
            assert (torch.log_softmax(model(x).logits, -1) - torch.log_softmax(full(x).logits, -1)).abs().max() <= 1e-5
    logged = read_metrics(data_run)[8]["val_loss"]
    assert sums["data"] / n == pytest.approx(sums["full"] / n, rel=1e-5)
    assert logged == pytest.approx(sums["full"] / n, rel=1e-5)


@pytest.mark.slow
def test_resume_with_data_vocab_continues_bit_for_bit(data_run, data_dir, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(data_run, out)
    shutil.rmtree(out / "checkpoints" / "step00000008")
    (out / "checkpoints" / "latest").write_text("step00000006")
    ok(launch(TRAIN, *train_flags(data_dir, out, "--vocab", "data", "--eval_batches", "all", "--resume")))
    full, resumed = read_metrics(data_run), read_metrics(out)
    for step in (7, 8):
        for key in ("loss", "aux_loss", "grad_norm", "lr", "expert_load"):
            assert resumed[step][key] == full[step][key], (step, key)
    assert resumed[8]["val_loss"] == full[8]["val_loss"]


@pytest.mark.slow
def test_resume_with_another_kept_set_is_refused_in_one_line(capsys, monkeypatch, data_run, data_dir, tmp_path):
    other = write_data(tmp_path / "other", train_ids=150)
    kw = dict(model=str(data_dir / "model.json"), resume=True, max_steps=8, seq_len=32)
    line = call_main(capsys, monkeypatch, other, data_run, vocab="data", **kw)
    assert "trained with a data vocabulary of 200 kept ids, this run has a data vocabulary of 150 kept ids " \
           "(0 ids new, 50 no longer used)" in line and len(line) < 400
    line = call_main(capsys, monkeypatch, data_dir, data_run, vocab="full", **kw)
    assert "trained with a data vocabulary of 200 kept ids, this run has the full vocabulary" in line


@pytest.mark.slow
def test_export_of_a_data_vocab_run_is_a_full_vocabulary_model(data_run, tmp_path):
    """launch/export.py on the run: every id outside the kept set has the tail row; same log-probs as the run."""
    from gptoss.export import export, read_export

    out = export(data_run, tmp_path / "export", progress=False)
    cfg, state = read_export(out)
    assert cfg.kept_ids is None and state["lm_head.weight"].shape == (VOCAB, cfg.hidden_size)
    assert torch.equal(state["lm_head.weight"][300], state["lm_head.weight"][511])  # both outside: the tail row
    assert torch.equal(state["embed_tokens.weight"][250], state["embed_tokens.weight"][400])
    run, back = load_model(data_run, dtype="fp32"), load_model(out, dtype="fp32")
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = torch.log_softmax(run(ids).logits, -1), torch.log_softmax(back(ids).logits, -1)
    assert (a - b).abs().max().item() <= 1e-5
    assert generate(run, ids[0, :4].tolist(), 10, temperature=0) == generate(back, ids[0, :4].tolist(), 10,
                                                                              temperature=0)


def test_compare_passes_vocab_to_the_trainer():
    import importlib.util

    spec = importlib.util.spec_from_file_location("cli_compare", TRAIN.parent / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.parse_args(["--models", "tiny", "--out", "x", "--vocab", "data"]).vocab == "data"
    from gptoss.analysis.compare import train_command

    cmd = train_command("tiny", "d", "o", ds_config="c.json", seq_len=8, eval_every=1, log_every=1, max_steps=1,
                        extra=("--vocab", "data"))
    assert cmd[-2:] == ["--vocab", "data"]


# ---- learning: the data vocabulary trains like the full vocabulary ------------------------------------------

def markov_batches(kept: list[int], steps: int, shape: tuple[int, int], seed: int = 0) -> list[torch.Tensor]:
    """Windows of a learnable chain over the kept ids: each id is followed by its successor 80% of the time."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor(kept)
    successor = torch.randperm(len(kept), generator=g)
    out = []
    for _ in range(steps):
        idx = torch.empty(shape[0], shape[1] + 1, dtype=torch.long)
        idx[:, 0] = torch.randint(0, len(kept), (shape[0],), generator=g)
        for t in range(shape[1]):
            jump = torch.randint(0, len(kept), (shape[0],), generator=g)
            idx[:, t + 1] = torch.where(torch.rand(shape[0], generator=g) < 0.8, successor[idx[:, t]], jump)
        out.append(ids[idx])
    return out


def train_steps(cfg: ModelConfig, batches: list[torch.Tensor]) -> tuple[torch.nn.Module, float]:
    """AdamW with clipping, as ds_configs/cpu.json; the mean loss over the last quarter of the steps."""
    torch.manual_seed(0)
    model = build_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    losses = []
    for batch in batches:
        loss = model(batch[:, :-1], targets=batch[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return model, float(np.mean(losses[-len(losses) // 4:]))


@pytest.mark.parametrize("name", ["tiny", "gpt2-tiny"])
def test_the_tail_row_starts_at_zero_and_the_data_vocab_learns_like_the_full_one(name):
    """The tail row stands for N unused rows whose random inits average to ~0, so it starts at zero (a random one
    steered every hidden state's gradient: 0.5 nats worse per token than --vocab full on real text, BENCHMARKS 7).
    Same steps on a learnable chain: the data vocabulary's loss is no worse than the full vocabulary's."""
    vocab = 8192
    kept = kept_for(vocab, n=300)
    full_cfg = get_config(name, vocab_size=vocab)
    data_cfg = get_config(name, vocab_size=vocab, kept_ids=kept)
    model = build_model(data_cfg)
    assert torch.count_nonzero(model.lm_head.weight[-1]) == 0 and model.lm_head.weight[:-1].std() > 0.01
    batches = markov_batches(kept, 80, (8, 32))
    _, full_loss = train_steps(full_cfg, batches)
    model, data_loss = train_steps(data_cfg, batches)
    assert data_loss <= full_loss + 0.05, (data_loss, full_loss)
    k = len(kept)  # 300 kept + 19 pad + the tail: the pads are still exactly zero after AdamW with weight decay
    assert data_cfg.embedding_rows == 320 and model.lm_head.weight[k:].abs().sum() > 0
    for name, p in model.named_parameters():
        if name in VOCAB_KEYS:
            assert torch.count_nonzero(p[k:-1]) == 0, name
