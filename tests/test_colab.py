"""Colab readiness: a chapter runs in a fresh environment where `attn` is not installed.

The test builds a clean virtualenv that can see the heavy dependencies (torch,
ipykernel, ...) but not `attn`, registers a kernel for it, and executes a
chapter with papermill. The chapter's first cell must notice that `attn` is
missing and pip-install it from ATTN_INSTALL_TARGET, pointed here at a copy of
this checkout (in Colab it is the repository URL from _config.yml).
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTER = "02_self_attention"  # the quickest chapter

pytestmark = pytest.mark.slow


def _deps_without_attn(dest: Path) -> Path:
    """Symlink every installed distribution of this environment except `attn` itself."""
    dest.mkdir()
    for sp in site.getsitepackages():
        for entry in Path(sp).iterdir():
            name = entry.name.lower()
            if name.startswith(("attn", "__editable__")) or entry.suffix == ".pth" or (dest / entry.name).exists():
                continue
            (dest / entry.name).symlink_to(entry)
    return dest


def test_chapter_installs_attn_and_runs_in_a_clean_environment(tmp_path):
    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    py = env_dir / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    deps = _deps_without_attn(tmp_path / "deps")
    (Path(purelib) / "shared_deps.pth").write_text(str(deps) + "\n")
    probe = subprocess.run([str(py), "-c", "import importlib.util as u; print(u.find_spec('attn') is None, u.find_spec('torch') is not None)"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert probe.stdout.split() == ["True", "True"], probe.stdout + probe.stderr

    # a kernel running the clean interpreter
    kernels = tmp_path / "jupyter" / "kernels" / "clean"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps(
        {"argv": [str(py), "-m", "ipykernel_launcher", "-f", "{connection_file}"], "display_name": "clean", "language": "python"}))

    # the install target: a copy of this checkout's sources (no build outputs, no venv)
    src = tmp_path / "checkout"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", "_build", ".git", "*.egg-info", "build", "__pycache__", ".pytest_cache"))

    env = {**os.environ, "JUPYTER_PATH": str(tmp_path / "jupyter"), "ATTN_INSTALL_TARGET": str(src)}
    out = tmp_path / "out.ipynb"
    proc = subprocess.run(
        [sys.executable, "-m", "papermill", str(ROOT / "notebooks" / f"{CHAPTER}.ipynb"), str(out),
         "-k", "clean", "--cwd", str(tmp_path), "-p", "bench_time", "0.05", "-p", "bench_len", "256"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    installed = subprocess.run([str(py), "-c", "import attn, sys; print(attn.__file__)"], capture_output=True, text=True, cwd=tmp_path)
    assert installed.returncode == 0 and str(env_dir) in installed.stdout, installed.stdout + installed.stderr
