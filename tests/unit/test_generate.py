"""Sampling: KV-cached decoding equals recomputation, the decode step equals the forward pass, finished rows leave
the batch, the compiled step, seeds, top-k/top-p, streaming text, the CLI."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import REPO, launch

from gptoss.config import get_config
from gptoss.export import save_model
from gptoss.generate import (
    SampleError,
    TextStreamer,
    filter_logits,
    generate,
    generate_batch,
    load_model,
    sample_next,
    sample_text,
)
from gptoss.model import build_model

SAMPLE = REPO / "launch" / "sample.py"
VOCAB = 512


pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread: see conftest.one_thread


def tiny_model(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(get_config("tiny", vocab_size=VOCAB, **overrides)).eval()
    # Non-zero biases and sinks, and matrices 10x the 0.02 init: at the usual init greedy decoding of a
    # random model repeats one token, which would make cache-vs-recompute comparisons vacuous.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name or "sinks" in name:
                p.normal_(0, 0.5)
            elif p.dim() >= 2:
                p.mul_(10)
    return model


def prompt(n: int, seed: int = 0, batch: int | None = None) -> torch.Tensor:
    shape = (n,) if batch is None else (batch, n)
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


# ---- cache vs recompute ----------------------------------------------------------------------------------

def test_greedy_cached_equals_recompute_across_sliding_window():
    model = tiny_model()
    window = model.config.sliding_window
    p = prompt(5)
    cached = generate(model, p, 3 * window, temperature=0)
    recomputed = generate(model, p, 3 * window, temperature=0, use_cache=False)
    assert len(cached) == 3 * window  # 5 + 48 positions: the ring buffer wraps three times
    assert cached == recomputed
    assert len(set(cached)) > 5  # not one token repeated


def test_sampling_cached_equals_recompute_with_seed():
    model = tiny_model(1)
    p = prompt(20, seed=1)  # a prompt longer than the window goes into the ring buffer directly
    kw = dict(temperature=1.0, top_k=100, top_p=0.95, seed=7)
    assert generate(model, p, 40, **kw) == generate(model, p, 40, use_cache=False, **kw)


def test_batch_equals_single_rows():
    model = tiny_model(2)
    prompts = prompt(6, seed=2, batch=3)
    rows = generate_batch(model, prompts, 30, temperature=0)
    assert rows == [generate(model, prompts[i], 30, temperature=0) for i in range(3)]
    assert rows == generate_batch(model, prompts, 30, temperature=0, use_cache=False)


def test_batch_rows_sample_what_single_runs_with_seed_plus_row_sample():
    """Row i of a sampled batch is the single run with seed + i; each row stops at its own stop id and emits
    nothing after it."""
    model = tiny_model(7)
    p = prompt(5, seed=7)
    kw = dict(temperature=1.0, top_k=50)
    free = [generate(model, p, 25, seed=100 + i, **kw) for i in range(4)]
    # the stop id whose first occurrence differs most between the rows
    stop = max(sorted(set(sum(free, []))), key=lambda t: len({r.index(t) if t in r else -1 for r in free}))
    singles = [generate(model, p, 25, seed=100 + i, stop_ids=[stop], **kw) for i in range(4)]
    assert len({len(r) for r in singles}) >= 3 and min(len(r) for r in singles) < 25  # the case under test
    seen: list[tuple[int, int]] = []
    rows = generate_batch(model, p.expand(4, -1), 25, seed=100, stop_ids=[stop],
                          on_token=lambda row, t: seen.append((row, t)), **kw)
    assert rows == singles
    assert sorted(seen, key=lambda rt: rt[0]) == [(i, t) for i, r in enumerate(rows) for t in r]
    prompts = prompt(5, seed=8, batch=3)  # different prompts too
    assert generate_batch(model, prompts, 20, seed=9, **kw) == [generate(model, prompts[i], 20, seed=9 + i, **kw)
                                                                 for i in range(3)]


def test_seed_determinism():
    model = tiny_model(3)
    p = prompt(4, seed=3)
    a = generate(model, p, 30, temperature=1.0, seed=11)
    assert a == generate(model, p, 30, temperature=1.0, seed=11)
    assert a != generate(model, p, 30, temperature=1.0, seed=12)


def test_stop_id_ends_generation_and_is_kept():
    model = tiny_model(4)
    p = prompt(4, seed=4)
    free = generate(model, p, 30, temperature=0)
    stop = free[5]
    first = free.index(stop)
    assert generate(model, p, 30, temperature=0, stop_ids=[stop]) == free[:first + 1]


def test_on_token_streams_every_new_token():
    model = tiny_model(5)
    seen: list[int] = []
    out = generate(model, prompt(3), 12, temperature=0.8, seed=0, on_token=seen.append)
    assert seen == out


def test_gpt2_recomputes_and_crops_to_its_context():
    torch.manual_seed(0)
    model = build_model(get_config("gpt2-tiny", vocab_size=VOCAB, max_position_embeddings=16)).eval()
    out = generate(model, prompt(10), 20, temperature=0)  # 30 tokens > 16 positions: cropped, no error
    assert len(out) == 20


# ---- the decode step -------------------------------------------------------------------------------------

def test_decode_step_logits_match_forward_with_and_without_caches():
    """Step by step past the window (the ring buffer wraps), batch 2: `decode_step` against `forward` on the same
    caches (prompt pass + sdpa) and against recomputing the whole sequence; within float rounding."""
    model = tiny_model(8)
    model.prepare_decode()
    window, batch = model.config.sliding_window, 2
    seq = prompt(6, seed=8, batch=batch)
    fast, ref = model.new_caches(batch, 60, torch.float32, "cpu"), model.new_caches(batch, 60, torch.float32, "cpu")
    with torch.no_grad():
        model(seq, caches=fast)
        model(seq, caches=ref)
        for t in range(seq.shape[1], seq.shape[1] + 2 * window + 3):
            tokens = prompt(1, seed=t, batch=batch)
            got = model.decode_step(tokens[:, 0], fast, torch.tensor([t]))
            via_forward = model(tokens, caches=ref, start_pos=t).logits[:, -1]
            seq = torch.cat([seq, tokens], dim=1)
            recomputed = model(seq).logits[:, -1]
            torch.testing.assert_close(got, via_forward, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(got, recomputed, rtol=1e-4, atol=1e-4)
    assert got.abs().max() > 1  # logits of a size where the tolerance is tight


def test_decode_experts_looped_and_gathered_equal_the_layer():
    """The MoE's decode paths (the chosen experts looped; their weights gathered, for compile) against its
    training forward, on rows choosing overlapping experts."""
    model = tiny_model(9)
    moe = model.layers[0].mlp
    moe.prepare_decode(stacked=True)
    x = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = moe(x).hidden
        looped = moe._decode_looped(x, *_routes(moe, x))
        gathered = moe._decode_gathered(x, *_routes(moe, x), moe.decode_weights[2])
        eager = moe.decode(x)
    assert len(set(_routes(moe, x)[0].flatten().tolist())) > 2  # several experts in use
    for got in (looped, gathered, eager):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _routes(moe, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _, top_idx, weights = moe.route(x)
    return top_idx, weights


def test_finished_rows_leave_the_batch():
    """Rows stopping at their own stop id stop being computed: each decode step runs only the unfinished rows,
    and every row is still what its single run gives."""
    model = tiny_model(10)
    p = prompt(4, seed=10, batch=4)
    free = generate_batch(model, p, 20, temperature=0)
    stop = max(sorted(set(sum(free, []))), key=lambda t: len({r.index(t) if t in r else -1 for r in free}))
    sizes: list[int] = []
    step = model.decode_step
    model.decode_step = lambda tokens, *a: (sizes.append(tokens.shape[0]), step(tokens, *a))[1]
    rows = generate_batch(model, p, 20, temperature=0, stop_ids=[stop])
    del model.decode_step
    assert rows == [generate(model, p[i], 20, temperature=0, stop_ids=[stop]) for i in range(4)]
    ends = sorted(len(r) for r in rows if r[-1] == stop)
    assert len(ends) >= 2  # the case under test
    assert sizes == [sum(len(r) > n for r in rows) for n in range(1, len(sizes) + 1)]  # live rows per step
    assert sizes[-1] < 4


def test_compiled_step_equals_eager(monkeypatch):
    """generate's compiled step (whole graph, static shapes: gathered experts, fixed-size caches, rows kept)
    gives the eager tokens, sampled with seeds too; a second call with the same shapes reuses its graph."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("GPTOSS_COMPILE_BACKEND", "eager")  # tracing under test, not inductor's code generation
    model = tiny_model(11)
    p = prompt(5, seed=11, batch=3)
    kw = dict(temperature=1.0, top_k=50, seed=4)
    eager = generate_batch(model, p, 30, **kw)
    torch._dynamo.reset()
    counters.clear()
    assert generate_batch(model, p, 30, compile=True, **kw) == eager
    assert generate_batch(model, p, 30, temperature=0, compile=True) == generate_batch(model, p, 30, temperature=0)
    assert counters["stats"]["unique_graphs"] == 1
    stop = eager[1][3]
    assert (generate_batch(model, p, 30, stop_ids=[stop], compile=True, **kw) ==
            generate_batch(model, p, 30, stop_ids=[stop], **kw))


