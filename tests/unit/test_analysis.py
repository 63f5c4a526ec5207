"""Analysis: each command writes its files from a tiny model or a synthetic run, and the numbers it reports
are the ones gptoss.config computes (no second copy of the arithmetic)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gptoss.analysis import AnalysisError
from gptoss.analysis.attention import attention_figure, attention_maps
from gptoss.analysis.compare import compare, summarize, train_command
from gptoss.analysis.experts import (
    expert_counts_from_model,
    expert_usage_from_model,
    expert_usage_from_run,
    token_batches,
)
from gptoss.analysis.report import architecture_numbers, report_markdown, resolve_config, write_report
from gptoss.analysis.runs import load_run
from gptoss.config import flops_per_token, get_config, kv_cache_bytes_per_token, param_counts
from gptoss.hf import hf_config
from gptoss.model import build_model

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(get_config("tiny", vocab_size=512))
    with torch.no_grad():  # non-zero sinks, so the sink column matters
        for block in model.layers:
            block.self_attn.sinks.normal_(0, 1.0)
    return model.eval()


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000, f"{path}: not a drawn PNG"


def launch_main(name: str):  # noqa: ANN201 (the script's main function)
    spec = importlib.util.spec_from_file_location(f"launch_{name}", REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def write_run(run_dir: Path, cfg_name: str, records: list[dict]) -> Path:
    run_dir.mkdir(parents=True)
    get_config(cfg_name, vocab_size=512).save(run_dir / "model_config.json")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def synthetic_records(steps: int = 12, layers: int = 2, experts: int = 4, loss0: float = 6.0,
                      tps: float = 1000.0, with_load: bool = True) -> list[dict]:
    """What gptoss.train logs: a record per step, val_loss every 4 steps; expert 0 grows overloaded."""
    records = []
    for step in range(1, steps + 1):
        r = {"step": step, "tokens": 512 * step, "loss": loss0 / (1 + 0.1 * step), "tokens_per_s": tps,
             "elapsed_s": 512 * step / tps}
        if with_load:
            hot = 0.25 + 0.3 * step / steps
            r["expert_load"] = [[hot] + [(1 - hot) / (experts - 1)] * (experts - 1) for _ in range(layers)]
        if step % 4 == 0:
            r["val_loss"] = loss0 / (1 + 0.08 * step)
            r["val_bpb"] = r["val_loss"] / 4.0  # as if 4 bytes a token
        records.append(r)
    return records


# ---- report ------------------------------------------------------------------------------------------

def md_table(md: str) -> dict[str, dict[str, str]]:
    """The first markdown table of md as {row label: {column name: cell}}."""
    lines = [line for line in md.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    names = cells[0][1:]
    return {row[0]: dict(zip(names, row[1:], strict=True)) for row in cells[2:]}


UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "G": 1e9}


def assert_cell_shows(cell: str, value: float) -> None:
    """A cell like '1,234.56 MiB' or '0.812 G' shows `value` to its last printed digit, in the largest unit
    that keeps the number >= 1 (so a value in the wrong row, column or unit fails)."""
    number, unit = cell.split()
    decimals = len(number.partition(".")[2])
    scale = UNITS[unit]
    assert abs(float(number.replace(",", "")) * scale - value) <= (0.5 * 10**-decimals + 1e-9) * scale, (cell, value)
    if unit in ("KiB", "MiB", "GiB"):
        assert value >= scale, (cell, value)
    if unit in ("B", "KiB", "MiB"):
        assert value < 1024 * scale, (cell, value)


KV_LABELS = {"mha": "MHA (every head keeps K, V)", "gqa": "GQA", "gqa_sliding": "GQA + sliding window"}


def test_report_md_rows_show_flops_and_kv_cache_of_config(tmp_path):
    """report.md, read back cell by cell, shows flops_per_token and kv_cache_bytes_per_token of each model at
    the requested context (catches a value in the wrong row / column / unit, or the context not passed on)."""
    names, ctx = ["nano", "gpt-oss-20b", "gpt-oss-120b"], 8192
    table = md_table(write_report(names, tmp_path, context=ctx)["md"].read_text())
    assert set(next(iter(table.values()))) == set(names)
    for name in names:
        cfg = get_config(name)
        train, infer = flops_per_token(cfg, ctx, training=True), flops_per_token(cfg, ctx, training=False)
        assert_cell_shows(table["FLOPs per token, training (fwd + bwd)"][name], train)
        assert_cell_shows(table["FLOPs per token, inference (fwd)"][name], infer)
        kv = kv_cache_bytes_per_token(cfg, ctx, 2)
        for key, label in KV_LABELS.items():
            assert_cell_shows(table[f"KV cache per token, {label}"][name], kv[key])
            assert_cell_shows(table[f"KV cache for {ctx:,} tokens, {label}"][name], kv[key] * ctx)
        # the context reaches the numbers: at 4096 the attention FLOPs (and the sliding share) differ
        assert table["FLOPs per token, training (fwd + bwd)"][name] != f"{flops_per_token(cfg, 4096) / 1e9:,.3f} G"
    kv20 = kv_cache_bytes_per_token(get_config("gpt-oss-20b"), ctx, 2)
    assert kv20["gqa"] == 24 * 2 * 8 * 64 * 2  # layers x (K, V) x kv heads x head dim x bf16 bytes
    assert table["KV cache per token, GQA"]["gpt-oss-20b"] == "48.00 KiB"


def test_write_report_files_hold_the_config_numbers(tmp_path):
    paths = write_report(["nano", "gpt-oss-20b"], tmp_path, context=8192)
    assert_png(paths["png"])
    md = paths["md"].read_text()
    saved = json.loads(paths["json"].read_text())
    for name in ("nano", "gpt-oss-20b"):
        p = param_counts(get_config(name))
        assert f"({p['total']:,})" in md and f"({p['active']:,})" in md
        assert saved[name]["params"] == p
        assert saved[name]["flops_per_token_train"] == flops_per_token(get_config(name), 8192)
    assert "20.915B" in md and "3.608B" in md  # OpenAI's quoted total / active (excl. unembedding)


def test_report_reads_presets_config_files_and_dirs(tmp_path):
    cfg = get_config("nano", vocab_size=1000)
    cfg.save(tmp_path / "mine.json")
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "config.json").write_text(json.dumps(hf_config(cfg)))
    (tmp_path / "run").mkdir()
    cfg.save(tmp_path / "run" / "model_config.json")
    assert resolve_config("gpt-oss-20b") == get_config("gpt-oss-20b")
    assert resolve_config(str(tmp_path / "mine.json")) == cfg
    assert resolve_config(str(tmp_path / "run")) == cfg
    assert param_counts(resolve_config(str(tmp_path / "export"))) == param_counts(cfg)
    with pytest.raises(AnalysisError, match="not a preset"):
        resolve_config(str(tmp_path / "missing.json"))


def test_report_markdown_has_one_column_per_model():
    md = report_markdown({n: architecture_numbers(get_config(n), 1024) for n in ("tiny", "nano")})
    assert md.splitlines()[0] == "| | tiny | nano |"
    assert "KV cache per token, GQA + sliding window" in md


# ---- runs and comparison -----------------------------------------------------------------------------

def test_runs_without_elapsed_s_are_refused(tmp_path):
    records = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in synthetic_records()]
    with pytest.raises(AnalysisError, match="elapsed_s"):
        load_run(write_run(tmp_path / "r", "tiny", records))


def test_compare_existing_runs(tmp_path):
    a = write_run(tmp_path / "tiny", "tiny", synthetic_records(tps=2000.0))
    b = write_run(tmp_path / "gpt2-tiny", "gpt2-tiny", synthetic_records(loss0=6.5, with_load=False))
    paths = compare(tmp_path / "out", runs=[a, b])
    assert_png(paths["png"])
    md = paths["md"].read_text()
    rows = {r["run"]: r for r in summarize([load_run(a), load_run(b)])}
    assert rows["tiny"]["params_total"] == param_counts(get_config("tiny", vocab_size=512))["total"]
    assert rows["gpt2-tiny"]["arch"] == "gpt2"
    assert rows["tiny"]["final_val_loss"] == pytest.approx(6.0 / (1 + 0.08 * 12))
    assert rows["tiny"]["tokens_per_s"] == pytest.approx(2000.0)
    assert rows["tiny"]["train_seconds"] == pytest.approx(12 * 512 / 2000.0)
    assert f"{rows['tiny']['final_val_loss']:.4f}" in md and "| gpt2-tiny | gpt2 |" in md
    assert rows["tiny"]["final_val_bpb"] == pytest.approx(rows["tiny"]["final_val_loss"] / 4.0)
    assert rows["tiny"]["best_val_bpb"] == pytest.approx(min(r["val_bpb"] for r in load_run(a).records
                                                             if "val_bpb" in r))
    assert md_table(md)["tiny"]["final val bpb"] == f"{rows['tiny']['final_val_bpb']:.4f}"


def test_compare_needs_validation_loss(tmp_path):
    records = [{k: v for k, v in r.items() if k != "val_loss"} for r in synthetic_records()]
    run = write_run(tmp_path / "r", "tiny", records)
    with pytest.raises(AnalysisError, match="validation"):
        compare(tmp_path / "out", runs=[run])


def test_train_command_gives_every_model_the_same_flags(tmp_path):
    kw = dict(ds_config="ds_configs/cpu.json", seq_len=64, eval_every=5, log_every=1, max_steps=10)
    a = train_command("tiny", "data", tmp_path / "a", **kw)
    b = train_command("gpt2-tiny", "data", tmp_path / "b", **kw)
    differ = {i for i, (x, y) in enumerate(zip(a, b)) if x != y}
    assert len(a) == len(b) and {a[i - 1] for i in differ} == {"--model", "--out"}
    with pytest.raises(AnalysisError):
        train_command("tiny", "data", tmp_path, ds_config="x", seq_len=64, eval_every=5, log_every=1)


def test_compare_cli_user_errors_are_one_line(tmp_path, capsys):
    main = launch_main("compare")
    assert main(["--runs", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert main(["--models", "tiny,gpt2-tiny", "--out", str(tmp_path / "o"), "--data", "d"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("compare.py: error:") for line in err)
    assert "--max_steps or --tokens" in err[1] and not (tmp_path / "o").exists()  # refused before any run dir


# ---- experts -----------------------------------------------------------------------------------------

def test_expert_usage_from_run_metrics(tmp_path):
    run = write_run(tmp_path / "run", "tiny", synthetic_records(steps=12, layers=2, experts=4))
    paths = expert_usage_from_run(run, tmp_path / "out")
    assert_png(paths["png"])
    md = paths["md"].read_text()
    assert "| 0 | 1.10 | 2.20 |" in md  # max share x E at the first (0.275) and last (0.55) logged step


def test_expert_usage_needs_expert_load(tmp_path):
    run = write_run(tmp_path / "run", "gpt2-tiny", synthetic_records(with_load=False))
    with pytest.raises(AnalysisError, match="expert_load"):
        expert_usage_from_run(run, tmp_path / "out")


def test_expert_counts_from_model_sum_the_forward_counts(tmp_path):
    model = tiny_model()
    ids = torch.randint(0, 512, (3 * 32,), generator=torch.Generator().manual_seed(0))
    batches = token_batches(ids, seq_len=32, max_batches=3)
    counts = expert_counts_from_model(model, batches)
    cfg = model.config
    assert counts.shape == (cfg.num_hidden_layers, cfg.num_local_experts)
    assert torch.all(counts.sum(-1) == 96 * cfg.num_experts_per_tok)  # every token picks k experts per layer
    with torch.no_grad():
        direct = sum(model(b).expert_counts.double() for b in batches)
    assert torch.equal(counts, direct)
    paths = expert_usage_from_model(model, batches, tmp_path, name="tiny")
    assert_png(paths["png"])


# ---- attention ---------------------------------------------------------------------------------------

def test_attention_maps_reproduce_the_layer_output():
    """probs @ V through o_proj equals what the layer computed in the model's own forward pass."""
    model = tiny_model(1)
    cfg = model.config
    ids = torch.randint(0, 512, (1, 3 * cfg.sliding_window), generator=torch.Generator().manual_seed(1))
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [model.layers[i].self_attn.register_forward_hook(
        lambda mod, args, out, i=i: seen.__setitem__(i, (args[0], out))) for i in range(cfg.num_hidden_layers)]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    maps = attention_maps(model, ids, layers=list(range(cfg.num_hidden_layers)))
    for m in maps:
        attn = model.layers[m.layer].self_attn
        x, out = seen[m.layer]
        T = x.shape[1]
        with torch.no_grad():
            v = attn.v_proj(x).view(1, T, attn.n_kv, attn.head_dim).transpose(1, 2)
            v = v.repeat_interleave(attn.n_heads // attn.n_kv, dim=1)[0]  # (heads, T, d)
            mixed = torch.matmul(m.probs, v).transpose(0, 1).reshape(1, T, -1)
            assert (attn.o_proj(mixed) - out).abs().max().item() < 1e-5
        rows = m.probs.sum(-1) + m.sink
        assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)
        assert torch.all(m.probs.triu(1) == 0)  # causal
        if m.kind == "sliding_attention":
            assert torch.all(m.probs.tril(-cfg.sliding_window) == 0)  # W keys including itself
            assert m.probs[:, -1, -cfg.sliding_window].min() > 0
    assert [m.kind for m in maps] == cfg.layer_types


