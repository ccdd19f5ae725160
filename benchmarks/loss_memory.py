"""Peak memory and wall time: chunked student log-probs vs naive full logits.

Measures one forward + backward of the ``rkl-sampled`` loss on the student's sampled-token
log-probs (and, with ``--topk``, of ``rkl-topk`` on a teacher top-16 support with tail), at a
Qwen-sized vocabulary (151,936) and 4,096 tokens with a small hidden size, for:

* ``naive``: ``log_softmax(hidden @ W.T)`` over all tokens at once, then gather;
* ``chunked``: :func:`agentopd.logprobs.chunked_token_logprobs` at each ``--chunk-sizes`` value.

With ``--teacher`` it also measures teacher scoring as the ``hf`` teacher does it (no grad: the
sampled token's log-prob, top-16 and entropy per token), full logits against chunks; for that
row ``grad rel`` compares a check sum of the top-k log-probs and entropies instead.

Every measurement runs in a fresh subprocess so peaks do not leak between variants. On CPU the
peak is the process's resident high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs`` after the inputs are built) minus the resident size at that moment;
torch's CPU allocations are invisible to ``tracemalloc``. On CUDA it is
``torch.cuda.max_memory_allocated`` minus the allocation after the inputs are built. Each
variant is repeated ``--repeats`` times (default 2, 3 with ``--quick``, to stay near three
minutes on 2 CPU cores); the table shows medians. ``|dloss|`` is the absolute loss difference
to naive, ``grad rel`` the relative difference of the summed gradient norms.

Run::

    python benchmarks/loss_memory.py            # full size (about 3 minutes on 2 CPU cores)
    python benchmarks/loss_memory.py --quick    # 1,024 tokens, 32,768 vocab
    python benchmarks/loss_memory.py --chunk-sizes 256,512,1024 --topk
    python benchmarks/loss_memory.py --teacher   # adds the teacher-scoring rows
    python benchmarks/loss_memory.py --teacher-only --chunk-sizes 256,512,1024

Measured on a shared 2-core CPU (load ~8), 4,096 tokens, vocab 151,936, hidden 128, medians of 3:
naive 7,132 MB / 65.5 s; chunk 1024: 1,197 MB / 29.4 s (6.0x less memory, 0.45x time);
chunk 512: 604 MB (11.8x, 0.56x); chunk 256: 307 MB (23.2x, 0.61x); |dloss| = 0.
Teacher scoring (``--teacher-only --chunk-sizes 256,512,1024 --repeats 1``, same machine, load
~7-12): full logits 7,133 MB / 114-126 s; chunk 1024: 1,796 MB (3.97x less, 0.87x time);
chunk 512 (the ``teacher_cfg.chunk_size`` default): 906 MB (7.9x, 0.68x); chunk 256: 460 MB
(15.5x, 1.21x); identical scores.

Limits: CPU timings on a shared machine are noisy; the ratios matter, not the seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from agentopd.logprobs import chunked_token_logprobs
from agentopd.losses import rkl_sampled, rkl_topk

TEACHER_TOPK = 16


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_cpu_peak() -> int:
    """Reset VmHWM to the current RSS (Linux >= 4.0) and return the RSS in kB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # then VmHWM may include earlier peaks; the baseline below is still subtracted
    return _status_kb("VmRSS")


def _inputs(tokens: int, vocab: int, hidden: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(1, tokens, generator=g) < 0.9).to(device)
    return {
        "hidden": torch.randn(1, tokens, hidden, generator=g).to(device).requires_grad_(),
        "weight": (0.05 * torch.randn(vocab, hidden, generator=g)).to(device).requires_grad_(),
        "targets": torch.randint(0, vocab, (1, tokens), generator=g).to(device),
        "teacher": (-10 * torch.rand(1, tokens, generator=g)).to(device),
        "mask": mask,
        "teacher_ids": torch.randint(0, vocab, (1, tokens, TEACHER_TOPK), generator=g).to(device),
        "teacher_topk": torch.log_softmax(
            torch.randn(1, tokens, TEACHER_TOPK + 1, generator=g), -1
        )[..., :TEACHER_TOPK].to(device),
    }


@torch.no_grad()
def _teacher_score(x: dict[str, torch.Tensor], variant: str, chunk_size: int) -> tuple[float, float]:
    """Teacher scoring (no grad): the sampled token's log-prob, top-16 and entropy per token,
    as the ``hf`` teacher hands them to the learner. Returns two check sums."""
    if variant == "naive":
        logp_T_V = torch.log_softmax((x["hidden"][0] @ x["weight"].T).float(), -1)
        chosen = logp_T_V.gather(-1, x["targets"][0][:, None]).squeeze(-1)
        top = logp_T_V.topk(TEACHER_TOPK, dim=-1).values
        entropy = -(logp_T_V.exp() * logp_T_V).sum(-1)
        del logp_T_V
    else:
        out = chunked_token_logprobs(
            x["hidden"],
            x["weight"],
            x["targets"],
            chunk_size=chunk_size,
            student_topk=TEACHER_TOPK,
            return_entropy=True,
        )
        chosen, top, entropy = out.logprobs_B_T, out.topk_logprobs_B_T_K, out.entropy_B_T
    return float(chosen.sum()), float(top.sum() + entropy.sum())