def test_decode_weights_follow_parameter_changes():
    """The step's derived weights are rebuilt after an in-place change of a parameter."""
    model = tiny_model(12)
    p = prompt(4, seed=12)
    before = generate(model, p, 10, temperature=0)
    with torch.no_grad():
        model.lm_head.weight[before[1]] *= -1  # a token of a decode step
    after = generate(model, p, 10, temperature=0)
    assert after != before and after == generate(model, p, 10, temperature=0, use_cache=False)


# ---- filtering and sampling ------------------------------------------------------------------------------

def test_top_k_hand_case():
    logits = torch.tensor([[1.0, 4.0, 3.0, 3.0, 0.0]])
    assert filter_logits(logits, top_k=2).isfinite().tolist() == [[False, True, True, True, False]]  # tie kept
    assert filter_logits(logits, top_k=1).isfinite().tolist() == [[False, True, False, False, False]]


def test_top_p_hand_case():
    probs = torch.tensor([[0.05, 0.5, 0.3, 0.15]])
    logits = probs.log()
    # descending: 0.5, 0.3, 0.15, 0.05; mass before each: 0, 0.5, 0.8, 0.95
    assert filter_logits(logits, top_p=0.5).isfinite().tolist() == [[False, True, False, False]]
    assert filter_logits(logits, top_p=0.51).isfinite().tolist() == [[False, True, True, False]]
    assert filter_logits(logits, top_p=0.9).isfinite().tolist() == [[False, True, True, True]]
    assert filter_logits(logits, top_p=0.01).isfinite().tolist() == [[False, True, False, False]]  # top stays
    assert filter_logits(logits, top_p=1.0).isfinite().all()


