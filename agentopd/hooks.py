"""Named points of the training loop that a caller may hook (tests kill the process there).

The trainer calls :meth:`TrainerHooks.point` at each point below; the default does nothing.
``where`` is ``<phase>:<detail>``:

* ``cold_start:<i>``: after cold-start SFT step ``i`` was logged;
* ``train:<step>``: after training step ``step`` was logged (before its checkpoint);
* ``checkpoint:<step>``: after the checkpoint of ``step`` was written;
* ``eval:<tag>``: after an evaluation row was logged (``eval:after cold start``).

Example::

    class Count(TrainerHooks):
        def __init__(self):
            self.seen = []

        def point(self, where):
            self.seen.append(where)

    train(cfg, hooks=Count())
"""

from __future__ import annotations

import os
import signal

from agentopd import distributed


class TrainerHooks:
    """Callbacks at named points of the loop; every one a no-op here."""

    def point(self, where: str) -> None:
        """The loop has reached ``where`` (see the module docstring for the names)."""


class KillAt(TrainerHooks):
    """SIGKILL this process at the point ``where`` (crash tests). Under torchrun rank 0 is
    killed there, and torchrun stops the others.

    ``agentopd train`` installs it when the environment variable :data:`KILL_AT_ENV` is set
    (:func:`from_env`), so that a test can kill a training subprocess at a given point.
    """

    def __init__(self, where: str):
        self.where = where

    def point(self, where: str) -> None:
        if where == self.where and distributed.launched_rank() == 0:
            os.kill(os.getpid(), signal.SIGKILL)


KILL_AT_ENV = "AGENTOPD_KILL_AT"
"""``AGENTOPD_KILL_AT=<where>`` makes ``agentopd train`` kill itself at ``where``."""


def from_env() -> TrainerHooks:
    """:class:`KillAt` when :data:`KILL_AT_ENV` is set, else the no-op hooks."""
    where = os.environ.get(KILL_AT_ENV)
    return KillAt(where) if where else TrainerHooks()