def _step(x: dict[str, torch.Tensor], variant: str, loss_name: str, chunk_size: int) -> float:
    """One forward + backward; returns the loss value."""
    if loss_name == "teacher-score":
        value, x["check"] = _teacher_score(x, variant, chunk_size)
        return value
    topk = loss_name == "rkl-topk"
    if variant == "naive":
        logprobs_B_T_V = torch.log_softmax((x["hidden"] @ x["weight"].T).float(), -1)
        if topk:
            student = logprobs_B_T_V.gather(-1, x["teacher_ids"])
        else:
            lp = logprobs_B_T_V.gather(-1, x["targets"][..., None]).squeeze(-1)
        del logprobs_B_T_V
    else:
        out = chunked_token_logprobs(
            x["hidden"],
            x["weight"],
            x["targets"],
            chunk_size=chunk_size,
            topk_ids_B_T_K=x["teacher_ids"] if topk else None,
        )
        lp, student = out.logprobs_B_T, out.support_logprobs_B_T_K
    if topk:
        loss, _ = rkl_topk(student, x["teacher_topk"], x["mask"], tail=True)
    else:
        loss, _ = rkl_sampled(lp, lp.detach(), x["teacher"], x["mask"])
    loss.backward()
    return float(loss)


def worker(args: argparse.Namespace) -> None:
    """Measure one variant once and print a JSON line."""
    device = args.device
    torch.manual_seed(0)
    warm = _inputs(8, 64, args.hidden, device)  # load kernels and lazy state, tiny
    _step(warm, args.variant, args.loss, 4)
    x = _inputs(args.tokens, args.vocab, args.hidden, device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _reset_cpu_peak()
    start = time.perf_counter()
    loss = _step(x, args.variant, args.loss, args.chunk_size)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if device == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mb = (_status_kb("VmHWM") - base) / 1024
    if args.loss == "teacher-score":
        grad_norm = x["check"]  # no backward: a check sum of top-k log-probs and entropies
    else:
        grad_norm = float(x["hidden"].grad.norm()) + float(x["weight"].grad.norm())
    print(json.dumps({"peak_mb": peak_mb, "seconds": seconds, "loss": loss, "grad": grad_norm}))


def _run_once(args: argparse.Namespace, variant: str, loss: str, chunk: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--worker", variant, "--loss", loss]
    cmd += ["--chunk-size", str(chunk), "--tokens", str(args.tokens), "--vocab", str(args.vocab)]
    cmd += ["--hidden", str(args.hidden), "--device", args.device]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {variant} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    """Parse arguments; run the workers (or be one) and print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1,024 tokens, 32,768 vocab")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--chunk-sizes", default="1024", help="comma-separated, e.g. 256,512,1024")
    p.add_argument("--repeats", type=int, help="runs per variant (default 2, 3 with --quick)")
    p.add_argument("--topk", action="store_true", help="also benchmark rkl-topk (k=16, tail)")
    p.add_argument(
        "--teacher", action="store_true", help="also benchmark hf teacher scoring (top-16, entropy)"
    )
    p.add_argument("--teacher-only", action="store_true", help="only the teacher-scoring rows")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--loss", default="rkl-sampled", help=argparse.SUPPRESS)
    p.add_argument("--chunk-size", type=int, default=1024, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.variant = args.worker
        worker(args)
        return
    if args.quick:
        args.tokens, args.vocab = 1024, 32_768
    if args.repeats is None:
        args.repeats = 3 if args.quick else 2
    chunks = [int(c) for c in args.chunk_sizes.split(",")]
    losses = ["rkl-sampled"] + (["rkl-topk"] if args.topk else [])
    losses += ["teacher-score"] if args.teacher else []
    losses = ["teacher-score"] if args.teacher_only else losses
    print(
        f"device={args.device} tokens={args.tokens} vocab={args.vocab} hidden={args.hidden} "
        f"repeats={args.repeats} threads={torch.get_num_threads()}"
    )
    header = (
        f"{'loss':<14}{'variant':<16}{'peak MB':>10}{'time s':>9}"
        f"{'mem naive/x':>13}{'time x/naive':>14}{'|dloss|':>10}{'grad rel':>10}"
    )
    print(header)
    t0 = time.perf_counter()
    for loss in losses:
        variants = [("naive", 0)] + [(f"chunked-{c}", c) for c in chunks]
        rows = {}
        for name, chunk in variants:
            kind = "naive" if chunk == 0 else "chunked"
            runs = [_run_once(args, kind, loss, chunk or 1) for _ in range(args.repeats)]
            rows[name] = {k: statistics.median(r[k] for r in runs) for k in ("peak_mb", "seconds")}
            rows[name].update(loss=runs[0]["loss"], grad=runs[0]["grad"])
            ref = rows["naive"]
            r = rows[name]
            print(
                f"{loss:<14}{name:<16}{r['peak_mb']:>10.0f}{r['seconds']:>9.2f}"
                f"{ref['peak_mb'] / max(r['peak_mb'], 1e-9):>13.2f}"
                f"{r['seconds'] / ref['seconds']:>14.2f}"
                f"{abs(r['loss'] - ref['loss']):>10.1e}"
                f"{abs(r['grad'] - ref['grad']) / ref['grad']:>10.1e}",
                flush=True,
            )
    print(f"total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
