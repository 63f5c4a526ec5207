"""Hugging Face tokenizer files in exports: AutoTokenizer on a full-vocabulary export encodes, decodes and
numbers every special exactly as tiktoken's o200k_harmony does, and pipeline / generate work on the export;
small-vocabulary exports never get the files, and asking for them anyway is a one-line error.

The tokenizer is built once per process (~3 s) and the full-vocabulary export once per module.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, no_partial_dirs

from gptoss import hf_tokenizer
from gptoss.checkpoint.layout import write_train_state
from gptoss.checkpoint.manifest import MANIFEST, merge
from gptoss.config import get_config
from gptoss.data.synthetic import generate_corpus
from gptoss.errors import UserError
from gptoss.export import save_model
from gptoss.generate import generate
from gptoss.hf import EXPERT_KEY
from gptoss.hf_tokenizer import TOKENIZER_FILES, TokenizerExportError
from gptoss.model import build_model
from gptoss.tokenizer import END_ID, MESSAGE_ID, START_ID, VOCAB_SIZE, encode, get_encoding, render_chat

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread: see conftest.one_thread

EXPORT = REPO / "launch" / "export.py"
SAMPLE = "\n<|endoftext|>\n".join(s.text for s in generate_corpus(5, seed=0))  # story text of our own grammar
HARMONY = ("<|startoftext|><|start|>system<|message|>You are a storyteller.<|end|><|start|>user<|message|>hi"
           "<|end|><|start|>assistant<|channel|>final<|message|>Once upon a time.<|return|><|endoftext|>")
TEXTS = [
    SAMPLE,
    SAMPLE + "<|endoftext|>" + HARMONY,
    "café naïve Привет мир 世界 こんにちは 안녕 🐱🌍👩‍👩‍👧 “quotes” — dash… ½ x² ∑",
    "  leading spaces\n\n\ttabs\r\nCRLF   trailing   \n",
    "I'm, you're, we'LL, it's 1234567890 3.14159 e-mail@example.com https://x.y/z?a=1&b=2",
    "<|reserved_200013|><|endofprompt|><|call|><|constrain|>json",
    "",
]
OTHER_FILES = {"model.safetensors", "config.json", "generation_config.json", "gptoss_config.json"}


def full_vocab_model(seed: int = 0) -> torch.nn.Module:
    """The tiny shape with o200k_harmony's 201088 ids, weights scaled so greedy decoding does not repeat."""
    torch.manual_seed(seed)
    model = build_model(get_config("tiny")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.5) if ("bias" in name or "sinks" in name) else p.mul_(10 if p.dim() >= 2 else 1)
    return model


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return full_vocab_model()


@pytest.fixture(scope="module")
def export_dir(model, tmp_path_factory) -> Path:
    return save_model(model, tmp_path_factory.mktemp("hf_tok") / "full")


@pytest.fixture(scope="module")
def hf_tok(export_dir):
    return transformers.AutoTokenizer.from_pretrained(export_dir)


def tokenizer_files(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()} & set(TOKENIZER_FILES)


# ---- the full vocabulary: files, encoding, special ids ---------------------------------------------------

def test_full_vocab_export_carries_tokenizer_files_consistent_with_its_config(export_dir):
    assert {p.name for p in export_dir.iterdir()} == OTHER_FILES | set(TOKENIZER_FILES)
    tok_cfg = json.loads((export_dir / "tokenizer_config.json").read_text())
    special_map = json.loads((export_dir / "special_tokens_map.json").read_text())
    assert special_map == {"bos_token": "<|startoftext|>", "eos_token": "<|return|>", "pad_token": "<|endoftext|>"}
    assert {k: tok_cfg[k] for k in special_map} == special_map
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"  # known to transformers 4.x and 5.x
    hf = json.loads((export_dir / "config.json").read_text())
    assert tok_cfg["model_max_length"] == hf["max_position_embeddings"]


