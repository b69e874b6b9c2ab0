"""Packaging: the wheel maps kernels/ to sema.kernels, and sema imports and runs with
neither triton nor the compiled extension."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BLOCKER = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton.") or name == "sema._C":
            raise ImportError(f"blocked for the test: {name}")
sys.meta_path.insert(0, Block())
"""

USE_WITHOUT_OPTIONAL = """
import torch, sema
report = sema.available_backends("cpu")
assert report["torch"][0], report
assert not report["cpp"][0] and "blocked" in report["cpp"][1], report["cpp"]
assert not report["triton"][0], report["triton"]
model = torch.nn.Linear(4, 3)
ema = sema.SwitchEMA(model, decay=0.5)
ema.update(); ema.epoch_end()
with ema.swapped():
    pass
print("ok", ema.step)
"""


def run_python(code: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_import_works_without_triton_and_extension(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = run_python(BLOCKER + USE_WITHOUT_OPTIONAL, tmp_path, env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok 1"


def test_regular_install_maps_kernels_into_the_package(tmp_path):
    """A non-editable install (no extension build) holds sema and sema.kernels."""
    target = tmp_path / "site"
    env = {**os.environ, "SEMA_BUILD_EXT": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(ROOT)],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    if install.returncode != 0 and "No module named pip" in install.stderr:
        pytest.skip("pip is not available in this interpreter")
    assert install.returncode == 0, install.stderr[-3000:]
    assert (target / "sema" / "kernels" / "__init__.py").is_file()
    assert (target / "sema" / "integrations" / "lightning.py").is_file()
    code = (
        f"import sys; sys.path.insert(0, {str(target)!r})\n"
        "import sema, sema.kernels\n"
        f"assert sema.__file__.startswith({str(target)!r}), sema.__file__\n"
        "print(sema.__version__)"
    )
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
