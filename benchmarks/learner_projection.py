"""The learner's student pass with the output layer projected everywhere or at sampled tokens only.

One forward + backward of :func:`agentopd.learner.student_pass` (packed decoder, then the chunked
vocabulary projection with the teacher's top-k support, the student's top-k and entropy) on the
same padded batch, side by side in one run: ``everywhere`` (no mask, the learner before
2026-12-07) against ``sampled`` (mask-1 positions only, the learner now). The batch mimics an
agent episode: ``--turns`` student turns of ``--turn-tokens`` tokens each, separated by
prompt/tool blocks, so the sampled share is ``turns x turn_tokens / length``.

    python benchmarks/learner_projection.py                       # SmolLM2-135M (fetched once)
    python benchmarks/learner_projection.py --model tiny --repeats 5

Prints per-variant median seconds and tokens/s, and the ratio sampled / everywhere.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="zoo name or save_pretrained dir")
    p.add_argument("--batch", type=int, default=4, help="segments per pass")
    p.add_argument("--length", type=int, default=512, help="tokens per segment")
    p.add_argument("--turns", type=int, default=4, help="student turns per segment")
    p.add_argument("--turn-tokens", type=int, default=32, help="sampled tokens per turn")
    p.add_argument("--topk", type=int, default=16, help="teacher support size")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per variant (median)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    from agentopd import zoo
    from agentopd.learner import student_pass

    model = zoo.load(a.model)[0] if a.model != "tiny" else zoo.build_model("tiny", seed=0)
    model.train()
    V = model.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (a.batch, a.length), generator=g)
    attn = torch.ones_like(ids)
    S = a.length - 1
    mask = torch.zeros(a.batch, S, dtype=torch.bool)
    gap = (S - a.turns * a.turn_tokens) // (a.turns + 1)
    if gap < 1:
        p.error("--turns x --turn-tokens must be below --length")
    for t in range(a.turns):
        start = gap * (t + 1) + t * a.turn_tokens
        mask[:, start : start + a.turn_tokens] = True
    support = torch.randint(0, V, (a.batch, S, a.topk), generator=g)
    args = (model, ids, attn, ids[:, 1:], support, a.topk, 1024)

    def once(m: torch.Tensor | None) -> float:
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        out = student_pass(*args, m)
        keep = mask  # the loss reads mask-1 positions in both variants
        loss = out["logprobs_B_T"][keep].sum() + out["support_logprobs_B_T_K"][keep].sum()
        (loss + out["entropy_B_T"][keep].sum()).backward()
        return time.perf_counter() - t0

    once(None), once(mask)  # warm-up
    times: dict[str, list[float]] = {"everywhere": [], "sampled": []}
    for _ in range(a.repeats):  # interleaved, so load on the machine hits both alike
        times["everywhere"].append(once(None))
        times["sampled"].append(once(mask))
    tokens = a.batch * a.length
    share = float(mask.float().mean())
    print(
        f"model {a.model} (V={V}), batch {a.batch} x {a.length} tokens, sampled share "
        f"{share:.1%}, top-k {a.topk}, {a.repeats} repeats, {torch.get_num_threads()} threads"
    )
    print("| variant | median s | tokens/s |")
    print("|---|---|---|")
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"| {k} | {v:.2f} | {tokens / v:.0f} |")
    print(f"ratio sampled / everywhere: {med['sampled'] / med['everywhere']:.2f}")


if __name__ == "__main__":
    main()
