"""The server's malloc tuning: freed activation-sized blocks are reused, not faulted in again."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from templated_llm.serving.allocator import OPT_OUT_ENV

# A transformers forward pass over 512 tokens, 8 times: the minor page faults of the passes after
# the first two (which fault in what they keep), and what keep_freed_memory said.
ROUNDS = '''
import json, resource
import torch
from transformers import MptConfig, MptForCausalLM
from templated_llm.serving.allocator import keep_freed_memory

said = keep_freed_memory()
torch.manual_seed(0)
model = MptForCausalLM(MptConfig(d_model=256, n_heads=4, n_layers=2, vocab_size=1000, max_seq_len=1024)).eval()
ids = torch.randint(0, 1000, (1, 512))
faults = []
with torch.inference_mode():
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        model(ids, use_cache=False)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps([said, faults[2:]]))
'''


def _rounds(**env: str) -> tuple[str, list[int]]:
    done = subprocess.run([sys.executable, "-c", ROUNDS], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})
    assert done.returncode == 0, done.stderr[-3000:]
    said, faults = json.loads(done.stdout.splitlines()[-1])
    return said, faults


def test_freed_blocks_are_reused_instead_of_faulted_in_again() -> None:
    said, tuned = _rounds()
    assert said == ("malloc keeps freed memory for reuse (blocks up to 32 MiB from its heaps, up to 1 GiB "
                    f"of their free tops kept; {OPT_OUT_ENV}=0 turns this off)")
    opted_out, untuned = _rounds(**{OPT_OUT_ENV: "0"})
    assert opted_out == f"malloc left as it is ({OPT_OUT_ENV}=0)"
    # glibc's own thresholds fault activations in on every pass (3,000-5,000 pages here)
    assert sum(untuned) > 4 * max(sum(tuned), 1000), (tuned, untuned)


class _Started(Exception):
    pass


def test_a_server_started_with_mlflow_only_starts_with_the_thresholds(monkeypatch) -> None:
    # glibc reads them when the process starts: plain mlflow models serve gets them as variables.
    from templated_llm import cli

    started: list[dict[str, str]] = []

    def execve(path: str, args: list[str], env: dict[str, str]) -> None:
        started.append(env)
        raise _Started

    monkeypatch.setattr(os, "execve", execve)
    monkeypatch.delenv(OPT_OUT_ENV, raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")  # the user's own value wins
    for opt_out in (None, "off"):
        if opt_out:
            monkeypatch.setenv(OPT_OUT_ENV, opt_out)
        try:
            cli.main(["serve", "models:/m/1", "--mlflow-only", "--port", "5999"])
        except _Started:
            pass
    tuned, untouched = ({k: v for k, v in env.items() if k.startswith("MALLOC_")} for env in started)
    assert tuned == {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": "12345"}
    assert untouched == {"MALLOC_TRIM_THRESHOLD_": "12345"}
