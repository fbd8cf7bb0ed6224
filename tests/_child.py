"""The environment for a test's Python child process.

CI installs pyrnn and runs the tests from a clean clone whose source tree has no compiled core:
a child must import the pyrnn this test process imported, not the tree it happens to start in.
"""

from __future__ import annotations

import os

import pyrnn


def child_env(**extra: str) -> dict[str, str]:
    """os.environ with PYTHONPATH set to the folder holding the imported pyrnn, and the child's
    working folder kept off its sys.path (PYTHONSAFEPATH)."""
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(pyrnn.__file__)))
    return {**os.environ, "PYTHONSAFEPATH": "1", "PYTHONPATH": package_parent, **extra}
