"""The package ships type information (py.typed) and the README's examples
type-check with mypy against it."""
import os
import re

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
README = os.path.join(ROOT, "README.md")


def test_py_typed_is_shipped():
    assert os.path.exists(os.path.join(ROOT, "python", "lowband", "py.typed"))
    pyproject = open(os.path.join(ROOT, "pyproject.toml")).read()
    assert re.search(r'\[tool\.setuptools\.package-data\]\s*\nlowband = \["py\.typed"\]', pyproject)


@pytest.mark.skipif(not os.path.exists(README), reason="README not available")
def test_readme_examples_type_check(tmp_path):
    api = pytest.importorskip("mypy.api")
    blocks = re.findall(r"```python\n(.*?)```", open(README).read(), re.S)
    assert blocks, "no python example in README.md"
    files = []
    for i, code in enumerate(blocks):
        path = tmp_path / f"readme_example_{i}.py"
        path.write_text(code)
        files.append(str(path))
    env_path = os.environ.get("MYPYPATH")
    os.environ["MYPYPATH"] = os.path.abspath(os.path.join(ROOT, "python"))
    try:
        out, err, status = api.run(["--follow-imports=silent", "--no-incremental",
                                    "--cache-dir", str(tmp_path / "cache"),
                                    "--no-error-summary", "--show-error-codes", *files])
    finally:
        if env_path is None:
            os.environ.pop("MYPYPATH", None)
        else:
            os.environ["MYPYPATH"] = env_path
    assert status == 0, f"mypy found errors in the README examples:\n{out}{err}"
