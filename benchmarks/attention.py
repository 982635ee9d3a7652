"""Attention benchmark: the MPT plugin's ``sdpa`` against transformers' eager MPT, on CPU.

Prints, measured side by side in one run (medians after warm-up, runs taking turns):

- prefill of a 1024-token prompt, eager time / sdpa time (target >= 2);
- decode throughput at batch 8, sdpa tokens/s / eager tokens/s (target >= 1);
- with ``--profile``, the share of decode time spent in ``aten::cat`` for each.

Run: ``python -m benchmarks.attention [--d-model 64 --n-layers 2 --threads 1 --profile]``.
The model is the small random MPT from ``templated_llm.devtools.tiny`` (no download).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable

import torch

from benchmarks.measure import cpu_time_shares, interleaved_seconds


def _load(snapshot, backend: str):
    from transformers import MptForCausalLM

    model = MptForCausalLM.from_pretrained(snapshot).eval()
    if backend != "eager":
        from templated_llm_mpt.attention import install_attention

        install_attention(model, backend)
    return model


def _medians(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    return {name: statistics.median(ts) for name, ts in interleaved_seconds(calls, repeats).items()}


def _cat_share(generate: Callable[[], object]) -> float:
    return cpu_time_shares(generate).get("aten::cat", 0.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=1024, help="prefill prompt tokens")
    parser.add_argument("--batch", type=int, default=8, help="decode batch size")
    parser.add_argument("--decode-prompt", type=int, default=128, help="decode prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    # One thread by default: steadier numbers on a shared machine; 0 keeps torch's default.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--profile", action="store_true", help="also print aten::cat's share")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from templated_llm.devtools.tiny import build_tiny_mpt

    with tempfile.TemporaryDirectory() as tmp:
        snapshot = build_tiny_mpt(tmp, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads)
        models = {backend: _load(snapshot, backend) for backend in ("eager", "sdpa")}
    vocab = models["eager"].config.vocab_size
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, vocab, (1, args.prompt), generator=generator)
    batch = torch.randint(1, vocab, (args.batch, args.decode_prompt), generator=generator)
    settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                    do_sample=False, use_cache=True, pad_token_id=0)

    def prefill(model):
        return lambda: model(prompt, use_cache=False, logits_to_keep=1)  # as generate does

    def decode(model):
        return lambda: model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), **settings)

    print(f"MPT d_model={args.d_model} n_layers={args.n_layers} n_heads={args.n_heads}, CPU, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    with torch.inference_mode():
        pre = _medians({b: prefill(m) for b, m in models.items()}, args.repeats)
        dec = _medians({b: decode(m) for b, m in models.items()}, args.repeats)
        tokens = args.batch * args.new_tokens
        print(f"prefill {args.prompt} tokens: eager {pre['eager'] * 1e3:.1f} ms, "
              f"sdpa {pre['sdpa'] * 1e3:.1f} ms; speed-up {pre['eager'] / pre['sdpa']:.2f}x (target >= 2)")
        print(f"decode batch {args.batch}, {args.decode_prompt}+{args.new_tokens} tokens: eager "
              f"{tokens / dec['eager']:.0f} tok/s, sdpa {tokens / dec['sdpa']:.0f} tok/s; "
              f"ratio {dec['eager'] / dec['sdpa']:.2f} (target >= 1)")
        if args.profile:
            for backend, model in models.items():
                print(f"decode, {backend}: aten::cat {_cat_share(decode(model)):.1%} of CPU time")


if __name__ == "__main__":
    main()
