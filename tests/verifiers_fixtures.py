"""verifiers (``verifiers.v1``) envs built the way its docs and ``vf-init`` scaffold build them.

For tests/test_adapter_verifiers.py, named as ``verifiers:verifiers_fixtures:<Taskset>[:<Env>]``
(the tests put ``tests/`` on ``PYTHONPATH`` for subprocesses). A separate module from
``adapter_fixtures`` so that loading these does not import OpenEnv (and gradio) too.

* :class:`WordTaskset`: single turn, "reply with the word backwards", a ``@vf.reward``.
* :class:`RetryEnv`: a one-seat ``vf.Env`` over :class:`WordTaskset` that answers a wrong reply
  with "Not quite, try again." (up to three replies): a multi-turn exchange without tools.
* :class:`RewritingTaskset`: the same task with a ``@vf.intercept`` response hook that replaces
  the model's reply before the harness stores it. Not token-exact; agentopd refuses it.
* :class:`ExplodingTaskset`: its reward raises for odd task indices (a foreign env failing
  mid-episode).
* :class:`ToolTaskset`: a task with a tool server, which the adapter refuses when it is built.
* :class:`DuetEnv`: two seats that both use the run's model, refused when built.
* :class:`CasedTaskset`: a taskset whose config has a required ``Literal`` field (``letters``),
  the shape of verifiers' own ``textarena`` taskset (``game``): set with
  ``env_kwargs.taskset.letters=...``.
"""

from __future__ import annotations

from typing import Literal

import verifiers.v1 as vf

WORDS = ["apple", "pear", "plum", "fig", "kiwi", "lime"]


class WordData(vf.TaskData):
    """One row: the word to reverse."""

    word: str = ""


class WordTask(vf.Task[WordData]):
    """Reward 1 when the last reply is the word backwards."""

    @vf.reward(weight=1.0)
    async def reversed_word(self, trace: vf.Trace) -> float:
        return float(trace.last_reply.strip() == self.data.word[::-1])


class WordTaskset(vf.Taskset[WordTask, vf.TasksetConfig]):
    """Six tasks, one per word."""

    def load(self) -> list[WordTask]:
        return [
            WordTask(
                WordData(
                    prompt=f"Write the word {w!r} backwards. Reply with that word only.",
                    system_prompt="You are a careful speller.",
                    word=w,
                ),
                self.config.task,
            )
            for w in WORDS
        ]


class RetryEnv(vf.Env[vf.SingleAgentEnvConfig]):
    """One seat; a wrong reply gets "Not quite, try again." until three replies were made."""

    async def run(self, task: vf.Task, agents: vf.Agents) -> None:
        async with agents.agent.interaction(task) as chat:
            segment = await chat.turn()
            for _ in range(2):
                if segment.terminated or chat.trace.last_reply.strip() == task.data.word[::-1]:
                    break
                segment = await chat.turn("Not quite, try again.")


class RewritingTask(WordTask):
    """Replaces every reply with "(reply withheld)" before the harness stores it.

    verifiers lets a response ``@vf.intercept`` replace the assistant message, so the
    conversation the env continues from (and the trace it scores) is not the text the model
    sampled. (verifiers itself refuses request hooks that rewrite earlier messages.)
    """

    @vf.intercept
    async def withhold_reply(self, response: vf.Response) -> vf.Response | None:
        message = vf.AssistantMessage(content="(reply withheld)")
        return response.model_copy(update={"message": message})


class RewritingTaskset(vf.Taskset[RewritingTask, vf.TasksetConfig]):
    """:class:`WordTaskset`'s rows with :class:`RewritingTask`."""

    def load(self) -> list[RewritingTask]:
        return [RewritingTask(t.data, self.config.task) for t in WordTaskset(self.config).load()]


class ExplodingTask(WordTask):
    """Its reward raises for odd task indices."""

    @vf.reward(weight=1.0)
    async def reversed_word(self, trace: vf.Trace) -> float:
        if (self.data.idx or 0) % 2:
            raise RuntimeError("the foreign reward crashed")
        return float(trace.last_reply.strip() == self.data.word[::-1])


class ExplodingTaskset(vf.Taskset[ExplodingTask, vf.TasksetConfig]):
    """:class:`WordTaskset`'s rows with :class:`ExplodingTask`."""

    def load(self) -> list[ExplodingTask]:
        return [ExplodingTask(t.data, self.config.task) for t in WordTaskset(self.config).load()]


class ToolTask(WordTask):
    """A task with a tool server (an MCP toolset)."""

    @classmethod
    def toolsets(cls, config: vf.TaskConfig) -> list[vf.Toolset]:
        return [vf.Toolset(vf.ToolsetConfig())]


class ToolTaskset(vf.Taskset[ToolTask, vf.TasksetConfig]):
    """:class:`WordTaskset`'s rows with :class:`ToolTask`."""

    def load(self) -> list[ToolTask]:
        return [ToolTask(t.data, self.config.task) for t in WordTaskset(self.config).load()]


class DuetConfig(vf.EnvConfig):
    """Two seats, neither with a client of its own."""

    first: vf.AgentConfig = vf.AgentConfig()
    second: vf.AgentConfig = vf.AgentConfig()


class DuetEnv(vf.Env[DuetConfig]):
    """Both seats answer the task, one after the other."""

    async def run(self, task: vf.Task, agents: vf.Agents) -> None:
        await agents.first.run(task)
        await agents.second.run(task)


class CasedConfig(vf.TasksetConfig):
    """A required choice, as ``TextArenaConfig.game`` is."""

    letters: Literal["lower", "upper"]


class CasedTaskset(vf.Taskset[WordTask, CasedConfig]):
    """:class:`WordTaskset`'s rows, the word in the prompt written in ``config.letters``."""

    def load(self) -> list[WordTask]:
        case = str.upper if self.config.letters == "upper" else str.lower
        return [
            WordTask(
                t.data.model_copy(
                    update={"prompt": t.data.prompt.replace(t.data.word, case(t.data.word))}
                ),
                self.config.task,
            )
            for t in WordTaskset(self.config).load()
        ]
