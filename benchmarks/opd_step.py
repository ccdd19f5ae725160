"""One OPD learner step and one teacher scoring: padded passes (before) vs the packed pass.

Builds the main job for ``--env`` from its config (``agentopd train env=ENV``): the student,
the teacher (an in-process ``hf`` teacher keeping its hidden states, as the builder makes
it), the learner (``optim.*``, ``loss``), and ``--episodes`` expert episodes of the env as the
batch (16 code-sandbox episodes by default: the main job's ``episodes_per_step``). It then
times, for each variant, ``teacher.score`` on the batch and ``learner.step`` on the scored
batch:

* ``padded``: the package as it was at ``--baseline`` (the commit before the one forward pass:
  every segment right-padded to the longest, one a row), extracted with ``git archive`` into a
  temporary folder;
* ``packed``: this checkout (:mod:`agentopd.batch`: several segments a row, the shared prompt
  prefix once).

Each variant runs in its own process (two versions of a package cannot share one), and the
processes alternate for ``--rounds`` rounds of ``--repeats`` timings each; the table shows
medians over all of them, the ratio packed / padded, and each variant's loss on its first
step (same model, same batch: equal up to float rounding).

Run::

    python benchmarks/opd_step.py                        # code-sandbox, tiny models
    python benchmarks/opd_step.py --student smollm2-135m --teacher smollm2-135m --repeats 2

Limits: CPU timings on a shared machine are noisy; the ratios matter, not the seconds. The
first repeat of each process warms up and is not timed.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "97b1002"
"""The last commit with the padded learner and teacher passes."""


def worker(a: argparse.Namespace) -> dict[str, object]:
    """Time teacher scoring and learner steps with whichever ``agentopd`` is importable."""
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    import agentopd
    from agentopd import seeds
    from agentopd.build import full_vocab_head, load_model, make_teacher, student_name
    from agentopd.config import compose, to_dataclass
    from agentopd.learner import Learner, LearnerConfig
    from agentopd.losses import LossConfig
    from agentopd.renderer import Renderer
    from agentopd.rollout import EpisodeJob, expert_episodes

    overrides = [f"env={a.env}", "device=cpu"]
    overrides += [f"student={a.student}"] if a.student else []
    overrides += [f"teacher={a.teacher}"] if a.teacher else []
    cfg = compose("train", overrides)
    device = torch.device("cpu")
    student, tokenizer = load_model(student_name(cfg), "student", cfg.seed)
    renderer = Renderer(tokenizer)
    teacher = make_teacher(cfg, tokenizer, device)
    jobs = [
        EpisodeJob(a.env, seeds.task_base(cfg.seed, "cold_start") + i, {"split": "train"}, dict(cfg.env_kwargs))
        for i in range(a.episodes)
    ]  # fmt: skip
    episodes = expert_episodes(jobs, renderer)
    head = full_vocab_head(cfg, student, teacher)
    learner = Learner(
        student,
        to_dataclass(cfg.optim, LearnerConfig),
        renderer.pad_id,
        loss=cfg.loss,
        loss_cfg=to_dataclass(cfg.loss_cfg, LossConfig),
        topk=cfg.teacher_cfg.topk,
        teacher_head=head,
    )
    score_s, step_s, loss = [], [], None
    for r in range(a.repeats + 1):
        batch = copy.deepcopy(episodes)
        t0 = time.perf_counter()
        teacher.score(batch)
        t1 = time.perf_counter()
        row = learner.step(batch)
        t2 = time.perf_counter()
        loss = row["learner/loss"] if loss is None else loss
        if r:  # the first repeat warms up
            score_s.append(t1 - t0)
            step_s.append(t2 - t1)
    tokens = sum(len(s.tokens) for ep in episodes for s in ep.segments)
    sampled = sum(sum(s.mask) for ep in episodes for s in ep.segments)
    return {
        "package": str(Path(agentopd.__file__).parent),
        "score_s": score_s,
        "step_s": step_s,
        "loss": loss,
        "tokens": tokens,
        "sampled": sampled,
    }


def run(path: Path, a: argparse.Namespace) -> dict[str, object]:
    """One worker process with ``path`` first on ``PYTHONPATH``."""
    env = {**os.environ, "PYTHONPATH": str(path), "OMP_NUM_THREADS": str(a.threads or 1)}
    args = [sys.executable, __file__, "--worker", "--env", a.env, "--episodes", str(a.episodes)]
    args += ["--repeats", str(a.repeats), "--threads", str(a.threads)]
    args += ["--student", a.student] if a.student else []
    args += ["--teacher", a.teacher] if a.teacher else []
    out = subprocess.run(args, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    if out.returncode:
        sys.exit(f"worker for {path} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="code-sandbox")
    p.add_argument("--episodes", type=int, default=16)
    p.add_argument("--student", default=None, help="default: the config's student")
    p.add_argument("--teacher", default=None, help="default: the config's teacher")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per process")
    p.add_argument("--rounds", type=int, default=2, help="alternating processes per variant")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--baseline", default=BASELINE, help="git ref of the padded code")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a)))
        return

    with tempfile.TemporaryDirectory(prefix="agentopd-baseline-") as old:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", a.baseline, "agentopd"],
            capture_output=True,
            check=True,
        )
        subprocess.run(["tar", "-x", "-C", old], input=archive.stdout, check=True)
        variants = {"padded": Path(old), "packed": ROOT}
        results: dict[str, list[dict[str, object]]] = {k: [] for k in variants}
        for _ in range(a.rounds):
            for name, path in variants.items():
                results[name].append(run(path, a))

    def median(name: str, key: str) -> float:
        values = [v for r in results[name] for v in r[key]]  # type: ignore[attr-defined]
        return statistics.median(values)

    first = results["packed"][0]
    print(
        f"env={a.env} student={a.student or 'config'} teacher={a.teacher or 'config'} "
        f"episodes={a.episodes} tokens={first['tokens']} sampled={first['sampled']} "
        f"threads={a.threads} timings={a.rounds}x{a.repeats} baseline={a.baseline}"
    )
    print(f"{'variant':<8} {'score_s':>9} {'ratio':>7} {'step_s':>9} {'ratio':>7} {'loss':>12}")
    for name in variants:
        score, step = median(name, "score_s"), median(name, "step_s")
        r_score = score / median("padded", "score_s")
        r_step = step / median("padded", "step_s")
        loss = results[name][0]["loss"]
        print(f"{name:<8} {score:9.3f} {r_score:6.2f}x {step:9.3f} {r_step:6.2f}x {loss:12.6g}")


if __name__ == "__main__":
    main()