def test_top_k_then_top_p_matches_transformers_warpers():
    transformers = pytest.importorskip("transformers")
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    expected = TopPLogitsWarper(0.8)(None, TopKLogitsWarper(10)(None, logits.clone()))
    assert torch.equal(filter_logits(logits, top_k=10, top_p=0.8).isfinite(), expected.isfinite())
    assert transformers is not None


def test_sampling_frequencies_follow_the_filtered_distribution():
    logits = torch.tensor([0.1, 0.2, 0.6, 0.1]).log().expand(40000, 4)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_next(logits, 1.0, None, None, g), minlength=4).float() / 40000
    torch.testing.assert_close(counts, torch.tensor([0.1, 0.2, 0.6, 0.1]), atol=0.01, rtol=0)
    counts = torch.bincount(sample_next(logits, 1.0, 2, None, g), minlength=4).float() / 40000
    torch.testing.assert_close(counts, torch.tensor([0.0, 0.25, 0.75, 0.0]), atol=0.01, rtol=0)
    assert sample_next(logits[:3], 0.0, None, None, None).tolist() == [2, 2, 2]  # temperature 0: greedy


# ---- text ------------------------------------------------------------------------------------------------

def test_streamer_handles_characters_split_across_tokens():
    from gptoss.tokenizer import encode, get_encoding

    text = "Tom saw a 🦄 and said “héllo” — 日本語!"
    ids = encode(text)
    enc = get_encoding()
    pieces = [enc.decode_single_token_bytes(t) for t in ids]
    assert any(_invalid_utf8(p) for p in pieces)  # the case under test occurs
    out: list[str] = []
    streamer = TextStreamer(out.append)
    for t in ids:
        streamer.put(t)
    streamer.end()
    assert "".join(out) == text
    assert "\ufffd" not in "".join(out)


def _invalid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_small_vocab_model_refused_for_text(tmp_path):
    with pytest.raises(SampleError, match="vocab_size is 512"):
        sample_text(tmp_path, "Once", model=tiny_model(), write=lambda s: None)