def test_autotokenizer_encodes_and_decodes_like_tiktoken(hf_tok):
    enc = get_encoding()
    assert len(hf_tok) == VOCAB_SIZE
    for text in TEXTS:
        want = enc.encode(text, allowed_special="all")
        assert hf_tok(text)["input_ids"] == want, text[:60]
        assert hf_tok.encode(text, add_special_tokens=True) == want  # nothing added around the text
        assert hf_tok.decode(want) == text
    assert hf_tok(TEXTS[:3])["input_ids"] == enc.encode_batch(TEXTS[:3], allowed_special="all")
    ids = encode(SAMPLE)  # ordinary text, '<|endoftext|>' strings as text: how the training data is encoded
    assert hf_tok.decode(ids) == SAMPLE


def test_every_special_token_id_matches_tiktoken(hf_tok, export_dir):
    enc = get_encoding()
    names = {i: name for name, i in enc._special_tokens.items() if name != "<|reserved_200018|>"}  # alias
    assert sorted(names) == list(range(199998, VOCAB_SIZE))  # 1,090 ids
    for i, name in names.items():
        assert hf_tok.convert_tokens_to_ids(name) == i, name
        assert hf_tok.convert_ids_to_tokens(i) == name
        assert hf_tok.decode([i]) == enc.decode([i]) == name
    assert enc.encode("<|reserved_200018|>", allowed_special="all") == [200018]  # the alias tiktoken keeps
    assert set(hf_tok.all_special_tokens) >= {"<|startoftext|>", "<|return|>", "<|endoftext|>"}
    hf = json.loads((export_dir / "config.json").read_text())
    gen = json.loads((export_dir / "generation_config.json").read_text())
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (
        hf["bos_token_id"], hf["eos_token_id"], hf["pad_token_id"]) == (199998, 200002, 199999)
    assert hf_tok.eos_token_id in gen["eos_token_id"] and hf_tok.pad_token_id == gen["pad_token_id"]


def test_chat_template_renders_like_render_chat(hf_tok):
    messages = [{"role": "system", "content": "You tell short stories."},
                {"role": "user", "content": "A story about a cat, please."},
                {"role": "assistant", "channel": "final", "content": "Once upon a time, a cat sat."}]
    ids = hf_tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert ids == render_chat(messages)
    prompt = hf_tok.apply_chat_template(messages[:2], tokenize=True, add_generation_prompt=True,
                                        return_dict=True)["input_ids"]
    assert prompt == render_chat(messages[:2]) + [START_ID, *encode("assistant")]
    assert ids[:2] == [START_ID, *encode("system")] and MESSAGE_ID in ids and ids[-1] == END_ID


