"""agentopd: on-policy distillation of LLM agents in multi-turn tool-use environments.

What a user imports to write a new environment::

    from agentopd import Env, Task, tool, register, make
"""

from agentopd.env import Env, Task, answered_call_log, answered_calls
from agentopd.parsing import Parsed, format_tool_call, parse_assistant
from agentopd.registry import list_registered, make, register, spec
from agentopd.tooling import Tool, ToolError, ToolResult, Toolset, tool
from agentopd.types import Episode, Message, Segment, StopReason, ToolCall, Turn

__version__ = "0.1.0"

__all__ = [
    "Env",
    "Episode",
    "Message",
    "Parsed",
    "Segment",
    "StopReason",
    "Task",
    "Tool",
    "ToolCall",
    "ToolError",
    "ToolResult",
    "Toolset",
    "Turn",
    "answered_call_log",
    "answered_calls",
    "format_tool_call",
    "list_registered",
    "make",
    "parse_assistant",
    "register",
    "spec",
    "tool",
]
