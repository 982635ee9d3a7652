"""Builds a small, randomly initialised MPT snapshot for tests, demos and benchmarks.

Real MPT-instruct weights are many gigabytes; this writes a model of the same architecture and
file layout (config, safetensors weights, GPT-NeoX-style byte-level BPE tokenizer with
``<|endoftext|>`` and no pad token, ``use_cache: false`` as MPT ships it) in a second, and the
same bytes for the same seed.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

END_OF_TEXT = "<|endoftext|>"

_WORDS = (
    "the a an of to and in is was for on with as by at from that this it be are or which "
    "model models language machine learning data train training text token tokens prompt "
    "response instruction answer question write explain describe list name three rivers "
    "mountains cities water river sea ocean light sound time year day people world small large "
    "fast slow good new first last long short high low number numbers word words sentence "
    "attention layer layers weight weights network networks vector matrix function value "
    "serve serving request batch cache memory speed python code library plugin template"
).split()


def _corpus(seed: int, lines: int) -> list[str]:
    rng = random.Random(seed)
    corpus = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        sentence = " ".join(words).capitalize() + rng.choice(".?!:")
        corpus.append(f"### Instruction:\n{sentence}\n### Response:\n{sentence[::-1]} {rng.randint(0, 999)}")
    return corpus


def _train_tokenizer(seed: int, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(seed, 2000), trainer)
    # Like GPT-NeoX's tokenizer (MPT's): end-of-text is bos, eos and unk; there is no pad token.
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, unk_token=END_OF_TEXT
    )


def build_tiny_mpt(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    d_model: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    vocab_size: int = 1024,
    max_seq_len: int = 2048,
) -> Path:
    """Write a random MPT snapshot to ``path`` (created if needed) and return the path.

    The defaults give a ~0.2M-parameter model for second-long tests; raise ``d_model`` and
    ``n_layers`` for benchmarks (``d_model=512, n_layers=8`` is about 25M parameters).
    """
    import torch
    from transformers import MptConfig, MptForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(seed, vocab_size)
    config = MptConfig(
        d_model=d_model,
        n_heads=n_heads,
        n_layers=n_layers,
        max_seq_len=max_seq_len,
        vocab_size=len(tokenizer),
        use_cache=False,  # as mosaicml's MPT checkpoints ship
        # Wider than the usual 0.02 so a random model has clear argmaxes: greedy decoding is
        # then stable across batch shapes, which the equivalence tests rely on.
        initializer_range=0.5,
    )
    torch.manual_seed(seed)
    model = MptForCausalLM(config).eval()
    model.generation_config.use_cache = False
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
