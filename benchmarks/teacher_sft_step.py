"""Teacher-build SFT step time: padded full forward vs the packed step the zoo uses.

Plays ``--episodes`` expert episodes of an environment, draws ``--steps`` batches of
``--batch-size`` (seeded, the same batches for both variants) and times one forward, backward
and AdamW step of the ``tiny-teacher`` base model with:

* ``padded``: :func:`agentopd.zoo.bootstrap._masked_nll_full`, every sequence right-padded to
  the longest, logits at every position;
* ``packed``: :func:`agentopd.zoo.bootstrap.masked_nll`, the shared prompt prefix run once,
  the rest packed into rows with a block-diagonal mask, logits only at trained positions;
* ``packed+bf16`` (with ``--bf16``): the same under bfloat16 autocast.

The variants alternate for ``--repeats`` rounds; the table shows the median step time of each,
its ratio to ``padded``, and the loss of the first batch (equal up to float rounding, except in
bfloat16).

Run::

    python benchmarks/teacher_sft_step.py                    # code-sandbox, about 2 minutes
    python benchmarks/teacher_sft_step.py --env sql --bf16
    python benchmarks/teacher_sft_step.py --quick            # lookup-chain, a few steps

Measured 2026-11-30 on the idle 2-core CPU (code-sandbox, 200 episodes, batch 16, medians of 3
rounds of 8 steps, 2 threads): padded 1.380 s/step; packed 0.756 s (1.83x; 13.1 rows per batch
of 16); packed+bf16 0.553 s (2.49x). The step it replaced (prefix cache, padded rest, logits
everywhere) was 1.27x slower than packed in a side-by-side run.

Limits: CPU timings on a shared machine are noisy; the ratios matter, not the seconds. The
learning rate is 0, so every round times the same model.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="code-sandbox")
    p.add_argument("--episodes", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=8, help="batches timed per round")
    p.add_argument("--repeats", type=int, default=3, help="rounds; the table shows medians")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--bf16", action="store_true", help="also time packed under bf16 autocast")
    p.add_argument("--quick", action="store_true", help="lookup-chain, 40 episodes, 3 steps")
    a = p.parse_args(argv)
    if a.quick:
        a.env, a.episodes, a.steps, a.repeats = "lookup-chain", 40, 3, 1
    if a.threads:
        torch.set_num_threads(a.threads)

    from agentopd.renderer import Renderer
    from agentopd.zoo import bootstrap
    from agentopd.zoo.tokenizer import load_tokenizer

    recipe = bootstrap.RECIPES.get(a.env, bootstrap.Recipe())
    pad_id = Renderer(load_tokenizer()).pad_id
    played = bootstrap.expert_examples(
        a.env, recipe.env_kwargs, list(range(a.episodes)), recipe.data_workers
    )
    examples = [ex for ex, ok in played if ok]
    gen = torch.Generator().manual_seed(0)
    batches = [
        [examples[i] for i in torch.randint(len(examples), (a.batch_size,), generator=gen)]
        for _ in range(a.steps + 1)
    ]
    model = bootstrap.initial_model(recipe)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)

    variants: dict[str, tuple[Any, bool]] = {
        "padded": (bootstrap._masked_nll_full, False),
        "packed": (bootstrap.masked_nll, False),
    }
    if a.bf16:
        variants["packed+bf16"] = (bootstrap.masked_nll, True)
    first_loss: dict[str, float] = {}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(a.repeats):
        for name, (fn, bf16) in variants.items():
            per_step = []
            for k, batch in enumerate(batches):
                t = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = fn(batch, model, pad_id)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if k > 0:  # the first batch warms up
                    per_step.append(time.perf_counter() - t)
                else:
                    first_loss.setdefault(name, loss.item())
            times[name].append(statistics.median(per_step))

    rows = sum(
        len(bootstrap.pack_rows([len(e.tokens) - bootstrap.prefix_to_share(b) for e in b]))
        for b in batches[1:]
    )
    print(
        f"{a.env}: {len(examples)} episodes, batch {a.batch_size}, {a.steps} steps x "
        f"{a.repeats} rounds, {torch.get_num_threads()} thread(s); packed rows per batch "
        f"{rows / a.steps:.1f}"
    )
    base = statistics.median(times["padded"])
    print(f"{'variant':<12} {'median s/step':>14} {'speed-up':>9} {'first loss':>11}")
    for name in variants:
        med = statistics.median(times[name])
        print(f"{name:<12} {med:>14.3f} {base / med:>8.2f}x {first_loss[name]:>11.5f}")


if __name__ == "__main__":
    main()
