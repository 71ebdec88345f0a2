"""The README's Python example runs as written."""
import os
import re

import pytest

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


@pytest.mark.skipif(not os.path.exists(README), reason="README not available")
def test_readme_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", open(README).read(), re.S)
    assert blocks, "no python example in README.md"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
