"""``agentopd`` under ``torchrun`` (gloo, 2 CPU processes) equals one process.

- Learner level: each rank takes its shard of one fixed batch of scored episodes
  (:func:`agentopd.distributed.shard`) and makes an OPD step, an SFT step and an OPD step on a
  batch of one episode (so rank 1's shard is empty); the weights after each must equal, within
  :data:`ATOL`, one process stepping on the whole batch.
- Train level: ``torchrun -m agentopd train`` for 3 steps (an OPD step and two GKD
  demonstration steps; the teacher-token budget stops it before the 4th), killed after step 1 and resumed under torchrun, against one
  uninterrupted ``python -m agentopd train``: each step logged once with the same metrics, the
  same run directory files (rank 0 alone writes; nothing else appears), the same weights within
  :data:`ATOL`. Rollouts are greedy (``rollout.temperature=0``), so the sharded rollouts play
  the same episodes one process plays; at a temperature above 0 they would be other samples.
- A bad key exits 2 on every rank, and nothing is created.

The learner and train tests run under ``distributed.strategy=ddp`` and ``fsdp2`` (the student
sharded over the ranks; a run killed under ``fsdp2`` is also resumed under ``ddp``), and AdamW's
state goes through an ``fsdp2`` checkpoint (:func:`adamw_resume`).

SGD throughout (the default OPD optimizer): AdamW's first step divides each gradient by its own
magnitude, which turns float rounding of near-zero gradients into differences of ~1e-5.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from agentopd import distributed, zoo

ATOL = 1e-6
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _scored_episodes() -> tuple[Any, list[Any]]:
    """The renderer and 6 expert episodes scored by a tiny teacher (the same on every rank)."""
    from agentopd.renderer import Renderer
    from agentopd.rollout import EpisodeJob, expert_episodes
    from agentopd.teachers import TeacherConfig
    from agentopd.teachers.hf import HFTeacher

    renderer = Renderer(zoo.load_tokenizer())
    jobs = [
        EpisodeJob("lookup-chain", s, {"split": "train"}, {"hops": 1 + s % 3}) for s in range(6)
    ]
    episodes = expert_episodes(jobs, renderer)
    HFTeacher(zoo.build_model("tiny", seed=7), renderer, TeacherConfig(topk=4)).score(episodes)
    return renderer, episodes


def learner_steps(loss: str, strategy: str = "ddp") -> list[dict[str, torch.Tensor]]:
    """The weights after an OPD step, an SFT step and an OPD step on one episode (rank 1's shard
    empty), each rank on its shard of the same scored batch (one process: the whole batch).
    ``strategy="fsdp2"``: the student sharded over the ranks (:func:`agentopd.fsdp.shard`)."""
    from agentopd import fsdp
    from agentopd.learner import Learner, LearnerConfig

    renderer, episodes = _scored_episodes()
    model = zoo.build_model("tiny", seed=0)
    student = fsdp.shard(model) if strategy == "fsdp2" else model
    cfg = LearnerConfig(name="sgd", lr=0.5, micro_batch=2)
    opd = Learner(student, cfg, renderer.pad_id, loss=loss, topk=4)
    seq_mean = opd.loss.Config(agg="seq-mean-token-mean")
    sft = Learner(student, cfg, renderer.pad_id, loss=loss, topk=4, loss_cfg=seq_mean)
    states = []
    for step in (
        lambda: opd.step(distributed.shard(episodes)),
        lambda: sft.step_sft(distributed.shard(episodes[:5])),
        lambda: opd.step(distributed.shard(episodes[:1])),
    ):
        step()
        states.append({k: v.clone() for k, v in fsdp.full_state_dict(student).items()})
    return states


def adamw_resume(strategy: str) -> dict[str, Any]:
    """AdamW's state through a checkpoint: ``state`` (one process's format) after one OPD step,
    the weights after a second step (``two_steps``) and after the second step of a fresh model
    and learner that loaded the first step's weights and state (``resumed``)."""
    from agentopd import fsdp
    from agentopd.learner import Learner, LearnerConfig

    renderer, episodes = _scored_episodes()
    cfg = LearnerConfig(name="adamw", lr=1e-3, micro_batch=2)
    batch = distributed.shard(episodes)

    def learner() -> Learner:
        model = zoo.build_model("tiny", seed=0)
        return Learner(fsdp.shard(model) if strategy == "fsdp2" else model, cfg, renderer.pad_id)

    first = learner()
    first.step(batch)
    weights = {k: v.clone() for k, v in fsdp.full_state_dict(first.passes).items()}
    # A copy, as a checkpoint is (one process's optimizer.state_dict() holds the live tensors);
    # every rank reads the checkpoint.
    state = distributed.broadcast_object(copy.deepcopy(first.state_dict()))
    saved = copy.deepcopy(state["optimizer"])  # loading it lets the optimizer share its tensors
    first.step(batch)
    second = learner()
    fsdp.load_full_state_dict(second.passes, weights)
    second.load_state_dict(state)
    second.step(batch)
    full = {k: v.clone() for k, v in fsdp.full_state_dict(first.passes).items()}
    return {
        "state": saved,
        "two_steps": full,
        "resumed": {k: v.clone() for k, v in fsdp.full_state_dict(second.passes).items()},
        "one_step": weights,
    }


