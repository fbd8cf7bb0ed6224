"""torch stays optional: ``import pyrnn`` never imports it, and ``pyrnn.torch`` without it says
how to install it. Runs with or without torch installed."""

from __future__ import annotations

import subprocess
import sys

from _child import child_env


def run_python(code: str) -> subprocess.CompletedProcess:
    """Run code in a child Python on the pyrnn this test imported (see _child)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=child_env(), timeout=120)


def test_import_pyrnn_does_not_import_torch():
    done = run_python("import sys, pyrnn, pyrnn.functional, pyrnn.layers, pyrnn.optim, "
                      "pyrnn.checkpoint, pyrnn.cli\n"
                      "assert 'torch' not in sys.modules, 'torch was imported'\n"
                      "print('ok')")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_pyrnn_torch_without_torch_says_how_to_install_it():
    done = run_python("import sys\nsys.modules['torch'] = None  # as if not installed\n"
                      "import pyrnn.torch")
    assert done.returncode != 0
    assert "pyrnn.torch needs PyTorch" in done.stderr and "pyrnn[torch]" in done.stderr
