"""``python -m benchmarks.gpu.wheels DIR``: the wheels the GPU check needs on a typical GPU machine.

A GPU machine usually has torch, triton, transformers, accelerate and pandas (and what they
depend on), and often cannot reach a package index. This puts into DIR a wheel of everything
else the check imports: MLflow and the project's other runtime dependencies at the versions
pinned in constraints.txt, built for CPython 3.12 on manylinux x86_64 by default, plus wheels
of templated-llm and its MPT plugin built from this checkout. It prints the total size, which
must stay under the 64 MiB a GPU machine's session can carry. There, install them with::

    pip install --no-index --no-deps --target /tmp/site DIR/*.whl && export PYTHONPATH=/tmp/site
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
# What a GPU machine's image brings (with everything they depend on).
ON_GPU_MACHINES = ("torch", "triton", "transformers", "accelerate", "pandas")
# The project's distributions the check runs: the core and the reference plugin.
PROJECT = ("templated-llm", "templated-llm-mpt")
# MLflow's full distribution also pulls the UI server's stack (scikit-learn, scipy, pyarrow,
# matplotlib: over 100 MiB). Logging and loading a pyfunc need only its skinny core and the
# SQL store, so the check takes the mlflow wheel itself and only these of its dependencies.
_SLIM = {"mlflow": ("mlflow-skinny", "mlflow-tracing", "sqlalchemy", "alembic")}
# pydantic reaches transformers only through recent typer releases; images with an older
# typer lack it, so it travels whatever the local closure says.
_ALWAYS = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection")
SIZE_LIMIT = 64 * 2**20
# pip matches each tag exactly; newer wheels (llguidance 1.9: manylinux_2_31) need the newer tags.
PLATFORMS = ("manylinux_2_35_x86_64", "manylinux_2_34_x86_64", "manylinux_2_31_x86_64",
              "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
              "manylinux2014_x86_64", "manylinux1_x86_64")


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _closure(roots: tuple[str, ...], python_version: str) -> set[str]:
    """Every installed distribution ``roots`` need at run time on Linux (no extras)."""
    environment = {"python_version": python_version, "sys_platform": "linux",
                   "platform_system": "Linux", "extra": ""}
    seen: set[str] = set()
    pending = [_name(r) for r in roots]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in _SLIM:
            pending += _SLIM[name]
            continue
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for requirement in map(Requirement, requires):
            if requirement.marker is None or requirement.marker.evaluate(environment):
                pending.append(_name(requirement.name))
    return seen


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[_name(name)] = version.strip()
    return pins


def needed(python_version: str) -> list[str]:
    """Pinned requirements of what the project needs beyond the GPU machine's own packages."""
    pins = _pins()
    missing = (_closure(PROJECT, python_version) - _closure(ON_GPU_MACHINES, python_version)
               - {_name(p) for p in PROJECT}) | set(_ALWAYS)
    unpinned = sorted(name for name in missing if name not in pins)
    if unpinned:
        raise SystemExit(f"not pinned in constraints.txt: {unpinned}")
    return sorted(f"{name}=={pins[name]}" for name in missing)


def build(out: Path, python_version: str) -> int:
    out.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--implementation", "cp",
                    "--python-version", python_version, *platforms, "-d", str(out), *needed(python_version)], check=True)
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(REPO), str(REPO / "plugins" / "mpt-instruct")], check=True)
    total = sum(f.stat().st_size for f in out.glob("*.whl"))
    for wheel in sorted(out.glob("*.whl")):
        print(f"{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
    print(f"{total / 2**20:7.2f} MiB  in {len(list(out.glob('*.whl')))} wheels "
          f"(limit {SIZE_LIMIT / 2**20:.0f} MiB)")
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu.wheels", description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder for the wheels")
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default 3.12)")
    args = p.parse_args(argv)
    return 0 if build(args.out, args.python_version) <= SIZE_LIMIT else 1


if __name__ == "__main__":
    raise SystemExit(main())
