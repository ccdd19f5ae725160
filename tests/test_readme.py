"""The README's example environment runs as written and passes the conformance check."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

from agentopd import registry
from agentopd.conformance import check_env_conformance

README = Path(__file__).resolve().parent.parent / "README.md"


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
