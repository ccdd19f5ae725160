"""verifiers' ``null`` chat harness, run in this process (for :mod:`agentopd.envs.adapters.verifiers`).

verifiers' ``null`` harness is a PEP 723 script (verifiers' own ``mcp``, ``compaction`` and
``core`` helpers bundled together) that verifiers installs with ``uv`` (network) and runs as a
subprocess per segment. verifiers' ``Harness`` contract allows a harness to run its loop in process
instead, as long as every model call goes through the rollout's interception endpoint. This module
loads that same script as a module and registers a harness that calls its chat loop, so nothing is
downloaded and no interpreter starts per turn.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from typing import Any

from agentopd.config import ConfigError

CHAT_PROGRAM_PACKAGES = ("openai", "mcp", "httpx", "httpx2", "tenacity", "certifi")
"""What the ``null`` harness's chat program imports (its PEP 723 dependencies)."""

_chat_module: types.ModuleType | None = None
HARNESS_ID = "agentopd_vf_inprocess_null"
"""The verifiers harness id under which :func:`harness_id` registers the in-process ``null`` harness."""


def chat_program() -> types.ModuleType:
    """verifiers' bundled chat program (the ``null`` harness's script), loaded as a module.

    The script is verifiers' own ``mcp``, ``compaction`` and ``core`` helpers concatenated; its
    ``__main__`` entry point stays inert, and ``InProcessNullHarness`` calls its chat loop.
    """
    global _chat_module
    if _chat_module is None:
        missing = [p for p in CHAT_PROGRAM_PACKAGES if importlib.util.find_spec(p) is None]
        if missing:
            raise ConfigError(
                f"verifiers: the null harness's chat loop needs {', '.join(missing)}; install "
                "them with: pip install 'agentopd[verifiers]'"
            )
        from verifiers.v1.harnesses.utils.launch import CHAT_PROGRAM_SOURCE

        module = types.ModuleType("agentopd_vf_chat_program")
        exec(compile(CHAT_PROGRAM_SOURCE, "<verifiers null chat program>", "exec"), module.__dict__)
        _chat_module = module
    return _chat_module


def harness_id() -> str:
    """Register (once) a verifiers plugin module exporting the in-process ``null`` harness."""
    if HARNESS_ID in sys.modules:
        return HARNESS_ID
    from verifiers.v1.harnesses.null import NullHarness
    from verifiers.v1.runtimes import ProgramResult

    class InProcessNullHarness(NullHarness):
        """verifiers' ``null`` harness with its chat loop run in this process.

        verifiers installs the ``null`` harness's program with ``uv`` (network) and runs it as a
        subprocess; its docs allow a harness to run its loop in-process instead, as long as
        every model call goes through the rollout's interception endpoint. This one runs the
        very same chat loop (the program's own code), so nothing is downloaded and no
        interpreter starts per turn.
        """

        async def setup(self, runtime: Any) -> None:
            chat_program()

        async def launch(
            self,
            ctx: Any,
            trace: Any,
            runtime: Any,
            endpoint: str,
            secret: str,
            mcp_urls: dict[str, str],
            data: Any,
            tool_interception_url: str | None = None,
        ) -> Any:
            import argparse
            import traceback

            from openai import AsyncOpenAI
            from verifiers.v1.dialects.chat import message_to_wire

            if mcp_urls:
                return ProgramResult(
                    exit_code=2, stdout="", stderr="MCP tool servers are not mapped"
                )
            program = chat_program()
            system_prompt, prompt = self.resolve_prompt(data)
            messages: list[dict] = (
                [{"role": "system", "content": system_prompt}] if system_prompt else []
            )
            if isinstance(prompt, str):
                messages.append({"role": "user", "content": prompt})
            elif prompt is not None:
                messages.extend(message_to_wire(m) for m in prompt)
            args = argparse.Namespace(
                tool_interception_url=tool_interception_url or "",
                api_key=secret,
                bash=False,
                edit=False,
                search=False,
                serper_key="",
            )
            client = AsyncOpenAI(base_url=endpoint, api_key=secret, max_retries=0)
            try:
                compactor = program.Compactor(client, ctx.model, [], False, None)
                compactor.note_good(messages)
                await program.run_chat_loop(args, compactor, messages, {}, {}, None)
            except SystemExit as e:  # the program's "model transport failed" exit
                code = e.code if isinstance(e.code, int) else 1
                return ProgramResult(exit_code=code, stdout="", stderr=traceback.format_exc())
            except Exception:  # noqa: BLE001 - a program failure is its exit status, as for a subprocess
                return ProgramResult(exit_code=1, stdout="", stderr=traceback.format_exc())
            finally:
                await client.close()
            return ProgramResult(exit_code=0, stdout="", stderr="")

    module = types.ModuleType(HARNESS_ID, "agentopd: verifiers' null harness, in process")
    vars(module).update(InProcessNullHarness=InProcessNullHarness, __all__=["InProcessNullHarness"])
    sys.modules[HARNESS_ID] = module
    return HARNESS_ID
