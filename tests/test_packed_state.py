"""A model with packed linear layers keeps a correct state, and moves and casts as a plain one
does."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import MptForCausalLM

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
