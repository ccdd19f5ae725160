"""The README's example environment runs as written and passes the conformance check."""

from __future__ import annotations

import re
import shlex
import textwrap
from pathlib import Path

from agentopd import registry
from agentopd.conformance import check_env_conformance

README = Path(__file__).resolve().parent.parent / "README.md"
TOP_DIRS = {
    "agentopd",
    "benchmarks",
    "docs",
    "tests",
    ".ci",
}


def test_readme_example_env_passes_conformance():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    example = next(b for b in blocks if "class Echo(Env)" in b)
    namespace: dict = {}
    code = example.replace('register("echo", entry_point="my_pkg.envs:Echo")', "")
    exec(compile(textwrap.dedent(code), "README-example", "exec"), namespace)
    registry.envs.register("readme-echo", namespace["Echo"])
    try:
        report = check_env_conformance("readme-echo", n_episodes=3)
        assert report.ok, str(report)
    finally:
        registry.envs.unregister("readme-echo")


def test_readme_opens_with_the_two_commands():
    text = README.read_text()
    commands = re.findall(r"```bash\n(.*?)```", text, re.S)[:2]
    assert (
        "pip install torch==2.13.0 -e '.[dev]'" in commands[0]
        and "agentopd train env=code-sandbox" in commands[0]
    )
    assert commands[1].strip() == ". .venv/bin/activate && pytest"
    assert ". .venv/bin/activate && pytest" in (README.parent / ".ci" / "run").read_text()


def _readme_commands() -> list[list[str]]:
    """Every ``agentopd ...`` invocation in the README's bash blocks, as argv lists."""
    calls = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.splitlines():
            for part in re.split(r"\s*(?:;|&&)\s*", line.split("#", 1)[0]):
                words = shlex.split(part)
                if words[:1] == ["agentopd"]:
                    calls.append(words[1:])
    return calls


def test_readme_commands_exist():
    """Every `agentopd` command the README shows is a real subcommand with valid flags."""
    from agentopd.cli import build_parser

    calls = _readme_commands()
    assert len(calls) >= 10, calls
    for argv in calls:
        try:
            build_parser().parse_args(argv)
        except SystemExit as e:  # argparse exits on an unknown command or flag
            raise AssertionError(
                f"README command `agentopd {' '.join(argv)}` does not parse"
            ) from e


def test_readme_links_and_paths_exist():
    """Markdown links and backticked repository paths in the README point at real files."""
    root = README.parent
    text = README.read_text()
    links = re.findall(r"\]\(([^)#\s]+)", text)
    paths = [p for p in re.findall(r"`([\w./-]+)`", text) if p.split("/")[0] in TOP_DIRS]
    assert links and paths
    missing = [p for p in links + paths if not (root / p).exists()]
    assert not missing, f"README names paths that do not exist: {missing}"
