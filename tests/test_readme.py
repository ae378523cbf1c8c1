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


def _quick_start_commands():
    text = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"## Quick start \(two commands\)\n\n```bash\n(.*?)```", text, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.strip().splitlines()]


def test_readme_two_commands_are_what_ci_runs():
    """The README's first command sets up and runs the main job; its second is the test command
    .ci/run runs (in the fresh virtual environment it creates)."""
    setup, tests = _quick_start_commands()
    assert setup.startswith("python3 -m venv .venv && ") and '-e ".[test]"' in setup
    assert setup.endswith("sedflow-jax demo --out run1")
    ci = (Path(__file__).parents[1] / ".ci" / "run").read_text()
    assert tests.startswith(".venv/bin/python -m pytest")
    assert tests.replace(".venv/bin/", "") in ci.splitlines()
    from sedflow_jax.cli.parser import build_parser

    demo = build_parser().parse_args(setup.split("&& ")[-1].split()[1:])  # the demo's flags parse
    assert demo.command == "demo" and demo.out == "run1"


def test_readme_my_catalog_command_parses_and_names_a_real_file():
    text = (Path(__file__).parents[1] / "README.md").read_text()
    cmd = re.search(r"### My catalog.*?```bash\n(.*?)```", text, re.S).group(1).strip()
    args = cmd.split()[1:]
    from sedflow_jax.cli.parser import build_parser

    a = build_parser().parse_args(args)
    assert a.command == "infer" and a.model is None
    assert (Path(__file__).parents[1] / a.catalog).is_file()
