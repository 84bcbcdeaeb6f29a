"""src.utils.malloc: the entry points restart once with glibc malloc tunables."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from src.utils.malloc import MALLOC_TUNABLES, tuned_environment

ROOT = Path(__file__).resolve().parents[1]
GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="glibc tunables exist only on Linux with glibc")
def test_tuned_environment_adds_the_tunables_once() -> None:
    env = tuned_environment({"PATH": "/bin"})
    assert env == {
        "PATH": "/bin",
        "GLIBC_TUNABLES": MALLOC_TUNABLES,
        "SSD_MALLOC_TUNING": "done",
    }
    assert tuned_environment(env) is None  # after the restart: no second one


def test_tuned_environment_respects_the_user() -> None:
    assert tuned_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) is None
    assert tuned_environment({"SSD_MALLOC_TUNING": "0"}) is None


@pytest.mark.skipif(not GLIBC, reason="glibc tunables exist only on Linux with glibc")
def test_reexec_keeps_the_process_and_its_arguments(tmp_path: Path) -> None:
    script = tmp_path / "entry.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from src.utils.malloc import reexec_with_malloc_tunables\n"
        "print('start', os.getpid(), flush=True)\n"
        "reexec_with_malloc_tunables()\n"
        "print('run', os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "SSD_MALLOC_TUNING")}
    out = subprocess.run(
        [sys.executable, str(script), "a=1", "b=two words"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    # printed twice before the restart (once per image of the process), once after
    starts = [line for line in out if line.startswith("start")]
    runs = [line for line in out if line.startswith("run")]
    assert len(starts) == 2 and len(set(starts)) == 1
    pid = starts[0].split()[1]
    assert runs == [f"run {pid} {MALLOC_TUNABLES} ['a=1', 'b=two words']"]

    opted_out = subprocess.run(
        [sys.executable, str(script)],
        env={**env, "SSD_MALLOC_TUNING": "0"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert len(opted_out) == 2 and opted_out[1].endswith("None []")


@pytest.mark.parametrize("module", ["train", "eval", "predict"])
def test_entry_points_restart_before_torch_is_imported(module: str) -> None:
    """`python -m src.<module>` calls the restart before its first import of anything else."""
    import ast

    tree = ast.parse((ROOT / "src" / f"{module}.py").read_text())
    body = [
        n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))
    ]
    body = [n for n in body if not (isinstance(n, ast.ImportFrom) and n.module == "__future__")]
    first = body[0]
    assert isinstance(first, ast.If) and ast.unparse(first.test) == "__name__ == '__main__'"
    calls = [ast.unparse(n) for n in ast.walk(first) if isinstance(n, ast.Call)]
    assert calls == ["reexec_with_malloc_tunables()"]
