"""A model with packed linear layers keeps a correct state, moves and casts as a plain one does,
and packs only where the original weights can be handed back."""

from __future__ import annotations

import copy
import logging
import sys

import pytest
import torch
from torch import nn
from transformers import MptForCausalLM

from templated_llm.runtime import packed_linear
from templated_llm.runtime.packed_linear import PackedLinear, pack_linear_layers, packing_available

pytestmark = pytest.mark.skipif(not packing_available(torch.float32), reason="torch built without oneDNN")

IDS = torch.randint(1, 1000, (2, 9), generator=torch.Generator().manual_seed(3))


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model(IDS.to(model.device)).logits.float().cpu()


@pytest.fixture
def plain(tiny_snapshot):
    return MptForCausalLM.from_pretrained(tiny_snapshot).eval()


@pytest.fixture
def packed(tiny_snapshot):
    model = MptForCausalLM.from_pretrained(tiny_snapshot).eval()
    assert pack_linear_layers(model) > 0
    return model


def test_the_state_dict_holds_every_weight(plain, packed):
    want, have = plain.state_dict(), packed.state_dict()
    assert list(have) == list(want)
    for name, tensor in want.items():
        assert torch.equal(have[name], tensor), name


def test_a_saved_packed_model_loads_as_the_original(plain, packed, tmp_path):
    packed.save_pretrained(tmp_path / "saved")
    reloaded = MptForCausalLM.from_pretrained(tmp_path / "saved").eval()
    torch.testing.assert_close(_logits(reloaded), _logits(plain), rtol=0, atol=0)


def test_load_state_dict_repacks(plain, packed):
    torch.manual_seed(7)
    with torch.no_grad():
        for parameter in plain.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    packed.load_state_dict(plain.state_dict())  # strict: no key missing or unexpected
    torch.testing.assert_close(_logits(packed), _logits(plain), rtol=1e-4, atol=1e-4)
    layer = packed.transformer.blocks[0].ffn.up_proj
    wrong = {"weight": torch.zeros(3, 3), "bias": layer.bias.detach()} if layer.bias is not None \
        else {"weight": torch.zeros(3, 3)}
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        layer.load_state_dict(wrong)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float16, 1e-3), (torch.bfloat16, 3e-2)])
def test_a_packed_model_changes_dtype_as_a_plain_one_does(plain, packed, dtype, tolerance):
    torch.testing.assert_close(_logits(packed.to(dtype)), _logits(plain.to(dtype)),
                               rtol=tolerance, atol=tolerance)
    assert packed.state_dict()["transformer.blocks.0.ffn.up_proj.weight"].dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_a_packed_model_cast_away_and_back_is_packed_again(plain, packed, dtype):
    # float16 is not packed (a plain weight meanwhile); back in float32 the layer packs again.
    packed.to(dtype).float()
    layers = [m for m in packed.modules() if isinstance(m, PackedLinear)]
    assert layers and all(m._packed is not None and "weight" not in m._parameters for m in layers)
    torch.testing.assert_close(_logits(packed), _logits(plain.to(dtype).float()), rtol=1e-5, atol=1e-5)
    assert list(packed.state_dict()) == list(plain.state_dict())


def test_a_deep_copy_of_a_packed_model_is_packed_and_independent(plain, packed):
    copy_ = copy.deepcopy(packed)
    layer, copied = packed.transformer.blocks[0].ffn.up_proj, copy_.transformer.blocks[0].ffn.up_proj
    assert copied._packed is not None and copied._packed is not layer._packed
    torch.testing.assert_close(_logits(copy_), _logits(plain), rtol=1e-5, atol=1e-5)
    copy_.half()  # the copy's change leaves the original as it was
    assert layer._packed.dtype == torch.float32
    torch.testing.assert_close(_logits(packed), _logits(plain), rtol=1e-5, atol=1e-5)


def test_a_packed_model_moves_to_another_device(plain, packed):
    device = "cuda" if torch.cuda.is_available() else "meta"  # meta: any device but the CPU
    packed.to(device)
    assert {t.device.type for t in packed.state_dict().values()} == {device}
    assert all(m._packed is None for m in packed.modules() if isinstance(m, PackedLinear))
    if device == "cuda":
        torch.testing.assert_close(_logits(packed.to(device)), _logits(plain.to(device)),
                                   rtol=1e-4, atol=1e-4)


def test_calls_that_change_nothing_pass(packed):
    before = _logits(packed)
    packed.to("cpu").float().to(torch.float32)
    torch.testing.assert_close(_logits(packed), before, rtol=0, atol=0)


@pytest.mark.parametrize(("setting", "reason"), [
    (("_MAPS", "/no/proc/self/maps"), "cannot read /no/proc/self/maps"),
    (("sys.platform", "darwin"), "on Linux only"),
])
def test_where_pages_cannot_be_handed_back_nothing_is_packed(plain, monkeypatch, caplog, setting, reason):
    target, value = setting
    if target == "sys.platform":
        monkeypatch.setattr(sys, "platform", value)
    else:
        monkeypatch.setattr(packed_linear, target, value)
    before = _logits(plain)
    with caplog.at_level(logging.WARNING, logger=packed_linear.__name__):
        assert pack_linear_layers(plain) == 0
    assert reason in caplog.text and "not packed" in caplog.text
    assert not any(isinstance(m, PackedLinear) for m in plain.modules())
    torch.testing.assert_close(_logits(plain), before, rtol=0, atol=0)


class _FailingLibc:
    def madvise(self, *args):
        return -1


def test_a_failed_madvise_is_reported_and_stops_packing(tiny_snapshot, tmp_path, monkeypatch, caplog):
    if not sys.platform.startswith("linux"):
        pytest.skip("the release step runs on Linux only")
    monkeypatch.setattr(packed_linear, "_libc", lambda: _FailingLibc())
    model = MptForCausalLM.from_pretrained(tiny_snapshot).eval()
    with caplog.at_level(logging.WARNING, logger=packed_linear.__name__):
        packed = pack_linear_layers(model)
    assert packed == 1  # the first layer is packed before its release fails; none after
    assert "madvise" in caplog.text and "stopped packing" in caplog.text
