"""What a user's first install meets: DeepSpeed's own setup.py on a GPU machine without a CUDA toolkit, and
gptoss's torch floor. The DeepSpeed test runs the real setup.py of the installed version (its sdist from PyPI)
under a torch that claims a GPU and has no CUDA_HOME, once as `scripts/setup.sh` runs it and once without."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from importlib.metadata import version
from pathlib import Path

import pytest

import gptoss

REPO = Path(__file__).resolve().parents[2]
SETUP_SH = REPO / "scripts" / "setup.sh"

# A torch that sees one Hopper GPU and no CUDA toolkit: what a pip-installed CUDA torch looks like on most machines.
FAKE_GPU_WITHOUT_TOOLKIT = """
import torch, torch.utils.cpp_extension as ext
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
ext.CUDA_HOME = None
"""


def deepspeed_install_env() -> dict[str, str]:
    """The environment scripts/setup.sh installs DeepSpeed with (its DEEPSPEED_INSTALL_ENV array)."""
    out = subprocess.run(["bash", "-c", f'eval "$(grep "^DEEPSPEED_INSTALL_ENV=" {SETUP_SH})"; '
                          'printf "%s\\n" "${DEEPSPEED_INSTALL_ENV[@]}"'], capture_output=True, text=True, check=True)
    return dict(line.split("=", 1) for line in out.stdout.split())


@pytest.fixture(scope="module")
def deepspeed_sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ds_version = version("deepspeed")
    dest = tmp_path_factory.mktemp("sdist")
    got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                          "-d", str(dest), f"deepspeed=={ds_version}"], capture_output=True, text=True, timeout=300)
    archives = list(dest.glob("deepspeed-*.tar.gz"))
    if got.returncode != 0 or not archives:
        pytest.skip(f"could not download the deepspeed {ds_version} sdist from the package index: {got.stderr[-300:]}")
    with tarfile.open(archives[0]) as tar:
        tar.extractall(dest, filter="data")
    return dest / f"deepspeed-{ds_version}"


def run_deepspeed_setup(src: Path, tmp_path: Path, extra_env: dict[str, str]) -> subprocess.CompletedProcess:
    (tmp_path / "sitecustomize.py").write_text(FAKE_GPU_WITHOUT_TOOLKIT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DS_")}
    env.update(PYTHONPATH=str(tmp_path), **extra_env)
    return subprocess.run([sys.executable, "setup.py", "--version"], cwd=src, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_deepspeed_installs_on_a_gpu_machine_without_cuda_toolkit(deepspeed_sdist: Path, tmp_path: Path) -> None:
    plain = run_deepspeed_setup(deepspeed_sdist, tmp_path, {})
    assert plain.returncode != 0 and "MissingCUDAException" in plain.stderr  # the failure users would meet
    ours = run_deepspeed_setup(deepspeed_sdist, tmp_path, deepspeed_install_env())
    assert ours.returncode == 0, ours.stderr[-2000:]
    assert version("deepspeed") in ours.stdout.split()
    assert "ext_modules=[]" in ours.stdout  # nothing compiled


def test_setup_installs_deepspeed_with_that_environment() -> None:
    assert deepspeed_install_env() == {"DS_ACCELERATOR": "cpu", "DS_BUILD_OPS": "0"}
    command = " ".join(SETUP_SH.read_text().split("\\\n"))  # continuation lines joined
    install = [line for line in command.splitlines() if '--no-build-isolation "$DEEPSPEED_SPEC"' in line]
    assert len(install) == 1 and 'env "${DEEPSPEED_INSTALL_ENV[@]}"' in install[0]


@pytest.mark.parametrize(("found", "ok"), [("2.9.1+cu128", False), ("2.8.0", False), ("1.13.1", False),
                                           ("2.10.0", True), ("2.13.0+cpu", True), ("2.10.0.dev20250901", True),
                                           ("3.0.0", True)])
def test_torch_floor(found: str, ok: bool) -> None:
    problem = gptoss.torch_version_problem(found)
    assert (problem is None) == ok
    if not ok:
        assert problem.startswith(f"gptoss needs torch >= 2.10, found torch {found}")


def test_torch_floor_matches_pyproject() -> None:
    floor = re.search(r'"torch>=(\d+)\.(\d+)"', (REPO / "pyproject.toml").read_text())
    assert floor is not None and (int(floor[1]), int(floor[2])) == gptoss.TORCH_FLOOR


def test_import_refuses_an_old_torch_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(
        "import importlib.metadata as m\n_v = m.version\n"
        "m.version = lambda name: '2.9.1+cu128' if name == 'torch' else _v(name)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    got = subprocess.run([sys.executable, "-c", "import gptoss"], env=env, capture_output=True, text=True)
    assert got.returncode != 0
    assert got.stderr.strip().splitlines()[-1] == (
        "ImportError: gptoss needs torch >= 2.10, found torch 2.9.1+cu128 (its fused loss calls torch.addmm with "
        "out_dtype, new in 2.10): pip install 'torch>=2.10'")