def test_generate_and_pipeline_round_trip(model, export_dir, hf_tok):
    """Text -> AutoTokenizer -> GptOssForCausalLM.generate -> decode equals gptoss's tokenizer and sampler."""
    enc = get_encoding()
    prompt = "Once upon a time, a little girl named Lily"
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    inputs = hf_tok(prompt, return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == encode(prompt) and set(inputs) == {"input_ids", "attention_mask"}
    out = hf_model.generate(**inputs, max_new_tokens=12, do_sample=False)[0].tolist()
    n = len(encode(prompt))
    new = out[n:]
    assert new == generate(model, torch.tensor(encode(prompt)), 12, temperature=0)[:len(new)]
    assert len(new) == 12 or new[-1] in (199999, 200002)  # ran to the limit or stopped at an eos
    assert hf_tok.decode(out) == enc.decode(out)
    # The pipeline starts the story after <|endoftext|> (config.json's prefix), as training and sample.py do.
    after_eot = generate(model, torch.tensor([199999, *encode(prompt)]), 12, temperature=0)
    pipe = transformers.pipeline("text-generation", model=hf_model, tokenizer=hf_tok, device="cpu")
    text = pipe(prompt, max_new_tokens=12, do_sample=False)[0]["generated_text"]
    assert text == prompt + hf_tok.decode(after_eot, skip_special_tokens=True)
    assert text == prompt + enc.decode([i for i in after_eot if i < 199998])


def test_gpt2_baseline_gets_the_same_tokenizer_with_its_own_eos(export_dir, tmp_path):
    torch.manual_seed(0)
    out = save_model(build_model(get_config("gpt2-tiny")).eval(), tmp_path / "gpt2", dtype=torch.bfloat16)
    assert tokenizer_files(out) == set(TOKENIZER_FILES)
    assert (out / "tokenizer.json").read_bytes() == (export_dir / "tokenizer.json").read_bytes()
    special_map = json.loads((out / "special_tokens_map.json").read_text())
    assert special_map == {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    hf = json.loads((out / "config.json").read_text())
    assert (hf["bos_token_id"], hf["eos_token_id"], hf["pad_token_id"]) == (199998, 199999, 199999)
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == hf["n_positions"]


# ---- when the files are left out, and errors -------------------------------------------------------------

def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(get_config("tiny", vocab_size=512)).eval()


def test_small_vocab_export_has_no_tokenizer_files(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        out = save_model(small_model(), tmp_path / "small")
    assert {p.name for p in out.iterdir()} == OTHER_FILES
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("mode", ["yes", "maybe"])
def test_yes_on_a_small_vocab_or_an_unknown_mode_is_a_one_line_error(tmp_path, mode):
    with pytest.raises(TokenizerExportError) as err:
        save_model(small_model(), tmp_path / "small", tokenizer=mode)
    assert isinstance(err.value, UserError) and "\n" not in str(err.value)
    assert ("vocab_size is 512" in str(err.value) and "201088" in str(err.value)) if mode == "yes" else \
        "'maybe'" in str(err.value)
    assert not (tmp_path / "small").exists() and no_partial_dirs(tmp_path)


def test_no_leaves_the_tokenizer_out(model, tmp_path):
    out = save_model(model, tmp_path / "plain", tokenizer="no", dtype=torch.bfloat16)
    assert {p.name for p in out.iterdir()} == OTHER_FILES


def test_without_the_tokenizers_package(model, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # `import tokenizers` raises ModuleNotFoundError
    with pytest.raises(TokenizerExportError, match="needs the Hugging Face tokenizers package") as err:
        save_model(model, tmp_path / "yes", tokenizer="yes")
    assert "\n" not in str(err.value) and not (tmp_path / "yes").exists() and no_partial_dirs(tmp_path)
    with caplog.at_level(logging.WARNING):
        out = save_model(model, tmp_path / "auto", dtype=torch.bfloat16)
    assert {p.name for p in out.iterdir()} == OTHER_FILES
    (message,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "\n" not in message and str(out) in message and "tokenizers package is not installed" in message


def test_a_failing_tokenizer_build_leaves_nothing(model, tmp_path, monkeypatch):
    def broken():
        raise TokenizerExportError("the Hugging Face tokenizer built with tokenizers 0 disagrees with tiktoken")

    monkeypatch.setattr(hf_tokenizer, "build_tokenizer", broken)
    with pytest.raises(TokenizerExportError, match="disagrees"):
        save_model(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_tokenizer_that_disagrees_with_tiktoken_is_refused():
    real = hf_tokenizer.build_tokenizer()
    specials = hf_tokenizer.harmony_special_tokens()

    class Shifted:  # <|return|> one id off
        def __getattr__(self, name):
            return getattr(real, name)

        def token_to_id(self, token):
            return real.token_to_id(token) + (token == "<|return|>")

    class Reencoded(Shifted):  # right ids for the specials, wrong ones for text
        def token_to_id(self, token):
            return real.token_to_id(token)

        def encode(self, text, add_special_tokens=False):
            enc = real.encode(text, add_special_tokens=add_special_tokens)

            class Ids:
                ids = enc.ids[:3] + [enc.ids[3] + 1] + enc.ids[4:]

            return Ids

    with pytest.raises(TokenizerExportError, match=r"<\|return\|> has id 200003, expected 200002"):
        hf_tokenizer._verify(Shifted(), specials, "x")
    with pytest.raises(TokenizerExportError, match="probe text ids differ at position 3") as err:
        hf_tokenizer._verify(Reencoded(), specials, "x")
    assert "\n" not in str(err.value) and "--tokenizer no" in str(err.value)


# ---- launch/export.py --tokenizer ------------------------------------------------------------------------

def fake_checkpoint(model: torch.nn.Module, run: Path) -> Path:
    """A DeepSpeed-layout checkpoint tag of an in-memory model (ep 1): what launch/train.py would save."""
    tag = run / "checkpoints" / "step00000001"
    tag.mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text(tag.name)
    state = model.state_dict()
    module = {k: v for k, v in state.items() if not EXPERT_KEY.match(k)}
    torch.save({"module": module, "model_config": model.config.to_dict()}, tag / "mp_rank_00_model_states.pt")
    per_file: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    layers = sorted({int(EXPERT_KEY.match(k)[1]) for k in state if EXPERT_KEY.match(k)})
    for k, v in state.items():
        m = EXPERT_KEY.match(k)
        if m:
            per_file.setdefault((layers.index(int(m[1])), int(m[2])), {})[k] = v
    for (moe_layer, e), part in per_file.items():
        torch.save(part, tag / f"layer_{moe_layer}_expert_{e}_mp_rank_00_model_states.pt")
    write_train_state(tag, {"step": 1, "model_config": model.config.to_dict(), "world_size": 1, "ep_size": 1,
                            "train_batch_size": 1, "seq_len": 8, "story_aware": False, "parent": None,
                            MANIFEST: merge(tag, [])})
    return run


def export_cli():
    spec = importlib.util.spec_from_file_location("cli_export_tok", EXPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_cli_tokenizer_flag(model, tmp_path, capsys):
    main = export_cli()
    run = fake_checkpoint(model, tmp_path / "run")
    assert main([str(run), "--out", str(tmp_path / "auto"), "--quiet"]) == 0
    assert tokenizer_files(tmp_path / "auto") == set(TOKENIZER_FILES)
    assert main([str(run), "--out", str(tmp_path / "no"), "--quiet", "--tokenizer", "no", "--dtype", "bf16"]) == 0
    assert tokenizer_files(tmp_path / "no") == set()
    small = fake_checkpoint(small_model(), tmp_path / "small_run")
    capsys.readouterr()
    assert main([str(small), "--out", str(tmp_path / "small"), "--quiet", "--tokenizer", "yes"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("export.py: error: --tokenizer yes: the model's vocab_size is 512") and err.count("\n") == 1
    assert not (tmp_path / "small").exists() and no_partial_dirs(tmp_path)
    assert main([str(small), "--out", str(tmp_path / "small"), "--quiet"]) == 0  # auto: silently none
    assert tokenizer_files(tmp_path / "small") == set()
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--tokenizer {auto,yes,no}" in capsys.readouterr().out


@pytest.mark.parametrize("arch", ["gpt_oss", "gpt2"])
def test_pipeline_starts_a_story_after_endoftext_like_sample_py(model, export_dir, hf_tok, tmp_path, arch):
    """config.json's prefix: the pipeline conditions on <|endoftext|> + prompt, as training and sample.py do,
    so its greedy text equals launch/sample.py's (sample_text) on the same export."""
    from gptoss.generate import sample_text
    from gptoss.tokenizer import EOT_ID

    if arch == "gpt2":
        torch.manual_seed(0)
        export_dir = save_model(build_model(get_config("gpt2-tiny")).eval(), tmp_path / "gpt2")
    assert json.loads((export_dir / "config.json").read_text())["prefix"] == "<|endoftext|>"
    prompt = "Once upon a time, a little girl named Lily"
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    pipe = transformers.pipeline("text-generation", model=hf_model, tokenizer=hf_tok, device="cpu")
    text = pipe(prompt, max_new_tokens=12, do_sample=False)[0]["generated_text"]
    ours = sample_text(export_dir, prompt, max_new_tokens=12, temperature=0.0, device="cpu", dtype="fp32",
                       write=lambda s: None)
    assert text == ours[0]
    start = hf_model.generate(torch.tensor([[EOT_ID, *encode(prompt)]]), max_new_tokens=12, do_sample=False)
    assert text == prompt + hf_tok.decode(start[0, len(encode(prompt)) + 1:], skip_special_tokens=True)
