"""CPU linear layers, packed for oneDNN or run weight-major: same results as nn.Linear, weights
not kept twice in memory."""

from __future__ import annotations

import shutil
import subprocess
import sys

import mlflow
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import MptForCausalLM

from conftest import REPO, repo_env
from templated_llm.devtools.tiny import build_tiny_mpt
from templated_llm.model_logging.log import log_llm
from templated_llm.runtime import packed_linear
from templated_llm.runtime.packed_linear import (
    PackedLinear,
    WeightMajorLinear,
    bucket_rows,
    in_row_buckets,
    linear_gelu,
    pack_linear_layers,
    packing_available,
)


pytestmark = pytest.mark.skipif(not packing_available(torch.float32), reason="torch built without oneDNN")


_BF16 = pytest.mark.skipif(not packing_available(torch.bfloat16), reason="this CPU has no oneDNN bfloat16")


def _weight_major(linear: nn.Linear) -> WeightMajorLinear:
    linear.__class__ = WeightMajorLinear
    return linear


@pytest.mark.parametrize("lay_out, dtype, tolerance", [
    (PackedLinear, torch.float32, 0),  # the same multiply-adds, the same GELU: bit for bit
    pytest.param(PackedLinear, torch.bfloat16, 2e-2, marks=_BF16),
    (lambda linear: linear, torch.float32, 0),  # not packed: nn.Linear, then F.gelu
], ids=["packed-float32", "packed-bfloat16", "nn-linear"])
@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 40), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_gelu_fused_into_the_layer_is_the_gelu_of_its_output(lay_out, dtype, tolerance, rows, bias, seed):
    torch.manual_seed(seed)
    linear = nn.Linear(48, 80, bias=bias, dtype=dtype).eval()
    x = torch.randn(2, rows, 48, dtype=dtype)
    with torch.inference_mode():
        layer = lay_out(linear)
        want = nn.functional.gelu(layer(x))
        have = linear_gelu(layer, x)
    assert have.shape == want.shape and have.dtype == want.dtype
    torch.testing.assert_close(have, want, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("lay_out, dtype, tolerance", [
    (PackedLinear, torch.float32, 1e-5),
    pytest.param(PackedLinear, torch.bfloat16, 2e-2, marks=_BF16),
    pytest.param(_weight_major, torch.bfloat16, 2e-2, marks=_BF16),
], ids=["packed-float32", "packed-bfloat16", "weight-major-bfloat16"])
@settings(max_examples=40, deadline=None)
@given(
    in_features=st.integers(1, 96),
    out_features=st.integers(1, 96),
    # Up to 600 rows: past 64, bfloat16 rows run padded to a bucket (bucket_rows).
    leading=st.one_of(st.just([]), st.tuples(st.integers(1, 120)).map(list),
                      st.tuples(st.integers(1, 120), st.integers(1, 5)).map(list)),
    bias=st.booleans(),
    transposed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_the_laid_out_layers_compute_what_nn_linear_does(lay_out, dtype, tolerance, in_features,
                                                         out_features, leading, bias, transposed, seed):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias, dtype=dtype).eval()
    x = torch.randn(*leading, in_features, dtype=dtype)
    if transposed and x.dim() == 3:  # a non-contiguous input, as attention's outputs can be
        x = torch.randn(leading[1], leading[0], in_features, dtype=dtype).transpose(0, 1)
    with torch.inference_mode():
        want = linear(x)
        have = lay_out(linear)(x)
    assert have.shape == want.shape and have.dtype == want.dtype
    torch.testing.assert_close(have, want, rtol=tolerance, atol=tolerance)


@given(rows=st.integers(1, 5000))
def test_bucketed_row_counts_add_at_most_31_rows_or_an_eighth(rows):
    padded = bucket_rows(rows)
    assert padded >= rows and bucket_rows(padded) == padded
    assert padded == rows if rows <= 64 else padded - rows <= max(31, rows // 8)


def test_inputs_of_many_rows_reach_onednn_in_a_few_row_counts():
    assert len({bucket_rows(rows) for rows in range(65, 4097)}) == 38
    seen = []

    def run(rows: torch.Tensor) -> torch.Tensor:
        seen.append(rows.shape[0])
        return rows * 2

    x = torch.randn(3, 101, 8, dtype=torch.bfloat16)  # 303 rows: padded to 320
    out = in_row_buckets(x, run)
    assert seen == [320] and torch.equal(out, x * 2)
    assert in_row_buckets(x.float(), run).shape == x.shape and seen[-1] == 303  # float32: exact


@_BF16
def test_every_bfloat16_layout_runs_many_rows_bucketed(monkeypatch):
    seen = []
    bucketed = packed_linear.in_row_buckets
    monkeypatch.setattr(packed_linear, "in_row_buckets",
                        lambda x, run: bucketed(x, lambda rows: (seen.append(rows.shape[0]), run(rows))[1]))
    linear = nn.Linear(16, 8, dtype=torch.bfloat16).eval()
    x = torch.randn(2, 50, 16, dtype=torch.bfloat16)  # 100 rows: 128 reach the kernel
    with torch.inference_mode():
        outputs = [PackedLinear(linear)(x), linear_gelu(PackedLinear(linear), x), _weight_major(linear)(x)]
    assert seen == [128, 128, 128] and all(out.shape == (2, 50, 8) for out in outputs)


@_BF16
@pytest.mark.parametrize("cache_bytes, weight_major", [(0, True), (2**40, False)])
def test_bfloat16_layers_run_weight_major_where_the_weights_outgrow_the_cache(
        tiny_snapshot, monkeypatch, cache_bytes, weight_major):
    monkeypatch.setattr(packed_linear, "last_level_cache_bytes", lambda: cache_bytes)
    plain = MptForCausalLM.from_pretrained(tiny_snapshot, dtype=torch.bfloat16).eval()
    model = MptForCausalLM.from_pretrained(tiny_snapshot, dtype=torch.bfloat16).eval()
    blocks = len(model.transformer.blocks)
    changed = pack_linear_layers(model)
    up_proj, lm_head = model.transformer.blocks[0].ffn.up_proj, model.lm_head
    if weight_major:  # every layer, the output layer tied to the embeddings too
        assert changed == 4 * blocks + 1
        assert type(up_proj) is WeightMajorLinear and type(lm_head) is WeightMajorLinear
    else:
        assert changed == 4 * blocks
        assert type(up_proj) is PackedLinear and type(lm_head) is nn.Linear
    assert lm_head.weight is model.transformer.wte.weight
    ids = torch.randint(1, plain.config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, rtol=2e-2, atol=2e-2)
        state = model.state_dict()
        assert state.keys() == plain.state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in plain.state_dict().items())
        # In another dtype the layers compute as nn.Linear does.
        torch.testing.assert_close(model.float()(ids).logits, plain.float()(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sizes, expected", [
    ({"index0": "48K", "index2": "2048K", "index3": "307200K"}, 300 * 2**20),
    ({"index0": "32K", "index1": "not a size"}, 32 * 2**10),
    ({}, 32 * 2**20),  # nothing reported: a typical server's
])
def test_the_last_level_cache_is_the_largest_one_linux_reports(tmp_path, monkeypatch, sizes, expected):
    for index, size in sizes.items():
        (tmp_path / index).mkdir()
        (tmp_path / index / "size").write_text(size + "\n")
    monkeypatch.setattr(packed_linear, "_CACHES", tmp_path)
    assert packed_linear.last_level_cache_bytes() == expected


def test_packing_mpt_keeps_the_tied_output_layer_and_its_logits(tiny_snapshot):
    plain = MptForCausalLM.from_pretrained(tiny_snapshot).eval()
    packed = MptForCausalLM.from_pretrained(tiny_snapshot).eval()
    blocks = len(packed.transformer.blocks)
    # Wqkv, out_proj, up_proj and down_proj per block; lm_head shares the embeddings' weight.
    assert pack_linear_layers(packed) == 4 * blocks
    assert type(packed.lm_head) is nn.Linear
    assert packed.lm_head.weight is packed.transformer.wte.weight
    ids = torch.randint(1, plain.config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(packed(ids).logits, plain(ids).logits, rtol=1e-4, atol=1e-4)


def _resident_bytes(path) -> int:
    """Bytes of ``path``'s memory mappings resident in this process (Linux smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
                inside = fields[-1] == str(path)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=_BF16)])
def test_laying_out_hands_back_the_memory_mapped_originals(tiny_snapshot, tmp_path, monkeypatch, dtype):
    # float32 layers are packed; bfloat16 ones, with the cache made small, run weight-major
    # from a copy in anonymous memory: file pages are reclaimable, and refaulting them would
    # slow every step.
    monkeypatch.setattr(packed_linear, "last_level_cache_bytes", lambda: 0)
    built = tiny_snapshot if dtype == "float32" else build_tiny_mpt(tmp_path / "built", seed=0, dtype=dtype)
    snapshot = shutil.copytree(built, tmp_path / "snapshot")  # mapped by this test only
    weights = snapshot / "model.safetensors"
    model = MptForCausalLM.from_pretrained(snapshot, dtype=getattr(torch, dtype)).eval()
    linear_bytes = sum(m.weight.nbytes for m in model.modules()
                       if type(m) is nn.Linear and m is not model.lm_head)
    pack_linear_layers(model)
    with torch.inference_mode():
        model(torch.ones(1, 4, dtype=torch.long))
    # Laying out read every linear weight; what stays mapped is the rest (embeddings, norms).
    assert _resident_bytes(weights.resolve()) <= weights.stat().st_size - linear_bytes + 64 * 1024


@pytest.mark.parametrize("pack_weights", [True, False])
def test_log_llm_packs_on_cpu_unless_told_not_to(tiny_snapshot, pack_weights):
    info = log_llm("mpt-instruct", snapshot=tiny_snapshot, name=f"pack-{pack_weights}",
                   pack_weights=pack_weights)
    model = mlflow.pyfunc.load_model(info.model_uri, model_config={"device": "cpu"}).unwrap_python_model().model
    # By name: the loaded model runs the copy of templated_llm it carries, not this import.
    expected = "PackedLinear" if pack_weights else "Linear"
    assert type(model.transformer.blocks[0].ffn.up_proj).__name__ == expected


_PACK_ANONYMOUS = """
from torch import nn
from benchmarks.measure import current_rss, peak_rss, reset_peak_rss
from templated_llm.runtime.packed_linear import pack_linear_layers
layers = nn.Sequential(*(nn.Linear(1024, 1024, bias=False) for _ in range(12))).eval()
reset_peak_rss()
before = current_rss()
assert pack_linear_layers(layers) == 12
print(peak_rss() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_packing_weights_in_anonymous_memory_holds_one_copy_at_a_time():
    # Weights converted at load live in anonymous memory, not in a file mapping: each original
    # must be freed as soon as its packed copy exists, not when every layer is packed. In a
    # process of its own: this one's other threads (an engine's, say) would move its peak.
    result = subprocess.run([sys.executable, "-c", _PACK_ANONYMOUS], capture_output=True, text=True,
                            check=True, cwd=REPO, env=repo_env())
    assert int(result.stdout) < 12 * 1024 * 1024 * 4 / 3  # a third of the 48 MiB of weights
