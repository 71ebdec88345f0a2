"""The README's Python examples run as written (in a fresh interpreter: the
torch example makes a gloo group, which must not live in the test process)."""
import os
import re
import subprocess
import sys

import pytest

from helpers import child_env

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


@pytest.mark.skipif(not os.path.exists(README), reason="README not available")
def test_readme_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", open(README).read(), re.S)
    assert blocks, "no python example in README.md"
    env = child_env()
    for code in blocks:
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, f"README block failed:\n{code}\n{run.stderr[-3000:]}"
