"""``python -m benchmarks.grammar_libraries``: the three JSON-schema grammar libraries side by side.

How llguidance (the one templated-llm uses), xgrammar and outlines-core read Hugging Face
tokenizers, how long they take to compile a schema, and what they cost per token: each replays
the same tokens (a compact JSON record, or a walk drawn under llguidance's mask where the
tokenizer spells the record's first token with a leading space), best of five replays,
counting only the library's own work (filling the token bitmask and taking the token). The
other two are not dependencies; install them beside this environment first:

    python -m venv --without-pip /tmp/grammars   # then make it see this environment, and:
    pip --python /tmp/grammars/bin/python install xgrammar==0.2.8 outlines-core==0.2.14

Tokenizers: the tiny MPT's (byte-level BPE, 1k tokens), and two 32k-token tokenizers trained
here on transformers' own source: byte-level BPE (GPT-2 style) and BPE with byte fallback over
SentencePiece-style pieces (Llama style). Prints one JSON line per tokenizer and library.
"""

from __future__ import annotations

import glob
import json
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "benchmarks" / "tokenizers"
RECORD = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 6},
        "address": {"type": "object", "required": ["city"], "properties": {
            "city": {"type": "string", "maxLength": 20}, "zip": {"type": "string", "maxLength": 8}}},
        "score": {"type": "number", "minimum": 0, "maximum": 100},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "address"],
}
INSTANCE = {"name": "Ada Lovelace wrote the first program", "age": 36, "tags": ["red", "blue", "green", "red"],
            "address": {"city": "London, England", "zip": "W1"}, "score": 12.5, "active": True}
_BOUNDS = ("maxLength", "maxItems", "minimum", "maximum")


def _unbounded(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: _unbounded(v) for k, v in schema.items() if k not in _BOUNDS}
    return schema


def _closed(schema: Any) -> Any:
    # As templated-llm compiles schemas for llguidance (xgrammar's strict mode does the same).
    if isinstance(schema, dict):
        out = {k: _closed(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    return schema


def _lines() -> Iterator[str]:
    site = Path(torch.__file__).parents[1] / "transformers"
    for file in sorted(glob.glob(str(site / "**" / "*.py"), recursive=True))[:1500]:
        yield from Path(file).read_text(errors="ignore").splitlines()


def _trained(kind: str) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    path = CACHE / kind
    if path.exists():
        return PreTrainedTokenizerFast.from_pretrained(path)
    if kind == "byte-level-32k":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        specials, extra = ["<|endoftext|>"], {"initial_alphabet": pre_tokenizers.ByteLevel.alphabet()}
        names = {"bos_token": specials[0], "eos_token": specials[0], "unk_token": specials[0]}
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
        extra = {"max_token_length": 16}
        names = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    tok.train_from_iterator(_lines(), trainers.BpeTrainer(vocab_size=32000, special_tokens=specials,
                                                          show_progress=False, **extra))
    if kind == "byte-level-32k":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, **names)
    hf.save_pretrained(path)
    return hf


def _bits(words: np.ndarray, vocab: int) -> np.ndarray:
    return np.unpackbits(words.view(np.uint8), bitorder="little", count=vocab).view(np.bool_)


class _LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer: Any, vocab: int) -> None:
        import llguidance
        import llguidance.hf

        self.ll, self.vocab = llguidance, vocab
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)

    def compile(self, schema: Any) -> Any:
        grammar = self.ll.LLMatcher.grammar_from_json_schema(_closed(schema), defaults={"whitespace_flexible": False})
        return self.ll.LLMatcher(self.tokenizer, grammar)

    def state(self, compiled: Any) -> tuple[Any, Any]:
        matcher = compiled.deep_copy()
        return (lambda: np.frombuffer(matcher.compute_bitmask(), dtype=np.uint32)), matcher.consume_token


class _XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab: int) -> None:
        import xgrammar

        self.xgr, self.vocab = xgrammar, vocab
        self.compiler = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab),
                                                 max_threads=1)

    def compile(self, schema: Any) -> Any:
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))

    def state(self, compiled: Any) -> tuple[Any, Any]:
        matcher, bitmask = self.xgr.GrammarMatcher(compiled), self.xgr.allocate_token_bitmask(1, self.vocab)

        def fill() -> np.ndarray:
            matcher.fill_next_token_bitmask(bitmask, 0)
            return bitmask[0].numpy()
        return fill, matcher.accept_token


def _gpt2_bytes() -> dict[str, int]:
    # GPT-2's table of the printable character standing for each byte in byte-level pieces.
    keep = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    chars, extra = {}, 0
    for byte in range(256):
        if byte in keep:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


