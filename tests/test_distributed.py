"""The learner under ``torchrun`` (gloo, 2 CPU processes) equals one process on the same batch.

Each rank takes its shard of one fixed batch of scored episodes (:func:`agentopd.distributed.shard`)
and makes one :class:`~agentopd.learner.Learner` step (SGD, the default OPD optimizer; AdamW's
first step divides each gradient by its own magnitude, which turns float rounding of near-zero
gradients into differences of ~1e-5); the weights afterwards must equal, within
:data:`ATOL`, those of one process stepping on the whole batch, and be the same on both ranks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agentopd import distributed, zoo

ATOL = 1e-6
WORKER = r"""
import sys, torch
from agentopd import distributed, zoo
from agentopd.learner import Learner, LearnerConfig
from agentopd.renderer import Renderer
from agentopd.rollout import EpisodeJob, expert_episodes
from agentopd.teachers.hf import HFTeacher
from agentopd.teachers import TeacherConfig

torch.set_num_threads(1)
w = distributed.setup()
renderer = Renderer(zoo.load_tokenizer())
jobs = [EpisodeJob("lookup-chain", s, {"split": "train"}, {"hops": 1 + s % 3}) for s in range(6)]
episodes = expert_episodes(jobs, renderer)
HFTeacher(zoo.build_model("tiny", seed=7), renderer, TeacherConfig(topk=4)).score(episodes)
model = zoo.build_model("tiny", seed=0)
cfg = LearnerConfig(name="sgd", lr=0.5, micro_batch=2)
learner = Learner(model, cfg, renderer.pad_id, loss=sys.argv[2], topk=4)
learner.step(distributed.shard(episodes, w))
if w.is_main:
    torch.save(model.state_dict(), sys.argv[1])
distributed.teardown()
"""


def _run(cmd: list[str], tmp: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tmp_path, loss="rkl-topk"):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    single, ddp = tmp_path / "single.pt", tmp_path / "ddp.pt"
    _run([sys.executable, str(script), str(single), loss], tmp_path)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    _run([*torchrun, str(script), str(ddp), loss], tmp_path)
    a, b = torch.load(single), torch.load(ddp)
    start = zoo.build_model("tiny", seed=0).state_dict()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    print(f"{loss}: max |2 ranks - 1 process| = {worst:.2e}; the step moved weights by {moved:.2e}")
    assert moved > 100 * ATOL, "the step barely changed the weights; the comparison is empty"
    assert worst < ATOL


def test_one_process_is_a_no_op():
    w = distributed.setup()
    assert (w.rank, w.size, w.is_main) == (0, 1, True)
    assert distributed.shard([1, 2, 3], w) == [1, 2, 3]
    assert distributed.all_sum(5) == 5
    model = torch.nn.Linear(2, 2)
    model(torch.ones(1, 2)).sum().backward()
    before = model.weight.grad.clone()
    distributed.sum_gradients(model)
    assert torch.equal(model.weight.grad, before)