def test_attention_figure_and_sink_table(tmp_path):
    model = tiny_model(2)
    ids = torch.randint(0, 512, (1, 20))
    paths = attention_figure(model, ids, tmp_path, tokens=[f"t{i}" for i in range(20)])
    assert_png(paths["png"])
    md = paths["md"].read_text()
    maps = attention_maps(model, ids)
    assert [m.layer for m in maps] == [0, 1]  # by default the first sliding and the first full layer
    assert f"{maps[0].sink_mass_per_head[0].item():.3f}" in md
    with pytest.raises(AnalysisError, match="layers"):
        attention_maps(model, ids, layers=[5])


# ---- command line ------------------------------------------------------------------------------------

def test_analyze_cli_report_and_user_error(tmp_path, capsys):
    main = launch_main("analyze")
    assert main(["report", "--model", "gpt-oss-120b", "--out", str(tmp_path), "--context", "131072"]) == 0
    assert_png(tmp_path / "report.png")
    assert f"{param_counts(get_config('gpt-oss-120b'))['total']:,}" in capsys.readouterr().out
    assert main(["report", "--model", "no-such-model", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("analyze.py: error:")


def test_analyze_cli_on_an_export_and_a_run(tmp_path, capsys):
    from gptoss.export import save_model

    export = save_model(tiny_model(3), tmp_path / "export")
    main = launch_main("analyze")
    ids = ",".join(map(str, range(1, 40)))
    assert main(["attention", "--model", str(export), "--token_ids", ids, "--out", str(tmp_path / "att")]) == 0
    assert_png(tmp_path / "att" / "attention.png")
    assert main(["expert-usage", "--model", str(export), "--token_ids", ids, "--seq_len", "16",
                 "--out", str(tmp_path / "em")]) == 0
    counts = json.loads((tmp_path / "em" / "expert_usage_model.json").read_text())
    assert counts["tokens"] == 32 and all(sum(layer) == 32 * 2 for layer in counts["counts"])  # 2 windows of 16
    # the o200k tokenizer's ids do not fit a 512-token test vocabulary: a one-line user error
    assert main(["expert-usage", "--model", str(export), "--out", str(tmp_path / "e")]) == 2
    assert "vocabulary" in capsys.readouterr().err
    run = write_run(tmp_path / "run", "tiny", synthetic_records())
    assert main(["expert-usage", "--run", str(run), "--out", str(tmp_path / "e")]) == 0
    assert_png(tmp_path / "e" / "expert_usage_training.png")


@pytest.mark.parametrize("argv,needle", [
    (["attention", "--token_ids", "1,512,3"], "--token_ids: id 512 is outside the model's vocabulary [0, 512)"),
    (["attention", "--token_ids", "1,-2"], "id -2 is outside"),
    (["attention", "--token_ids", "1,x"], "--token_ids '1,x': expected comma-separated integers"),
    (["attention", "--token_ids", "1,2", "--layers", "7"], "layers [7]"),
    (["expert-usage", "--token_ids", "600"], "id 600 is outside"),
    (["expert-usage", "--token_ids", ","], "expected comma-separated integers"),
])
def test_analyze_cli_token_id_errors_are_one_line(tmp_path, capsys, argv, needle):
    from gptoss.export import save_model

    export = save_model(tiny_model(4), tmp_path / "export")
    cmd = [argv[0], "--model", str(export), *argv[1:], "--out", str(tmp_path / "o")]
    assert launch_main("analyze")(cmd) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("analyze.py: error:") and needle in err[0], err


def test_analyze_cli_input_flags_exclude_each_other(tmp_path, capsys):
    main = launch_main("analyze")
    for argv in (["attention", "--model", "m", "--prompt", "hi", "--token_ids", "1"],
                 ["expert-usage", "--model", "m", "--text", "t.txt", "--token_ids", "1"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    run = write_run(tmp_path / "run", "tiny", synthetic_records())
    assert main(["expert-usage", "--run", str(run), "--token_ids", "1", "--out", str(tmp_path)]) == 2
    assert "go with --model" in capsys.readouterr().err


def test_launch_scripts_run_as_scripts(tmp_path):
    """The real entry points (fresh interpreter, repo root as cwd): help, and a report end to end."""
    out = subprocess.run([sys.executable, "launch/analyze.py", "report", "--model", "nano", "--out", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "report.md").is_file()
    helped = subprocess.run([sys.executable, "launch/compare.py", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert helped.returncode == 0 and "--runs" in helped.stdout


def test_compare_trains_both_models_with_the_trainer(tmp_path, tiny_data):
    """End to end with launch/train.py (512-token vocabulary, ~10 s): same flags, both runs evaluated, plot and
    table written."""
    gpt2 = tmp_path / "gpt2.json"
    get_config("gpt2-tiny", vocab_size=512).save(gpt2)
    paths = compare(tmp_path / "cmp", models=[str(tiny_data / "model.json"), str(gpt2)], data=tiny_data,
                    ds_config=str(REPO / "ds_configs" / "cpu.json"), max_steps=6, seq_len=32, eval_every=3,
                    log_every=1, log=lambda _: None)
    assert_png(paths["png"])
    runs = [load_run(tmp_path / "cmp" / name) for name in ("model", "gpt2")]
    assert runs[0].records[-1]["tokens"] == runs[1].records[-1]["tokens"]  # same budget
    assert all(len(r.curve("val_loss")[0]) == 2 for r in runs)
    assert np.isfinite([r.curve("val_loss")[2][-1] for r in runs]).all()
    first_log = (tmp_path / "cmp" / "model" / "train.log").read_text()
    with pytest.raises(AnalysisError, match="training model failed .* already holds checkpoints"):
        compare(tmp_path / "cmp", models=[str(tiny_data / "model.json")], data=tiny_data,
                ds_config=str(REPO / "ds_configs" / "cpu.json"), max_steps=6, seq_len=32, eval_every=3,
                log_every=1, log=lambda _: None)
    again = (tmp_path / "cmp" / "model" / "train.log").read_text()
    assert again.startswith(first_log) and "already holds checkpoints" in again[len(first_log):]  # nothing lost


def test_analyze_commands_on_a_trained_run(tmp_path, tiny_data):
    """The real trainer (4 steps of tiny on tiny_data), then every analyze command through the launch script
    in a fresh interpreter, on the run dir itself (its DeepSpeed checkpoint and metrics, no export)."""
    from conftest import TINY_VOCAB, TRAIN, launch, read_metrics, train_flags

    from gptoss.analysis.loading import load_model

    run = tmp_path / "run"
    trained = launch(TRAIN, *train_flags(tiny_data, run, steps=4))
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-3000:]
    ids = [1]
    while len(ids) < 64:  # the data's own rule, t -> 5t + 3
        ids.append((5 * ids[-1] + 3) % TINY_VOCAB)
    token_ids = ",".join(map(str, ids))
    cfg = get_config("tiny", vocab_size=TINY_VOCAB)

    def analyze(*args: str) -> Path:
        out = tmp_path / args[0]
        proc = launch(REPO / "launch" / "analyze.py", *args, "--out", str(out), timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return out

    out = analyze("report", "--model", str(run), "--context", "256")
    assert_png(out / "report.png")
    column = md_table((out / "report.md").read_text())
    assert column["parameters, total"]["run"].endswith(f"({param_counts(cfg)['total']:,})")
    assert_cell_shows(column["FLOPs per token, training (fwd + bwd)"]["run"], flops_per_token(cfg, 256))
    assert_cell_shows(column["KV cache per token, GQA + sliding window"]["run"],
                      kv_cache_bytes_per_token(cfg, 256)["gqa_sliding"])
    assert json.loads((out / "report.json").read_text())["run"]["params"] == param_counts(cfg)

    out = analyze("expert-usage", "--run", str(run))
    assert_png(out / "expert_usage_training.png")
    logged = json.loads((out / "expert_usage_training.json").read_text())
    metrics = read_metrics(run)
    assert logged["steps"] == [1, 2, 3, 4]
    assert logged["expert_load"] == [metrics[s]["expert_load"] for s in (1, 2, 3, 4)]
    assert np.allclose(np.sum(logged["expert_load"], -1), 1.0)
    assert (out / "expert_usage_training.md").read_text().count("\n| ") == cfg.num_hidden_layers

    out = analyze("expert-usage", "--model", str(run), "--token_ids", token_ids, "--seq_len", "32")
    assert_png(out / "expert_usage_model.png")
    used = json.loads((out / "expert_usage_model.json").read_text())
    counts = np.array(used["counts"])
    assert used["tokens"] == 64 and counts.shape == (cfg.num_hidden_layers, cfg.num_local_experts)
    assert (counts.sum(-1) == 64 * cfg.num_experts_per_tok).all()  # every token, k experts, every layer
    assert "64 tokens" in (out / "expert_usage_model.md").read_text()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CLI ran (OMP_NUM_THREADS=1): the same sums, the same routing
    try:  # the CLI ran the trained weights: the same counts in this process
        direct = expert_counts_from_model(load_model(run), token_batches(ids, 32, 8))
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(direct.numpy(), counts)

    out = analyze("attention", "--model", str(run), "--token_ids", token_ids)
    assert_png(out / "attention.png")
    maps = json.loads((out / "attention.json").read_text())
    assert maps["token_ids"] == ids
    assert [m["kind"] for m in maps["layers"]] == ["sliding_attention", "full_attention"]
    for m in maps["layers"]:
        assert len(m["sink_mass_per_head"]) == cfg.num_attention_heads
        assert all(0.0 <= v <= 1.0 for v in m["sink_mass_per_head"])
    assert "(64 tokens)" in (out / "attention.md").read_text()
