"""The README's Python quick start runs as written."""
import re
from pathlib import Path


def test_readme_python_block_runs():
    text = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"## Python\n\n```python\n(.*?)```", text, re.S).group(1)
    ns = {}
    exec(compile(block, "README.md", "exec"), ns)
    assert ns["nmgy"].shape == (5,) and float(ns["grad"][0]) > 0
    assert abs(float(ns["mags"][2]) - (22.5 - 2.5 * __import__("math").log10(float(ns["nmgy"][2])))) < 1e-4
