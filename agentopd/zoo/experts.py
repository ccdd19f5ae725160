"""Env-expert teachers: SmolLM2-135M-Instruct plus one LoRA adapter per environment.

``teacher=smollm2-135m-<env>`` loads :data:`agentopd.zoo.EXPERT_BASE` with the adapter of
``<env>`` merged in. An adapter ships in ``agentopd/zoo/assets/adapters/<name>/`` or is built
here on first use (``agentopd zoo build smollm2-135m-<env>``). The recipe, top to bottom:

1. **SFT on the scripted expert.** Clean expert episodes plus error-injected ones
   (:func:`agentopd.zoo.recovery.recovery_episodes`: the injected errors have mask 0, the
   expert's recovery mask 1), rendered with the base model's own tokenizer and tool template.
   LoRA adapters on the attention projections; AdamW with warm-up and a cosine schedule; bf16
   autocast where the CPU runs it natively.
2. **DAgger rounds.** The teacher plays train tasks at temperature 1; every state it visits is
   labelled by the env's scripted expert (``expert_action(messages)`` is defined on any state:
   the built-in experts read the tool results); the states where the teacher's turn differs
   from the label are added to the training data (prompt mask 0, label mask 1) and training
   goes on over the aggregate. The teacher's own mistakes become training states, so it learns
   to act where a student's rollouts will take it, not only on the expert's path.
3. **Evaluation** on held-out tasks: greedy success and the recovery rate from one injected
   error (the two numbers ``agentopd diagnose`` reports).
4. Save the adapter (float16 safetensors + ``adapter_config.json``) and ``zoo.json`` (recipe,
   data, timings, results) atomically.

Run it directly::

    python -m agentopd.zoo.experts lookup-chain --out /tmp/smollm2-135m-lookup-chain
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from agentopd import lora
from agentopd.engines.hf import HFEngine
from agentopd.learner import Learner, LearnerConfig
from agentopd.registry import make
from agentopd.renderer import Renderer
from agentopd.rollout import EpisodeJob, RolloutConfig, run_episodes
from agentopd.runs import atomic_directory
from agentopd.types import Episode
from agentopd.zoo.bootstrap import (
    add_recipe_flags,
    as_episode,
    held_out_success,
    play_experts,
    sft_optim,
    with_overrides,
)


def expert_optim(**changes: Any) -> LearnerConfig:
    """AdamW at peak lr 1e-3 (LoRA), 5 warm-up steps, cosine to 10%, bf16 autocast where the
    CPU runs it natively; ``changes`` replace any of these."""
    expert = {"lr": 1e-3, "weight_decay": 0.0, "warmup_steps": 5, "min_lr_frac": 0.1,
              "micro_batch": 8, "sft_bf16": "auto"}  # fmt: skip
    return sft_optim(**{**expert, **changes})


@dataclass
class ExpertRecipe:
    """How to build one env-expert adapter."""

    env_kwargs: dict[str, Any] = field(default_factory=dict)
    """Constructor kwargs of the environment (training and evaluation)."""
    lora: lora.LoraConfig = field(default_factory=lambda: lora.LoraConfig(r=16, alpha=32.0))
    """The adapter: rank 16 on q/k/v/o (3.7 MB in float16)."""
    sft_episodes: int = 384
    """Clean expert episodes (distinct train tasks)."""
    recovery_episodes: int = 192
    """Error-injected expert episodes (other train tasks)."""
    sft_steps: int = 80
    """SFT steps before the first DAgger round."""
    batch_size: int = 8
    """Examples per step."""
    dagger_rounds: int = 2
    """Rounds of teacher rollouts labelled by the scripted expert."""
    dagger_episodes: int = 32
    """Teacher rollouts (temperature 1, train tasks) per round."""
    dagger_steps: int = 12
    """Steps over the aggregated data after each round."""
    optim: LearnerConfig = field(default_factory=expert_optim)
    """Optimizer and schedule (one schedule over every step of the build)."""
    eval_episodes: int = 200
    """Held-out tasks for greedy success and for the recovery rate (0: skip)."""
    max_new_tokens: int = 96
    """Generation limit per turn."""
    bf16_rollouts: bool = True
    """DAgger rollouts and the evaluation generate with a bfloat16 copy of the model (about
    twice as fast on a CPU); training and the saved adapter stay float32."""
    seed: int = 0
    """Seeds the task draws, the batch order and the rollouts."""
    init_adapter: str = ""
    """Continue from this saved adapter directory instead of a fresh adapter ("": fresh)."""


RECIPES: dict[str, ExpertRecipe] = {
    "lookup-chain": ExpertRecipe(env_kwargs={"min_hops": 1, "max_hops": 3}),
}
"""Per-environment defaults; other environments get ``ExpertRecipe()``. The defaults add up to
about the training of the shipped lookup-chain adapter, which was built in two calls (24 SFT
steps and two DAgger rounds of 10, then ``--init-adapter`` with 50 SFT steps and one round of
12 at seed 1; its ``zoo.json`` and docs/real_models.md record both): after the first call it
copied keys perfectly but could not count hops (32.5% held-out)."""


def dagger_examples(
    episodes: list[Episode], env_name: str, env_kwargs: dict[str, Any], renderer: Renderer
) -> tuple[list[Episode], int]:
    """Expert labels on the states ``episodes`` visited: ``(examples, states)``.

    For every turn of every episode, the scripted expert of a fresh env reset to the same task
    labels the state before that turn; where the label differs from what was played, one
    example is made: the episode's tokens up to the turn (mask 0), then the label and the
    end-of-turn token (mask 1). ``states`` counts every labelled state.
    """
    examples: list[Episode] = []
    states = 0
    env = make(env_name, **env_kwargs)
    try:
        for ep in episodes:
            if len(ep.segments) != 1 or not ep.turns or not ep.messages:
                continue
            env.reset(seed=ep.seed, options={"split": "train"})
            seg = ep.segments[0]
            n = ep.n_prompt_messages
            for turn in ep.turns:
                if n > len(ep.messages):
                    break
                label = env.expert_action(list(ep.messages[:n]))
                states += 1
                if label.strip() != turn.text.strip():
                    target = renderer.encode(label) + [renderer.eot_id]
                    tokens = seg.tokens[: turn.start] + target
                    mask = [0] * turn.start + [1] * len(target)
                    examples.append(as_episode(tokens, mask, "dagger"))
                n += 1 + len(turn.tool_results)
    finally:
        env.close()
    return examples, states


def build_expert(
    env_name: str, path: Path, *, progress: bool = True, **overrides: Any
) -> dict[str, Any]:
    """Build the LoRA expert of ``env_name`` and save its adapter to ``path``; returns the report
    saved as ``zoo.json``. ``overrides`` replace :class:`ExpertRecipe` or ``optim`` fields."""
    from rich.console import Console

    from agentopd import zoo
    from agentopd.zoo.recovery import recovery_episodes

    recipe = with_overrides(RECIPES.get(env_name, ExpertRecipe()), overrides)
    console = Console(stderr=True, quiet=not progress)
    name = f"{zoo.EXPERT_BASE}-{env_name}"
    t0 = time.perf_counter()
    make(env_name, **recipe.env_kwargs).close()
    model, tokenizer = zoo.load(zoo.EXPERT_BASE, progress=progress)
    renderer = Renderer(tokenizer)

    # ---------------------------------------------------------------- data
    first = recipe.seed * 10_000_019
    seeds = list(range(first, first + recipe.sft_episodes))
    clean = [
        ep
        for ep in play_experts(env_name, recipe.env_kwargs, seeds, tokenizer=tokenizer)
        if ep.success
    ]
    rec_seeds = range(
        first + recipe.sft_episodes, first + recipe.sft_episodes + recipe.recovery_episodes
    )
    recovery = [
        ep
        for ep in recovery_episodes(
            env_name, recipe.env_kwargs, rec_seeds, renderer, 0.3, 2, seed=recipe.seed
        )
        if ep.success
    ]
    data: list[Episode] = clean + recovery
    t_data = time.perf_counter() - t0
    console.print(f"{name}: {len(clean)} clean + {len(recovery)} recovery expert episodes")

    # ---------------------------------------------------------------- train
    lora.apply(model, recipe.lora)
    if recipe.init_adapter:
        lora.load_adapter(model, Path(recipe.init_adapter))
    total = recipe.sft_steps + recipe.dagger_rounds * recipe.dagger_steps
    learner = Learner(model, recipe.optim, renderer.pad_id, total_steps=total)
    rng = random.Random(recipe.seed)
    losses: list[float] = []

    def train(steps: int, label: str) -> None:
        for i in range(steps):
            batch = [data[rng.randrange(len(data))] for _ in range(recipe.batch_size)]
            losses.append(learner.step_sft(batch)["learner/loss"])
            console.print(f"{name}: {label} step {i + 1}/{steps} loss {losses[-1]:.4f}")

    train(recipe.sft_steps, "SFT")
    rounds = []
    gen_dtype = torch.bfloat16 if recipe.bf16_rollouts else None
    limits = RolloutConfig(max_new_tokens=recipe.max_new_tokens, max_episode_tokens=2048)
    dagger_seed = first + recipe.sft_episodes + recipe.recovery_episodes
    for r in range(recipe.dagger_rounds):
        jobs = [
            EpisodeJob(env_name, dagger_seed + r * recipe.dagger_episodes + i, {"split": "train"},
                       dict(recipe.env_kwargs))
            for i in range(recipe.dagger_episodes)
        ]  # fmt: skip
        engine = HFEngine(model, renderer.eot_id, renderer.pad_id, dtype=gen_dtype)
        played = run_episodes(jobs, engine, renderer, limits, seed=recipe.seed * 1000 + r)
        new, states = dagger_examples(played, env_name, recipe.env_kwargs, renderer)
        data += new
        rounds.append(
            {
                "round": r,
                "rollout_success": sum(ep.success for ep in played) / len(played),
                "states": states,
                "relabelled": len(new),
            }
        )
        console.print(f"{name}: DAgger round {r}: {rounds[-1]}")
        train(recipe.dagger_steps, f"DAgger {r}")
    t_train = time.perf_counter() - t0 - t_data

    # ---------------------------------------------------------------- evaluate
    evaluation: dict[str, Any] = {}
    model.eval()
    if recipe.eval_episodes > 0:
        evaluation = held_out_success(
            model, tokenizer, env_name, recipe.eval_episodes, recipe.env_kwargs,
            recipe.max_new_tokens, gen_dtype, recovery=True,
        )  # fmt: skip
        evaluation["engine_dtype"] = str(gen_dtype or "float32")
    t_eval = time.perf_counter() - t0 - t_data - t_train
    report: dict[str, Any] = {
        "name": name,
        "env": env_name,
        "base": zoo.EXPERT_BASE,
        "recipe": asdict(recipe),
        "clean_examples": len(clean),
        "recovery_examples": len(recovery),
        "dagger": rounds,
        "final_loss": sum(losses[-5:]) / max(1, len(losses[-5:])),
        "loss_curve": [round(x, 4) for x in losses],
        "eval": evaluation,
        "seconds": {
            "data": round(t_data, 1),
            "train": round(t_train, 1),
            "eval": round(t_eval, 1),
            "total": round(time.perf_counter() - t0, 1),
        },
        "torch_threads": torch.get_num_threads(),
    }
    save_adapter(model, report, Path(path))
    if evaluation:
        console.print(
            f"[green]{name}[/]: held-out greedy success {evaluation['success']:.1%} on "
            f"{evaluation['episodes']} tasks, recovery rate "
            f"{evaluation['recovery']['recovery_rate']:.1%}, in "
            f"{report['seconds']['total']:.0f}s -> {path}"
        )
    return report


def save_adapter(model: Any, report: dict[str, Any], path: Path) -> None:
    """Write the adapter of ``model`` (float16) and ``report`` to ``path`` atomically."""
    from safetensors.torch import save_file

    with atomic_directory(path) as tmp:
        tensors = {
            k: v.detach().to(torch.float16).cpu().contiguous()
            for k, v in lora.adapter_state_dict(model).items()
        }
        save_file(tensors, str(tmp / "adapter_model.safetensors"))
        model._agentopd_lora_config.save_pretrained(str(tmp))
        (tmp / "zoo.json").write_text(json.dumps(report, indent=2))


def main(argv: list[str] | None = None) -> None:
    """``python -m agentopd.zoo.experts ENV [--out DIR] [--sft-steps N ...]``."""
    p = argparse.ArgumentParser(description="Build a SmolLM2 LoRA env-expert teacher.")
    p.add_argument("env")
    p.add_argument("--out", type=Path, default=None, help="target directory (default: cache)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    add_recipe_flags(p, ExpertRecipe, skip={"env_kwargs", "optim", "lora", "name"})
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from agentopd import zoo

    overrides = {
        k: v for k, v in vars(args).items() if k not in ("env", "out", "threads") and v is not None
    }
    out = args.out or zoo.cache_dir(f"{zoo.EXPERT_BASE}-{args.env}")
    report = build_expert(args.env, out, **overrides)
    print(json.dumps({k: report[k] for k in ("name", "eval", "dagger", "seconds")}, indent=2))


if __name__ == "__main__":
    main()
