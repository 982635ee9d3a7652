"""Builds small, randomly initialised model snapshots for tests, demos and benchmarks.

Real checkpoints are many gigabytes; these have the architecture, file layout and tokenizer
conventions of the real ones (config, safetensors weights, byte-level BPE tokenizer with the
family's special tokens) in a second, and the same bytes for the same seed:

- ``mpt``: MPT-instruct; ``<|endoftext|>`` as bos, eos and unk, no pad token, ``use_cache:
  false`` as mosaicml ships it.
- ``gpt_neox``: Dolly v2 and Pythia; GPT-NeoX's ``<|endoftext|>`` conventions.
- ``llama`` and ``mistral``: Llama 2 and Mistral; ``<unk>``, ``<s>``, ``</s>`` with ``<s>``
  added in front of every encoded text, no pad token.
- ``qwen2`` and ``qwen3``: Qwen2 and Qwen3; ``<|endoftext|>`` as eos and pad token, no bos added.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

END_OF_TEXT = "<|endoftext|>"

#: Zephyr's chat template (a Mistral fine-tune), for a tokenizer that carries its own template.
ZEPHYR_CHAT_TEMPLATE = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
    "{% endfor %}"
)

_WORDS = (
    "the a an of to and in is was for on with as by at from that this it be are or which "
    "model models language machine learning data train training text token tokens prompt "
    "response instruction answer question write explain describe list name three rivers "
    "mountains cities water river sea ocean light sound time year day people world small large "
    "fast slow good new first last long short high low number numbers word words sentence "
    "attention layer layers weight weights network networks vector matrix function value "
    "serve serving request batch cache memory speed python code library plugin template"
).split()


@dataclass(frozen=True)
class _Vocabulary:
    """A family's special tokens; ``add_bos``: the tokenizer puts ``bos`` before every text."""

    bos: str
    eos: str
    unk: str
    add_bos: bool
    pad: str | None = None


_GPT_NEOX = _Vocabulary(END_OF_TEXT, END_OF_TEXT, END_OF_TEXT, add_bos=False)
_LLAMA = _Vocabulary("<s>", "</s>", "<unk>", add_bos=True)
_QWEN = _Vocabulary(END_OF_TEXT, END_OF_TEXT, END_OF_TEXT, add_bos=False, pad=END_OF_TEXT)
_VOCABULARIES = {"mpt": _GPT_NEOX, "gpt_neox": _GPT_NEOX, "llama": _LLAMA, "mistral": _LLAMA,
                 "qwen2": _QWEN, "qwen3": _QWEN}
ARCHITECTURES = tuple(_VOCABULARIES)
_WINDOWED = ("mistral", "qwen2", "qwen3")  # the architectures with a sliding window


def _corpus(seed: int, lines: int) -> list[str]:
    rng = random.Random(seed)
    corpus = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        sentence = " ".join(words).capitalize() + rng.choice(".?!:")
        corpus.append(f"### Instruction:\n{sentence}\n### Response:\n{sentence[::-1]} {rng.randint(0, 999)}")
    return corpus


def _train_tokenizer(seed: int, vocab_size: int, vocabulary: _Vocabulary = _GPT_NEOX,
                     extra_special_tokens: Sequence[str] = ()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = list(dict.fromkeys([vocabulary.unk, vocabulary.bos, vocabulary.eos]))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special + list(extra_special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(seed, 2000), trainer)
    post_processors = [processors.ByteLevel(trim_offsets=False)]
    if vocabulary.add_bos:
        bos = (vocabulary.bos, tokenizer.token_to_id(vocabulary.bos))
        post_processors.append(processors.TemplateProcessing(
            single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]} $B", special_tokens=[bos]))
    tokenizer.post_processor = processors.Sequence(post_processors)
    # A pad token only where the family's tokenizer has one (Qwen's, not GPT-NeoX's or Llama's).
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=vocabulary.bos, eos_token=vocabulary.eos,
        unk_token=vocabulary.unk, pad_token=vocabulary.pad,
        additional_special_tokens=list(extra_special_tokens),
    )