WORKER = """
import sys, torch
sys.path.insert(0, sys.argv[3])
from agentopd import distributed
import test_distributed

torch.set_num_threads(1)
w = distributed.setup()
fn, args = sys.argv[2].split(":")
states = getattr(test_distributed, fn)(*args.split(","))
if w.is_main:
    torch.save(states, sys.argv[1])
distributed.teardown()
"""

TRAIN = [
    "env=lookup-chain",
    "steps=4",
    # Every rank must see the global count to stop before step 3 (643 tokens after step 2);
    # a rank counting only its own episodes would play step 3 alone and wait in a collective.
    "teacher_token_budget=600",
    "distributed.timeout_s=120",
    "episodes_per_step=4",
    "cold_start.steps=0",
    "eval.episodes=2",
    "eval.before=false",
    "rollout.temperature=0",
    "gkd_lambda=0.5",  # with seed 6: steps 0 and 2 are demonstration (SFT) steps, 1 on-policy
    "seed=6",
    "checkpoint_every=1",
    "optim.name=sgd",
    "run_name=r",
]


def _run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "AGENTOPD_KILL_AT"}
    full.update(OMP_NUM_THREADS="1", **env)
    return subprocess.run(cmd, cwd=cwd, env=full, capture_output=True, text=True, timeout=600)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_gloo_ranks_equal_one_process(tmp_path, strategy, loss="rkl-topk"):
    script, ddp = tmp_path / "worker.py", tmp_path / "ranks.pt"
    script.write_text(WORKER)
    args = [str(script), str(ddp), f"learner_steps:{loss},{strategy}", str(Path(__file__).parent)]
    _ok(_run([*TORCHRUN, *args], tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = learner_steps(loss)
    finally:
        torch.set_num_threads(threads)
    before = zoo.build_model("tiny", seed=0).state_dict()
    for name, a, b in zip(
        ("opd", "sft", "opd, rank 1 empty"), single, torch.load(ddp), strict=True
    ):
        worst, moved = _max_diff(a, b), _max_diff(a, before)
        print(
            f"{strategy} {name}: max |2 ranks - 1 process| = {worst:.2e}; "
            f"weights moved by {moved:.2e}"
        )
        assert moved > 100 * ATOL, f"{name}: the step barely changed the weights"
        assert worst < ATOL, name
        before = a


@pytest.mark.slow
def test_fsdp2_adamw_state_resumes(tmp_path):
    """Under fsdp2 on 2 gloo ranks AdamW's state is saved in one process's format (equal to one
    process's after the same step) and a fresh sharded learner that loads it continues exactly
    as the uninterrupted one."""
    script, out = tmp_path / "worker.py", tmp_path / "ranks.pt"
    script.write_text(WORKER)
    args = [str(script), str(out), "adamw_resume:fsdp2", str(Path(__file__).parent)]
    _ok(_run([*TORCHRUN, *args], tmp_path))
    got = torch.load(out, weights_only=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = adamw_resume("ddp")
    finally:
        torch.set_num_threads(threads)
    assert got["state"]["param_groups"] == want["state"]["param_groups"]
    assert got["state"]["state"].keys() == want["state"]["state"].keys()
    worst_state = max(
        (got["state"]["state"][i][k] - v).abs().max().item()
        for i, s in want["state"]["state"].items()
        for k, v in s.items()
    )
    resumed = _max_diff(got["resumed"], got["two_steps"])
    moved = _max_diff(got["two_steps"], got["one_step"])
    print(
        f"fsdp2 AdamW: max |state 2 ranks - 1 process| = {worst_state:.2e}; "
        f"resumed vs uninterrupted = {resumed:.2e}; second step moved the weights by {moved:.2e}"
    )
    assert moved > 100 * ATOL
    assert worst_state < ATOL
    assert resumed < ATOL


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    step = json.loads((run / "checkpoints" / "latest.json").read_text())["path"]
    return load_file(run / "checkpoints" / step / "model" / "model.safetensors")


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """``python -m agentopd train`` in one process; returns its run directory."""
    cwd = tmp_path_factory.mktemp("single")
    _ok(_run([sys.executable, "-m", "agentopd", "train", *TRAIN, "runs_dir=runs"], cwd))
    return cwd / "runs" / "r"


def _same_run(run: Path, ref: Path) -> float:
    """Assert ``run`` logged what ``ref`` logged; returns the max weight difference."""
    got, want = _rows(run), _rows(ref)
    key = ("phase", "step", "batch", "teacher_tokens", "learner/tokens", "rollout/episodes")
    assert [[r.get(k) for k in key] for r in got] == [[r.get(k) for k in key] for r in want]
    assert [r.get("batch") for r in want if r["phase"] == "train"] == [
        "demonstration",
        "on-policy",
        "demonstration",
    ], "not 3 steps mixing SFT and OPD batches: retune gkd_lambda, seed or teacher_token_budget"
    for g, w in zip(got, want, strict=True):
        for k in ("learner/loss", "learner/grad_norm", "diag/sampled_kl", "eval/success"):
            if k in w:
                assert abs(g[k] - w[k]) < 1e-4 * max(1.0, abs(w[k])), (k, g[k], w[k])
    index = (run / "episodes" / "index.jsonl").read_text().splitlines()
    assert len(index) == len((ref / "episodes" / "index.jsonl").read_text().splitlines())
    assert json.loads((run / "choices.json").read_text())["world_size"] == 2
    return _max_diff(_weights(run), _weights(ref))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "resume_strategy"), [("ddp", "ddp"), ("fsdp2", "fsdp2"), ("fsdp2", "ddp")]
)
def test_torchrun_train_killed_and_resumed_equals_one_process(
    tmp_path, reference, strategy, resume_strategy
):
    """Under torchrun: a run killed after step 1 (logged, not checkpointed), then resumed, logs
    each step once, holds exactly the files one process writes (rank 0 alone writes), and ends
    at the weights of one uninterrupted process. ``fsdp2``: the student sharded over the ranks;
    its checkpoint resumes under ``ddp`` too (the files are one process's)."""
    cmd = [*TORCHRUN, "-m", "agentopd", "train", *TRAIN, "runs_dir=runs"]
    killed = _run([*cmd, f"distributed.strategy={strategy}"], tmp_path, AGENTOPD_KILL_AT="train:1")
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr, killed.stderr[-3000:]
    run = tmp_path / "runs" / "r"
    assert [(r["phase"], r["step"]) for r in _rows(run)] == [("train", 0), ("train", 1)]
    resumed = _run([*cmd, "resume=true", f"distributed.strategy={resume_strategy}"], tmp_path)
    _ok(resumed)
    out = " ".join(resumed.stdout.split())
    assert "continuing at step 1" in out
    assert out.count('"run_dir"') == 1, "one result, printed by rank 0 only"
    assert out.count("after training: held-out success") == 1, "rank 0 alone evaluates"
    # Rank 0's run directory holds exactly what one process writes, and nothing else appeared.
    assert _files(tmp_path) == {f"runs/r/{f}" for f in _files(reference)}
    worst = _same_run(run, reference)
    print(
        f"train 3 steps under {strategy}, killed after step 1, resumed under {resume_strategy}: "
        f"max |2 ranks - 1 process| = {worst:.2e}"
    )
    assert worst < ATOL


@pytest.mark.slow
def test_bad_key_exits_2_on_every_rank(tmp_path):
    proc = _run([*TORCHRUN, "-m", "agentopd", "train", "stpes=3", "runs_dir=runs"], tmp_path)
    assert proc.returncode != 0
    for rank in (0, 1):
        assert f"error (rank {rank}): unknown config key 'stpes'" in " ".join(proc.stderr.split())
    # torchrun's failure report: one entry per rank, each with the rank's own exit code.
    codes = dict(
        re.findall(r"rank\s*:\s*(\d+) \(local_rank.*?exitcode\s*:\s*(-?\d+)", proc.stderr, re.S)
    )
    assert codes == {"0": "2", "1": "2"}, proc.stderr[-3000:]
    assert not (tmp_path / "runs").exists()


def test_one_process_is_a_no_op():
    w = distributed.setup()
    assert (w.rank, w.size, w.is_main) == (0, 1, True)
    assert distributed.shard([1, 2, 3], w) == [1, 2, 3]
    assert distributed.all_sum(5) == 5
    assert distributed.all_sum_dict({"a": 1.0}) == {"a": 1.0}
    assert distributed.broadcast_object("x") == "x"
    assert distributed.all_gather_list([1, 2]) == [1, 2]
    assert distributed.gather_list([1, 2]) == [1, 2]
    assert distributed.rank_seed(7) == 7
    model = torch.nn.Linear(2, 2)
    model(torch.ones(1, 2)).sum().backward()
    before = model.weight.grad.clone()
    distributed.sum_gradients(model)
    assert torch.equal(model.weight.grad, before)


@pytest.mark.parametrize("n", [0, 1, 5, 6, 7])
def test_gathering_shards_restores_the_order(n):
    items = list(range(n))
    for size in (1, 2, 3):
        parts = [distributed.shard(items, distributed.World(r, size)) for r in range(size)]
        assert distributed._interleave(parts) == items


def test_torchrun_keys_are_validated():
    from agentopd.config import ConfigError, compose

    cfg = compose("train", ["distributed.backend=gloo", "distributed.timeout_s=60"])
    assert (cfg.distributed.backend, cfg.distributed.timeout_s) == ("gloo", 60)
    with pytest.raises(ConfigError, match="distributed.backend"):
        compose("train", ["distributed.backend=mpi"])
    assert compose("train", []).distributed.strategy == "ddp"
    assert compose("train", ["distributed.strategy=fsdp2"]).distributed.strategy == "fsdp2"
    with pytest.raises(ConfigError, match=r"distributed.strategy.*ddp.*fsdp2"):
        compose("train", ["distributed.strategy=fsdp"])


@pytest.mark.parametrize(
    ("override", "message"), [("lora.r=8", "does not support LoRA"), ("engine=vllm", "engine=hf")]
)
def test_fsdp2_refuses_what_it_does_not_do(override, message):
    from agentopd.build import check_fsdp2
    from agentopd.config import ConfigError, compose

    check_fsdp2(compose("train", ["distributed.strategy=fsdp2"]))
    with pytest.raises(ConfigError, match=message):
        check_fsdp2(compose("train", ["distributed.strategy=fsdp2", override]))
