"""kvcompress and NVIDIA kvpress 0.5.5 on identical token ids (issue 24): the eviction_policies protocol, a prompt
compressed once at prefill, the next tokens scored one by one; ppl = exp(mean NLL of the continuation, the first
token predicted by the prefill itself), as ``eval=prefill_decode`` computes it.

    python scripts/kvpress_side_by_side.py ids OUT.json --context 1024 --continuation 32 --samples 1 --tokenizer DIR
        (kvcompress's venv) the pieces of Hamlet exactly as ``kvc eval=prefill_decode`` cuts them, as token ids
    python scripts/kvpress_side_by_side.py kvpress IDS.json GGUF RECORDS.jsonl --ratios 0.5 0.75 --tokenizer DIR
        (kvpress's venv: scripts/kvpress_side_by_side.sh makes it) the same ids through transformers' GGUF loader
        under each press; one JSON line per (press, kept fraction)
    python scripts/kvpress_side_by_side.py kvzip-scores IDS.json OUT.pt --gguf GGUF --tokenizer DIR   (kvpress's venv)
    python scripts/kvpress_side_by_side.py kvzip-scores IDS.json - --against OUT.pt                  (ours: compare)
        KVzip's (layer, KV head, token) scores on both sides: the max |difference| as one JSON line

Run the whole thing with ``bash scripts/kvpress_side_by_side.sh`` (never in setup or CI: it installs kvpress and
transformers 5.2 into their own virtual environment under the cache folder).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

# kvpress's presses run here; results/kvpress/table.yaml pairs each with the kvcompress run of the same algorithm
# (scripts/kvpress_side_by_side.sh: its settings)
PRESSES = ("StreamingLLMPress", "SnapKVPress", "TOVAPress", "KnormPress", "ExpectedAttentionPress", "KeyDiffPress",
           "RandomPress", "PyramidKVPress", "KVzipPress", "KVComposePress", "AdaKVPress(ExpectedAttentionPress)",
           "ChunkKVPress(SnapKVPress)", "CriticalKVPress(SnapKVPress)", "KVzipPress(header unscored=0)")


def dump_ids(out: Path, context: int, continuation: int, samples: int, tokenizer_dir: Path) -> None:
    from kvcompress.engine.loaders import load_tokenizer, resolve_source
    from kvcompress.eval.data import load_text
    from kvcompress.eval.ppl import text_windows

    tokenizer = load_tokenizer(resolve_source("smollm2-135m"))
    text = load_text("hamlet", Path(__file__).resolve().parents[2] / "shared" / "data")
    pieces = text_windows(tokenizer, text, context + continuation, samples, "auto")
    out.write_text(json.dumps({"context": context, "pieces": pieces.tolist()}))
    tokenizer.save_pretrained(tokenizer_dir)  # for KVzipPress's repeat prompt (transformers' own GGUF tokenizer
    # saves as a CodeLlamaTokenizer that reloads broken: "\n" and spaces become <unk>)


def make_press(name: str, ratio: float):
    import kvpress

    if name == WHOLE:
        return whole_context_kvzip(ratio)
    if "(" in name:
        outer, inner = name.rstrip(")").split("(")
        return getattr(kvpress, outer)(press=getattr(kvpress, inner)(compression_ratio=ratio))
    return getattr(kvpress, name)(compression_ratio=ratio)


# KVzipPress as it is, but scoring every context token: kvpress takes a context to start with the chat template's
# system and user header (24 tokens for SmolLM2) and leaves that header unscored (all but its 4 sinks are evicted
# first); the prompts here are raw text, so this variant shows what that header rule alone changes
WHOLE = "KVzipPress(header unscored=0)"
NAMES = ["none", *PRESSES]


def whole_context_kvzip(ratio: float):
    from kvpress import KVzipPress

    class WholeContext(KVzipPress):
        def prepare(self, model, tokenizer, prev_postfix_size=8):
            self.prefix_length = 0  # read by prepare and, after it, as the first replayed chunk's start
            return super().prepare(model, tokenizer, prev_postfix_size)

    return WholeContext(compression_ratio=ratio)


def run_kvpress(ids: Path, gguf: Path, out: Path, ratios: list[float], tokenizer_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    data = json.loads(ids.read_text())
    context, pieces = data["context"], torch.tensor(data["pieces"])
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    model.config.name_or_path = str(tokenizer_dir)  # KVzipPress loads its tokenizer (repeat prompt) from here
    with out.open("a") as f:
        for name in NAMES:
            for ratio in ([0.0] if name == "none" else ratios):
                nll = 0.0
                torch.manual_seed(0)  # RandomPress draws from the global generator (its seed=None)
                for piece in pieces:
                    for layer in model.model.layers:  # a masking press's indices outlive it (KVzip -> KVCompose)
                        layer.self_attn.masked_key_indices = None
                    cache = DynamicCache()
                    with torch.inference_mode():
                        if name == "none":
                            logits = model(piece[None, :context], past_key_values=cache).logits
                        else:
                            with make_press(name, ratio)(model):
                                logits = model(piece[None, :context], past_key_values=cache).logits
                        nll += float(torch.nn.functional.cross_entropy(logits[0, -1:], piece[context:context + 1]))
                        for t in range(context, len(piece) - 1):  # one decode step per continuation token
                            # at its own position, as kvpress's pipeline does (a pruned cache is shorter than t)
                            step = model(piece[None, t:t + 1], past_key_values=cache,
                                         position_ids=torch.tensor([[t]])).logits
                            nll += float(torch.nn.functional.cross_entropy(step[0, -1:], piece[t + 1:t + 2]))
                n = pieces.shape[0] * (pieces.shape[1] - context)
                f.write(json.dumps({"side": "kvpress", "press": name, "kept": 1 - ratio, "ppl": math.exp(nll / n),
                                    "n_tokens": n}) + "\n")
                f.flush()


def kvzip_scores(ids: Path, out: Path, tokens: int, gguf: Path | None = None, tokenizer_dir: Path | None = None,
                 against: Path | None = None) -> None:
    """KVzip's (layer, KV head, token) scores of the first piece's first ``tokens`` ids: kvpress's (the whole-context
    variant; ``gguf``, in kvpress's venv) saved to ``out``, or ours (in kvcompress's venv) compared with ``against``."""
    import torch

    ids_ = torch.tensor(json.loads(ids.read_text())["pieces"][0][:tokens])[None]
    if gguf is not None:
        from transformers import AutoModelForCausalLM, DynamicCache

        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        model.eval().config.name_or_path = str(tokenizer_dir)
        press, saved = whole_context_kvzip(0.5), {}
        compress = press.compress_post
        press.compress_post = lambda m: (saved.setdefault("s", press.score_val[:, 0].clone()), compress(m))
        with torch.inference_mode(), press(model):
            model(ids_, past_key_values=DynamicCache())
        torch.save(saved["s"].float(), out)
        return
    from types import SimpleNamespace

    from kvcompress.cache import ComposedCache
    from kvcompress.cache.storage.dense import DenseStore
    from kvcompress.engine.loaders import load, resolve_source
    from kvcompress.engine.session import Session
    from kvcompress.testing.contract import make

    model, tokenizer = load(resolve_source("smollm2-135m"), "smollm2-135m")
    policy = make("kvzip", "policy", budget=0.5)
    cache = ComposedCache(DenseStore(), policy)
    cache.setup(model.config.spec())
    policy.calibrate(SimpleNamespace(tokenizer=tokenizer))
    Session(model, cache).start(1).prefill(ids_, tokens)  # the replay ran; the first step would evict
    ours = torch.stack([policy.state[o][0, :, :tokens] for o in sorted(policy.state)])
    theirs = torch.load(against)
    diff = (ours - theirs).abs().max().item()  # kvpress's saved before its sinks are lifted: every token compares
    print(json.dumps({"tokens": tokens, "layers_heads_tokens": list(ours.shape), "max_abs_difference": diff}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ids")
    p.add_argument("out", type=Path)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--continuation", type=int, default=128)
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--tokenizer", type=Path, required=True, help="folder to save the tokenizer in")
    p = sub.add_parser("kvpress")
    p.add_argument("ids", type=Path)
    p.add_argument("gguf", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75])
    p.add_argument("--tokenizer", type=Path, required=True, help="the folder the ids step saved the tokenizer in")
    p = sub.add_parser("kvzip-scores")
    p.add_argument("ids", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--gguf", type=Path, help="kvpress's side: the model file (else ours, compared with --against)")
    p.add_argument("--tokenizer", type=Path)
    p.add_argument("--against", type=Path)
    args = parser.parse_args()
    if args.command == "ids":
        dump_ids(args.out, args.context, args.continuation, args.samples, args.tokenizer)
    elif args.command == "kvzip-scores":
        kvzip_scores(args.ids, args.out, args.tokens, args.gguf, args.tokenizer, args.against)
    else:
        run_kvpress(args.ids, args.gguf, args.out, args.ratios, args.tokenizer)


if __name__ == "__main__":
    main()