class _OutlinesCore:
    name = "outlines-core"

    def __init__(self, tokenizer: Any, vocab: int) -> None:
        import outlines_core

        self.oc, self.vocab = outlines_core, vocab
        self.eos = tokenizer.eos_token_id
        # outlines-core takes token bytes -> ids; the caller turns each tokenizer's pieces into bytes.
        byte_of, specials = _gpt2_bytes(), set(tokenizer.all_special_ids)
        metaspace = any(t.startswith("▁") for t in tokenizer.get_vocab())
        mapping: dict[bytes, list[int]] = {}
        for piece, token in tokenizer.get_vocab().items():
            if token in specials:
                continue
            if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
                data = bytes([int(piece[3:5], 16)])
            elif metaspace:
                data = piece.replace("▁", " ").encode()
            else:
                data = bytes(byte_of[c] for c in piece)
            mapping.setdefault(data, []).append(token)
        self.vocabulary = outlines_core.Vocabulary(self.eos, mapping)

    def compile(self, schema: Any) -> Any:
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema), whitespace_pattern="")
        return self.oc.Index(regex, self.vocabulary)

    def state(self, compiled: Any) -> tuple[Any, Any]:
        guide, words = self.oc.Guide(compiled), np.zeros((self.vocab + 31) // 32, dtype=np.int32)

        def fill() -> np.ndarray:
            words[:] = 0
            guide.write_mask_into(words.ctypes.data, words.size, 4)
            return words

        def take(token: int) -> bool:
            if token != self.eos:  # the guide takes no end token
                guide.advance(token, return_tokens=False)
            return True
        return fill, take


def _walk(library: Any, compiled: Any, eos: int, vocab: int, steps: int = 400) -> list[int]:
    """Tokens drawn at random among those ``library`` allows, until the end token."""
    generator = torch.Generator().manual_seed(123)
    fill, take = library.state(compiled)
    tokens = []
    for _ in range(steps):
        scores = torch.randn(vocab, generator=generator)
        scores[~torch.from_numpy(_bits(fill(), vocab).copy())] = -torch.inf
        token = int(scores.argmax())
        if token == eos:
            break
        take(token)
        tokens.append(token)
    return tokens


def _per_token_us(library: Any, compiled: Any, tokens: list[int]) -> float:
    best = float("inf")
    for _ in range(5):
        fill, take = library.state(compiled)
        times = []
        for token in tokens:
            start = time.perf_counter()
            fill()
            take(token)
            times.append(time.perf_counter() - start)
        best = min(best, statistics.mean(times))
    return round(best * 1e6, 1)


def _timed_ms(run: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    result = run()
    return result, round(1e3 * (time.perf_counter() - start), 2)


def main() -> int:
    from transformers import PreTrainedTokenizerFast

    from templated_llm.devtools.tiny import build_tiny_mpt

    CACHE.mkdir(parents=True, exist_ok=True)
    tokenizers = {
        "tiny MPT, byte-level BPE (1k)": PreTrainedTokenizerFast.from_pretrained(build_tiny_mpt(CACHE / "tiny-mpt")),
        "byte-level BPE, GPT-2 style (32k)": _trained("byte-level-32k"),
        "BPE with byte fallback, Llama style (32k)": _trained("byte-fallback-32k"),
    }
    text = json.dumps(INSTANCE, separators=(",", ":"))
    for label, tokenizer in tokenizers.items():
        vocab, eos = len(tokenizer), tokenizer.eos_token_id
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if tokenizer.decode(ids) != text or tokenizer.convert_ids_to_tokens(ids)[0].startswith("▁"):
            reference = _LLGuidance(tokenizer, vocab)
            ids = _walk(reference, reference.compile(RECORD), eos, vocab)
        tokens = [*ids, eos]
        for kind in (_LLGuidance, _XGrammar, _OutlinesCore):
            row: dict[str, Any] = {"tokenizer": label, "library": kind.name, "tokens": len(tokens)}
            try:
                library, row["tokenizer_setup_ms"] = _timed_ms(lambda: kind(tokenizer, vocab))
                for name, schema in (("json_object", {"type": "object"}), ("bounded", RECORD),
                                     ("unbounded", _unbounded(RECORD))):
                    compiled, row[f"compile_{name}_ms"] = _timed_ms(lambda s=schema: library.compile(s))
                    if name != "json_object":
                        row[f"per_token_us_{name}"] = _per_token_us(library, compiled, tokens)
            except Exception as exc:  # noqa: BLE001 - reported in the row, the others go on
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
