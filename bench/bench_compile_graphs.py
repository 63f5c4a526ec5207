"""What `--compile` compiles, and what the FlexAttention story masks cost to build, on CPU.

    python bench/bench_compile_graphs.py                      # graphs, then mask build times (~5 min on 2 cores)
    python bench/bench_compile_graphs.py --only graphs        # runs on older checkouts too (PYTHONPATH=<checkout>)

graphs: each block compiled in place (`ModelOptions(compile=True)`, backend aot_eager: dynamo without code
generation) in a tiny-width GptOss of 2, 4 and 8 layers (sliding and full alternate), story-aware windows
(B=2, T=32): two training steps with different story layouts, one evaluation, one short evaluation batch
(B=1, T=16). FlexAttention has no CPU backward, so its steps run without gradients. "graphs" is dynamo's
unique_graphs counter (every frame, graph breaks included); "block variants" the cache entries of
`Block.forward`, each one compiled version of the block; torch stops compiling a frame at its recompile limit
(8 by default) and runs it eagerly from then on.

masks: the two story block masks of one forward (sliding W=128 and full) at nano's shape (B=4, T=1024,
stories of ~200 tokens), created eagerly or through torch.compile (inductor on CPU; the CUDA default), best
of 5 after a warm-up that includes the compilation; both in one process, alternated.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/ is not a package)
from bench_story_attention import story_ids  # noqa: E402

from gptoss.config import get_config  # noqa: E402
from gptoss.model import ModelOptions, build_model  # noqa: E402
from gptoss.model.gptoss import Block  # noqa: E402


def story_batch(seed: int, B: int, T: int) -> torch.Tensor:
    return story_ids(B, T + 1, mean_story=6, seed=seed, vocab=512)


def compile_counts(layers: int, attn: str) -> dict[str, int]:
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    options = ModelOptions(attention=attn, compile=True, compile_backend="aot_eager")
    model = build_model(get_config("tiny", vocab_size=512, num_hidden_layers=layers), options=options)
    torch._dynamo.reset()
    counters.clear()
    with torch.set_grad_enabled(attn != "flex"):
        for seed in (1, 2):
            x = story_batch(seed, 2, 32)
            out = model(x[:, :-1], targets=x[:, 1:], eot_id=0)
            if torch.is_grad_enabled():
                (out.loss + out.aux_loss).backward()
    model.eval()
    with torch.no_grad():
        for seed, B, T in ((3, 2, 32), (4, 1, 16)):
            x = story_batch(seed, B, T)
            model(x[:, :-1], targets=x[:, 1:], eot_id=0)
    return {"graphs": counters["stats"]["unique_graphs"],
            "block variants": len(_debug_get_cache_entry_list(Block.forward.__code__))}


def graphs_table() -> None:
    rows = []
    for attn in ("flex", "cpu"):
        for layers in (2, 4, 8):
            c = compile_counts(layers, attn)
            rows.append([attn, layers, c["graphs"], c["block variants"]])
            print(f"{attn} {layers} layers: {c}", flush=True)
    print(common.markdown_table(["attention", "layers", "graphs", "block variants"], rows))


def masks_table(B: int = 4, T: int = 1024, window: int = 128) -> None:
    from gptoss.model import Segments
    from gptoss.model.kernels.attention import _flex_mask

    doc_ids = Segments.from_tokens(story_ids(B, T, mean_story=200, seed=0), 0).doc_ids

    def build(compiled: bool) -> None:
        for w in (window, None):
            _flex_mask(w, T, doc_ids.device, doc_ids, compiled=compiled)

    times: dict[bool, list[float]] = {False: [], True: []}
    for compiled in times:
        build(compiled)  # warm-up (and compilation)
    for _ in range(5):
        for compiled in times:
            start = time.perf_counter()
            build(compiled)
            times[compiled].append(time.perf_counter() - start)
    base = min(times[False])
    rows = [["eager" if not c else "torch.compile", f"{min(t) * 1e3:,.1f}", f"{base / min(t):.1f}x"]
            for c, t in times.items()]
    print(common.markdown_table(["creation", "both masks, ms (best of 5)", "speed"], rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["graphs", "masks"])
    args = ap.parse_args()
    print(common.machine_line(common.machine_info()), flush=True)
    if args.only != "masks":
        graphs_table()
    if args.only != "graphs":
        masks_table()


if __name__ == "__main__":
    main()