def _config(architecture: str, tokenizer, hidden_size: int, n_layers: int, n_heads: int,
            max_seq_len: int, sliding_window: int | None, window_layers: int):
    import transformers

    # Wider than the usual 0.02 so a random model has clear argmaxes: greedy decoding is then
    # stable across batch shapes, which the equivalence tests rely on.
    common = {"vocab_size": len(tokenizer), "initializer_range": 0.5,
              "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    if architecture == "mpt":
        return transformers.MptConfig(
            d_model=hidden_size, n_heads=n_heads, n_layers=n_layers, max_seq_len=max_seq_len,
            use_cache=False,  # as mosaicml's MPT checkpoints ship
            **common,
        )
    if architecture == "gpt_neox":
        return transformers.GPTNeoXConfig(
            hidden_size=hidden_size, num_hidden_layers=n_layers, num_attention_heads=n_heads,
            intermediate_size=4 * hidden_size, max_position_embeddings=max_seq_len,
            rotary_pct=0.25, use_parallel_residual=True,  # as Pythia, Dolly v2's base
            **common,
        )
    if architecture == "mistral" and sliding_window is not None:
        common["sliding_window"] = sliding_window  # every layer (else Mistral's 4096)
    elif architecture in ("qwen2", "qwen3"):
        # Qwen windows only the layers from max_window_layers on, when use_sliding_window is set.
        common |= {"use_sliding_window": sliding_window is not None, "sliding_window": sliding_window,
                   "max_window_layers": window_layers}
    config_class = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                    "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}
    return config_class[architecture](
        hidden_size=hidden_size, num_hidden_layers=n_layers, num_attention_heads=n_heads,
        # Mistral and Qwen use grouped-query attention; Llama 2 7B/13B one key/value head per head.
        num_key_value_heads=n_heads if architecture == "llama" else n_heads // 2,
        intermediate_size=4 * hidden_size, max_position_embeddings=max_seq_len, **common,
    )


def write_bin_shards(tensors: Iterable[tuple[str, Any]], path: Path, shard_bytes: int) -> list[Path]:
    """Write named tensors as ``pytorch_model-0000i-of-0000n.bin`` shards of at most about
    ``shard_bytes`` each, with ``pytorch_model.bin.index.json``, as older Hub checkpoints
    (mosaicml/mpt-7b-instruct) are stored. ``tensors`` is consumed lazily: one shard at a time
    is in memory."""
    import torch

    written, shard, size, total, names = [], {}, 0, 0, []

    def flush() -> None:
        nonlocal shard, size
        written.append(path / f"pytorch_model-shard-{len(written)}.bin")
        torch.save(shard, written[-1])
        names.append(list(shard))
        shard, size = {}, 0

    for name, tensor in tensors:
        if shard and size + tensor.nbytes > shard_bytes:
            flush()
        shard[name] = tensor
        size += tensor.nbytes
        total += tensor.nbytes
    if shard:
        flush()
    final, weight_map = [], {}
    for i, (file, keys) in enumerate(zip(written, names), start=1):
        final.append(file.rename(path / f"pytorch_model-{i:05d}-of-{len(written):05d}.bin"))
        weight_map.update(dict.fromkeys(keys, final[-1].name))
    (path / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return final


def build_tiny_model(
    architecture: str,
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    hidden_size: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    vocab_size: int = 1024,
    max_seq_len: int = 2048,
    chat_template: str | None = None,
    extra_special_tokens: Sequence[str] = (),
    dtype: str = "float32",
    bin_shard_bytes: int | None = None,
    sliding_window: int | None = None,
    window_layers: int = 0,
) -> Path:
    """Write a random snapshot of ``architecture`` (one of :data:`ARCHITECTURES`) to ``path``.

    ``chat_template`` is stored on the tokenizer, as instruct models ship theirs;
    ``extra_special_tokens`` are added as special tokens (Dolly's ``### End``). The defaults
    give a model of a few hundred thousand parameters for second-long tests. The weights are
    stored in ``dtype``, as ``model.safetensors``, or with ``bin_shard_bytes`` as sharded
    ``pytorch_model-*.bin`` files of about that size (see :func:`write_bin_shards`).
    ``sliding_window`` makes a Mistral attend only that many of the latest tokens in every
    layer, and a Qwen in its layers from ``window_layers`` on (the others see the whole context);
    other architectures have no window.
    """
    if architecture not in _VOCABULARIES:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {list(ARCHITECTURES)}")
    sizes = {"hidden_size": hidden_size, "n_layers": n_layers, "n_heads": n_heads, "vocab_size": vocab_size,
             "max_seq_len": max_seq_len}
    if not_positive := {name: value for name, value in sizes.items() if value < 1}:
        raise ValueError(f"sizes must be positive; received {not_positive}")
    if hidden_size % n_heads or n_heads % 2 and architecture in _WINDOWED:
        raise ValueError(f"n_heads must divide hidden_size (and be even for {', '.join(_WINDOWED)}, "
                         f"whose key heads are half the query heads); received hidden_size={hidden_size}, "
                         f"n_heads={n_heads}")
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(seed, vocab_size, _VOCABULARIES[architecture], extra_special_tokens)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if sliding_window is not None and architecture not in _WINDOWED:
        raise ValueError(f"architecture {architecture!r} has no sliding window; {', '.join(_WINDOWED)} do")
    config = _config(architecture, tokenizer, hidden_size, n_layers, n_heads, max_seq_len,
                     sliding_window, window_layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval().to(getattr(torch, dtype))
    model.config.dtype = getattr(torch, dtype)  # config.json says what the weights are
    if architecture == "mpt":
        model.generation_config.use_cache = False
    if bin_shard_bytes is None:
        model.save_pretrained(path)
    else:
        model.config.save_pretrained(path)
        model.generation_config.save_pretrained(path)
        stored = {}  # tied weights once, under their first name, as save_pretrained does
        for name, tensor in model.state_dict().items():
            stored.setdefault(tensor.data_ptr(), (name, tensor))
        write_bin_shards(stored.values(), path, bin_shard_bytes)
    tokenizer.save_pretrained(path)
    return path


def build_tiny_mpt(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    d_model: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    vocab_size: int = 1024,
    max_seq_len: int = 2048,
    dtype: str = "float32",
    bin_shard_bytes: int | None = None,
) -> Path:
    """Write a random MPT snapshot to ``path`` (created if needed) and return the path.

    The defaults give a ~0.2M-parameter model for second-long tests; raise ``d_model`` and
    ``n_layers`` for benchmarks (``d_model=512, n_layers=8`` is about 25M parameters).
    ``dtype`` and ``bin_shard_bytes`` as for :func:`build_tiny_model`.
    """
    return build_tiny_model("mpt", path, seed=seed, hidden_size=d_model, n_layers=n_layers,
                            n_heads=n_heads, vocab_size=vocab_size, max_seq_len=max_seq_len,
                            dtype=dtype, bin_shard_bytes=bin_shard_bytes)
