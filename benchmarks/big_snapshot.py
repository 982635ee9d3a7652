"""Random MPT snapshots at real size, stored as the Hub stores mosaicml/mpt-7b-instruct.

bfloat16 weights in ``pytorch_model-0000i-of-0000n.bin`` shards of up to 10 GB with
``pytorch_model.bin.index.json``. The model is laid out on the meta device (no memory) and each
tensor is drawn in bfloat16 as its shard is written, so building never holds a float32 copy, nor
more than one shard. Built once under the cache directory, then reused.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from templated_llm.devtools.tiny import build_tiny_mpt, write_bin_shards

HUB_SHARD_BYTES = 10 * 10**9  # mpt-7b-instruct: 9.94 GB and 3.36 GB
_STD = 0.02  # MPT's initializer range


@dataclass(frozen=True)
class MptShape:
    d_model: int
    n_layers: int
    n_heads: int
    vocab_size: int = 50432
    expansion_ratio: int = 4
    max_seq_len: int = 2048
    shard_bytes: int = HUB_SHARD_BYTES

    @property
    def name(self) -> str:
        return f"mpt-bf16-d{self.d_model}-l{self.n_layers}-h{self.n_heads}-v{self.vocab_size}"


#: mosaicml/mpt-7b-instruct's configuration: 6.65B parameters, 13.3 GB in bfloat16.
MPT_7B = MptShape(d_model=4096, n_layers=32, n_heads=32)


def _tensors(model: torch.nn.Module, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Each stored tensor of ``model`` (on the meta device), drawn in bfloat16 one at a time;
    tied weights once, under their first name, as save_pretrained stores them."""
    generator = torch.Generator().manual_seed(seed)
    for name, meta in model.named_parameters():  # tied parameters appear once
        if meta.dim() == 1:  # layer norm weights: ones, as MPT initialises them
            yield name, torch.ones(meta.shape, dtype=torch.bfloat16)
        else:
            yield name, torch.empty(meta.shape, dtype=torch.bfloat16).normal_(0, _STD, generator=generator)


def build(shape: MptShape, cache: Path, seed: int = 0) -> Path:
    """The snapshot of ``shape`` under ``cache``, built there the first time."""
    from transformers import MptConfig, MptForCausalLM

    path = cache / shape.name
    if (path / "pytorch_model.bin.index.json").is_file():
        return path
    scratch = cache / f"{shape.name}.building"
    shutil.rmtree(scratch, ignore_errors=True)
    # The tiny builder's tokenizer (1024 tokens; the model's rows beyond them decode to nothing).
    tokenizer = build_tiny_mpt(scratch / "tokenizer", seed=seed)
    config = MptConfig.from_pretrained(tokenizer)
    config.update({"d_model": shape.d_model, "n_layers": shape.n_layers, "n_heads": shape.n_heads,
                   "vocab_size": shape.vocab_size, "expansion_ratio": shape.expansion_ratio,
                   "max_seq_len": shape.max_seq_len, "initializer_range": _STD})
    config.dtype = torch.bfloat16
    with torch.device("meta"):
        model = MptForCausalLM(config)
    model.generation_config.use_cache = False  # as mosaicml ships it
    config.save_pretrained(scratch)
    model.generation_config.save_pretrained(scratch)
    write_bin_shards(_tensors(model, seed), scratch, shape.shard_bytes)
    for file in tokenizer.glob("*token*"):
        shutil.copy2(file, scratch / file.name)
    shutil.rmtree(tokenizer)
    scratch.rename(path)
    return path