def test_bad_settings_refused():
    with pytest.raises(SampleError, match="top_p"):
        sample_text("unused", top_p=0.0, model=tiny_model(), write=lambda s: None)


# ---- CLI ---------------------------------------------------------------------------------------------------

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return launch(SAMPLE, *args, timeout=300)


def test_cli_help(capsys):
    spec = importlib.util.spec_from_file_location("cli_sample", SAMPLE)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--prompt", "--max_new_tokens", "--temperature", "--top_k", "--top_p", "--seed",
                 "--num_samples", "--device", "--dtype"):
        assert flag in out


@pytest.fixture(scope="module")
def full_vocab_export(tmp_path_factory) -> Path:
    """The tiny shape with o200k_harmony's 201088 ids (about 26M parameters, mostly the embeddings)."""
    torch.manual_seed(0)
    model = build_model(get_config("tiny")).eval()
    return save_model(model, tmp_path_factory.mktemp("export") / "tiny-full-vocab")


def test_full_vocab_export_carries_the_harmony_ids(full_vocab_export):
    gen = json.loads((full_vocab_export / "generation_config.json").read_text())
    assert gen["bos_token_id"] == 199998  # <|startoftext|>
    assert gen["eos_token_id"] == [199999, 200002]  # <|endoftext|> ends a story, <|return|> a harmony reply
    assert gen["pad_token_id"] == 199999
    hf = json.loads((full_vocab_export / "config.json").read_text())
    assert (hf["vocab_size"], hf["eos_token_id"], hf["pad_token_id"]) == (201088, 200002, 199999)


def test_cli_prints_a_story_from_an_export(full_vocab_export):
    prompt_text = "Once upon a time"  # the default prompt: leaving --prompt out gives the same
    proc = run_cli(str(full_vocab_export), "--max_new_tokens", "12", "--seed", "0",
                   "--num_samples", "2", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    samples = proc.stdout.split("\n\n---\n\n")
    assert len(samples) == 2
    for s in samples:
        assert s.startswith(prompt_text) and len(s.strip()) > len(prompt_text)
    again = run_cli(str(full_vocab_export), "--prompt", prompt_text, "--max_new_tokens", "12", "--seed", "0",
                    "--num_samples", "2", "--device", "cpu")
    assert again.stdout == proc.stdout


def test_samples_are_one_batch_written_in_order_as_single_runs(full_vocab_export):
    """num_samples N: the stories, written in order, are those of N single runs with seed + i, also when a
    later story ends at its <|endoftext|> before an earlier one."""
    from gptoss.tokenizer import EOT_ID, encode

    model = load_model(full_vocab_export, "cpu", "fp32")
    text = "A little girl went to the woods"
    ids = torch.tensor([EOT_ID, *encode(text)])
    with torch.no_grad():  # <|endoftext|> ties the first greedy token: some stories end at once, others run on
        model.lm_head.weight[EOT_ID] = model.lm_head.weight[generate(model, ids, 1, temperature=0)[0]]
    kw = dict(max_new_tokens=12, temperature=1.0, top_k=5, model=model)
    lengths = [len(r) for r in generate_batch(model, ids.repeat(4, 1), 12, temperature=1.0, top_k=5, seed=0,
                                              stop_ids=[EOT_ID])]
    assert any(lengths[j] < 12 <= lengths[i] for i in range(4) for j in range(i + 1, 4))  # the case under test
    singles = [sample_text("unused", text, seed=i, write=lambda s: None, **kw)[0] for i in range(4)]
    written: list[str] = []
    assert sample_text("unused", text, seed=0, num_samples=4, write=written.append, **kw) == singles
    assert written[0] == text and "".join(written) == "\n\n---\n\n".join(singles) + "\n"


def test_cli_small_vocab_is_a_clear_error(tmp_path):
    export = save_model(tiny_model(), tmp_path / "small")
    proc = run_cli(str(export), "--max_new_tokens", "3", "--seed", "0")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "vocab_size is 512" in proc.stderr


def test_cli_missing_path_is_a_clear_error(tmp_path):
    proc = run_cli(str(tmp_path / "nope"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_load_model_from_export_equals_original(tmp_path):
    model = tiny_model(6)
    loaded = load_model(save_model(model, tmp_path / "e"), "cpu", "fp32")
    x = prompt(30, batch=2)
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    bf16 = load_model(tmp_path / "e", "cpu", "bf16")
    assert bf16.lm_head.weight.dtype == torch.bfloat16
