"""The JIT build of the C++ extension: what it compiles, and the cache keyed by sources and flags
(issue 15 item 1, issue 16 item 8).

The real builds here compile only csrc/bnfused.cpp (the op schemas), in throwaway copies of the
package, so they take seconds, not the minutes of the whole extension.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bnfused.backends import native

ROOT = Path(__file__).resolve().parents[1]


# A second source of the schemas-only copies, with no headers: editing it recompiles that file alone.
_SMALL_SOURCE = "int bnfused_build_test_value() { return 1; }\n"


def _copy_tree(dest: Path, comment: str, full: bool = False) -> Path:
    """A copy of the bnfused package and of csrc/ (all of it, or the schemas and _SMALL_SOURCE), one
    comment apart."""
    shutil.copytree(ROOT / "bnfused", dest / "bnfused", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    if full:
        shutil.copytree(ROOT / "csrc", dest / "csrc")
    else:
        (dest / "csrc").mkdir()
        shutil.copy2(ROOT / "csrc" / "bnfused.cpp", dest / "csrc" / "bnfused.cpp")
        (dest / "csrc" / "small.cpp").write_text(_SMALL_SOURCE)
    with open(dest / "csrc" / "bnfused.cpp", "a") as f:
        f.write(f"// {comment}\n")
    return dest


def _native_of(tree: Path):
    """That copy's bnfused/backends/native.py, loaded by path (it imports nothing from bnfused)."""
    spec = importlib.util.spec_from_file_location(f"native_{tree.name}", tree / "bnfused" / "backends" / "native.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up
    spec.loader.exec_module(module)
    return module


def test_item08_build_key_follows_source_contents_and_flags(tmp_path):
    a = _native_of(_copy_tree(tmp_path / "a", "tree a"))
    same = _native_of(_copy_tree(tmp_path / "same", "tree a"))
    b = _native_of(_copy_tree(tmp_path / "b", "tree b"))
    trees = {"a": a, "same": same, "b": b}
    kwargs = {tree: m.extension_kwargs(with_cuda=False, csrc=m.CSRC) for tree, m in trees.items()}
    key_a = a.build_key(kwargs["a"], a.CSRC)
    assert key_a == same.build_key(kwargs["same"], same.CSRC), "equal sources in two places must share a build"
    assert key_a != b.build_key(kwargs["b"], b.CSRC), "different sources must not share a build"
    flagged = dict(kwargs["a"], extra_cflags=[*kwargs["a"]["extra_cflags"], "-DEXTRA"])
    assert key_a != a.build_key(flagged, a.CSRC), "different flags must not share a build"
    assert key_a == a.build_key(kwargs["a"], a.CSRC), "the key must be stable"
    (a.CSRC / "extra.h").write_text("// a header the sources may include\n")
    assert key_a != a.build_key(kwargs["a"], a.CSRC), "headers are sources too"


_BUILD_SCRIPT = textwrap.dedent(
    """
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("native_copy", sys.argv[1])
    native = sys.modules["native_copy"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(native)
    native._import_prebuilt = lambda: False  # the copy has no bnfused._C; never import the real bnfused
    lib = native.library()
    assert lib.error is None, lib.error
    print("OK", native.extensions_root())
    """
)


def _load_copy(tree: Path, extensions_dir: Path) -> str:
    """Loads (building if needed) a copy's extension in a fresh process; returns its stderr."""
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(extensions_dir), BNFUSED_BUILD_CUDA="0")
    script = tree / "load.py"
    script.write_text(_BUILD_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(tree / "bnfused" / "backends" / "native.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-3000:]
    return done.stderr


@pytest.mark.slow
def test_item08_two_trees_share_a_cache_without_rebuilding_each_other(tmp_path):
    extensions = tmp_path / "extensions"
    tree_a = _copy_tree(tmp_path / "a", "tree a")
    tree_b = _copy_tree(tmp_path / "b", "tree b")
    assert "compiling the extension (C++ CPU kernels only" in _load_copy(tree_a, extensions)
    assert "compiling the extension" in _load_copy(tree_b, extensions)
    folders = sorted(extensions.iterdir())
    assert len(folders) == 2, folders
    built = {d: (d / f"{d.name.rsplit('_', 1)[0]}.so").stat().st_mtime_ns for d in folders}
    # Each tree again, after the other was built: neither compiles, nor touches a library.
    for tree in (tree_a, tree_b):
        assert "compiling" not in _load_copy(tree, extensions)
    assert {d: (d / f"{d.name.rsplit('_', 1)[0]}.so").stat().st_mtime_ns for d in folders} == built
    # An edit gets a folder of its own, seeded from the tree's last build: only what changed compiles.
    with open(tree_a / "csrc" / "small.cpp", "a") as f:
        f.write("// edited\n")
    assert "compiling" in _load_copy(tree_a, extensions)
    (edited,) = set(extensions.iterdir()) - set(folders)
    (first_a,) = [
        d for d in folders if (d / "bnfused.o").stat().st_mtime_ns == (edited / "bnfused.o").stat().st_mtime_ns
    ]
    assert (edited / "small.o").stat().st_mtime_ns > (first_a / "small.o").stat().st_mtime_ns


def test_jit_build_compiles_cuda_only_when_a_gpu_is_visible_or_asked_for(monkeypatch):
    monkeypatch.setattr(native, "cuda_toolkit", lambda: ("/opt/cuda", None))
    monkeypatch.delenv(native.BUILD_CUDA_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    home, reason = native.jit_cuda_plan()
    assert home is None and "no GPU was visible" in reason and native.BUILD_CUDA_ENV in reason
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert native.jit_cuda_plan() == ("/opt/cuda", None)
    monkeypatch.setenv(native.BUILD_CUDA_ENV, "0")
    assert native.jit_cuda_plan()[0] is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(native.BUILD_CUDA_ENV, "1")
    assert native.jit_cuda_plan() == ("/opt/cuda", None)
    monkeypatch.setenv(native.BUILD_CUDA_ENV, "yes")
    with pytest.raises(ValueError, match="BNFUSED_BUILD_CUDA must be 1"):
        native.jit_cuda_plan()
    monkeypatch.setattr(native, "cuda_toolkit", lambda: (None, "no CUDA toolkit found"))
    monkeypatch.setenv(native.BUILD_CUDA_ENV, "1")
    assert native.jit_cuda_plan() == (None, "no CUDA toolkit found")


def test_build_message_estimates_the_time():
    cpu = native.extension_kwargs(with_cuda=False)
    assert "_cuda" not in cpu["name"] and not any(s.endswith(".cu") for s in cpu["sources"])
    assert native.build_estimate(cpu).startswith("about ")
    cuda = native.extension_kwargs(with_cuda=True)
    assert any(s.endswith(".cu") for s in cuda["sources"])
