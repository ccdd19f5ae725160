"""One on-policy distillation step, agentopd against TRL's ``DistillationTrainer``, side by side.

Both sides get the same student/teacher pair (Qwen3 architecture built from config, random
weights, same seeds), the same prompts (random token ids; TRL gets them as text that its
tokenizer maps back to exactly those ids) and the same number of new tokens (``min_new_tokens``
= ``max_new_tokens``, so no sequence stops early). CPU, float32, one torch thread. Each
measurement runs in its own child process, so the memory figures are that process's alone.

Phases of one step, as wall time and as the process's resident-set high-water mark (Linux's
``VmHWM``, reset at every phase boundary through ``/proc/self/clear_refs``):

* **agentopd**: ``generation`` = :meth:`agentopd.engines.hf.HFEngine.generate` plus building the
  single-turn episodes from its samples; ``teacher`` = :meth:`agentopd.teachers.hf.HFTeacher.score`
  (backbone, vocabulary projection at sampled tokens, top-16, entropy); ``learner`` = one
  :meth:`agentopd.learner.Learner.step` (OPD, ``rkl-sampled``, ``rkl-topk`` with k = 16, or
  ``rkl-full``, the exact full-vocabulary reverse KL, for which the teacher keeps its hidden
  states and the learner gets its output head; ``optim.micro_batch`` = the batch so both sides
  make one pass, AdamW, clip 1.0).
* **TRL**: its own ``training_step`` (which generates through ``_prepare_inputs``, then runs the
  fused student/teacher chunked divergence, ``beta=1``: full-vocabulary reverse KL, and the
  backward) followed by what its training loop does next (clip 1.0, AdamW step, schedule step,
  zero grad). ``generation`` = its ``_generate_and_score_completions``; ``teacher`` = the
  teacher's backbone (its ``_get_last_hidden_state`` call); ``learner`` = the rest. TRL projects
  the teacher's hidden states onto the vocabulary inside the fused loss, so that part of the
  teacher's work counts as TRL's learner.

Configs (so that vocabulary and sequence lengths dominate): student 2 layers, hidden 64, MLP 256,
4 heads (2 KV) of 32; teacher 2 layers, hidden 128, MLP 512, 4 heads (2 KV) of 32; tied input and
output embeddings (as in the small Qwen3 models). TRL runs with ``bf16=False`` and
``gradient_checkpointing=False`` (its config's defaults are on; agentopd uses neither on CPU),
AdamW betas (0.9, 0.95) like agentopd's. Sampling: temperature 1, no top-k / top-p on both.

Settings (``--settings``): vocabulary, batch, prompt tokens + new tokens

1. 151,936, 8, 448 + 64      2. 151,936, 16, 256 + 256     3. 151,936, 8, 1,984 + 64
4. 8,192, 16, 256 + 256      5. 8,192, 8, 1,792 + 256

Run (TRL is an optional dependency of this benchmark only)::

    pip install trl==1.16
    python benchmarks/vs_trl.py --settings 4 1 --repeats 3 --out vs_trl.json
    python benchmarks/vs_trl.py --quick          # one small setting, under 2 minutes

The children pin glibc's mmap threshold (``--malloc fixed``, see ``MMAP_THRESHOLD``) so that the
RSS follows live buffers; ``--malloc default`` measures the allocator as it comes.

True reverse KL (outside the timed phases): on each timed step's own batch, the student's exact
full-vocabulary reverse KL to the teacher, nats per completion token, is computed before the
update (right after generation) and after it (:func:`true_rkl`, the same code for both sides,
float64, no grad); the tables give its drop per step. With ``LR`` = 1e-6 the drops are small;
they say how directly one update of each objective descends the exact reverse KL.

Each child runs one tiny warm-up step (which also allocates the optimizer's state), then
``--repeats`` timed steps; the tables show medians of the timed steps, and the largest high-water
mark of any of them. Limits: a shared CPU makes seconds noisy (the ratios matter); the objectives
differ (agentopd's ``rkl-sampled`` / ``rkl-topk`` are sampled-token / top-k estimates, TRL's and
agentopd's ``rkl-full`` the exact full-vocabulary divergence), so the learner ratio compares each
framework's own OPD update, not one formula.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Setting:
    """One row of the comparison."""

    vocab: int
    batch: int
    prompt: int
    new: int


SETTINGS = {
    1: Setting(151_936, 8, 448, 64),
    2: Setting(151_936, 16, 256, 256),
    3: Setting(151_936, 8, 1_984, 64),
    4: Setting(8_192, 16, 256, 256),
    5: Setting(8_192, 8, 1_792, 256),
}
QUICK = Setting(8_192, 4, 96, 32)
WARMUP = Setting(0, 2, 16, 4)
"""The untimed first step of every child (vocabulary: the setting's)."""

STUDENT = {"hidden_size": 64, "intermediate_size": 256}
TEACHER = {"hidden_size": 128, "intermediate_size": 512}
COMMON = {
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
}
SIDES = ("trl", "rkl-sampled", "rkl-topk", "rkl-full")
"""The children per setting: TRL, and agentopd with each of its losses."""
FULL_VOCAB = ("rkl-full",)
"""agentopd losses that need the teacher's hidden states and output head."""
UNTIMED = "measure"
"""A phase left out of the step's time and peak (the true-RKL measurement inside TRL's step)."""
TOPK = 16
LR = 1e-6
PAD, EOS, FIRST_WORD = 0, 1, 3
MMAP_THRESHOLD = 256 * 1024
"""glibc's ``MALLOC_MMAP_THRESHOLD_`` in the children (``--malloc fixed``): blocks above it are
mapped and unmapped one by one, so the RSS follows the live buffers instead of whatever the heap
happens to keep after freeing them (which made one generation phase read 0 MB or 240 MB extra
from one run to the next)."""


# --------------------------------------------------------------------------------------------
# Memory and time per phase
# --------------------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    return int(m.group(1)) if m else 0


def _reset_hwm() -> None:
    """Reset the kernel's RSS high-water mark to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class Phases:
    """Exclusive wall time and RSS high-water mark per named phase of one step.

    A nested phase pauses the one around it (TRL's generation runs inside its training step).
    ``extra_mb`` of a phase is its high-water mark minus the RSS when it was first entered.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.peak_mb: dict[str, float] = {}
        self.extra_mb: dict[str, float] = {}
        self._stack: list[str] = []
        self._start_mb: dict[str, float] = {}
        self._last = time.perf_counter()

    def _switch(self) -> None:
        now, hwm = time.perf_counter(), _status_kb("VmHWM") / 1024
        if self._stack:
            name = self._stack[-1]
            self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
            self.peak_mb[name] = max(self.peak_mb.get(name, 0.0), hwm)
            self.extra_mb[name] = self.peak_mb[name] - self._start_mb[name]
        _reset_hwm()
        self._last = time.perf_counter()

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._switch()
        self._start_mb.setdefault(name, _status_kb("VmRSS") / 1024)
        self._stack.append(name)
        try:
            yield
        finally:
            self._switch()
            self._stack.pop()

    def result(self) -> dict[str, Any]:
        timed = [k for k in self.seconds if k != UNTIMED]
        return {
            "seconds": self.seconds,
            "step_seconds": sum(self.seconds[k] for k in timed),
            "peak_mb": max(self.peak_mb[k] for k in timed),
            "extra_mb": self.extra_mb,
        }


# --------------------------------------------------------------------------------------------
# The shared inputs: models, tokenizer, prompts
# --------------------------------------------------------------------------------------------


def build_models(vocab: int) -> tuple[Any, Any]:
    """Student and teacher, seeded, float32, the same on both sides."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    def make(width: dict[str, int], seed: int) -> Any:
        cfg = Qwen3Config(
            vocab_size=vocab,
            **width,
            **COMMON,
            pad_token_id=PAD,
            eos_token_id=EOS,
            bos_token_id=None,
        )
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)

    student, teacher = make(STUDENT, 0), make(TEACHER, 1).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


def build_tokenizer(vocab: int) -> Any:
    """A word-level tokenizer whose word ``t<i>`` is id ``i``: prompts as text map back to the
    exact ids, and every id of the model's vocabulary is a token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": PAD, "<eos>": EOS, "<unk>": 2}
    words.update({f"t{i}": i for i in range(FIRST_WORD, vocab)})
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
    )


def make_prompts(s: Setting, seed: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_WORD, s.vocab, (s.batch, s.prompt), generator=g).tolist()


def force_length(generation_config: Any, new: int) -> None:
    """Exactly ``new`` tokens per sequence: end-of-sequence is suppressed until then."""
    generation_config.max_new_tokens = new
    generation_config.min_new_tokens = new


def true_rkl(
    student: Any, teacher: Any, prompts: list[list[int]], completions: list[list[int]]
) -> float:
    """The student's exact reverse KL to the teacher, ``sum_v p_s (log p_s - log p_t)`` over the
    whole vocabulary, at every completion token, mean over tokens (nats), in float64."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, completion in zip(prompts, completions, strict=True):
            ids = torch.tensor([prompt + completion])
            m = len(completion)
            logits = [  # positions predicting the completion tokens
                model(input_ids=ids, logits_to_keep=m + 1).logits[0, :-1]
                for model in (student, teacher)
            ]
            for a in range(0, m, 64):
                ls = torch.log_softmax(logits[0][a : a + 64].double(), -1)
                lt = torch.log_softmax(logits[1][a : a + 64].double(), -1)
                total += float((ls.exp() * (ls - lt)).sum())
            count += m
    return total / max(1, count)


# --------------------------------------------------------------------------------------------
# agentopd: engine.generate, teacher.score, learner.step
# --------------------------------------------------------------------------------------------


class AgentopdStep:
    """One OPD step through agentopd's real components, with ``loss``."""

    def __init__(self, s: Setting, loss: str):
        from agentopd.engines.hf import HFEngine
        from agentopd.learner import Learner, LearnerConfig
        from agentopd.renderer import Renderer
        from agentopd.teachers import TeacherConfig
        from agentopd.teachers.hf import HFTeacher

        self.student, teacher_model = build_models(s.vocab)
        self.teacher_model = teacher_model
        self.renderer = Renderer(build_tokenizer(s.vocab))
        assert (self.renderer.eot_id, self.renderer.pad_id) == (EOS, PAD)
        self.engine = HFEngine(self.student, self.renderer.eot_id, self.renderer.pad_id)
        full = loss in FULL_VOCAB
        self.teacher = HFTeacher(
            teacher_model, self.renderer, TeacherConfig(topk=TOPK), keep_hidden=full
        )
        self.learner = Learner(
            self.student,
            LearnerConfig(lr=LR, micro_batch=s.batch, grad_clip=1.0),
            pad_id=self.renderer.pad_id,
            loss=loss,
            topk=TOPK,
            teacher_head=self.teacher.output_head() if full else None,
        )

    def __call__(self, prompts: list[list[int]], new: int, phases: Phases) -> dict[str, float]:
        from agentopd.engines import SamplingParams
        from agentopd.types import Episode, Segment, Turn

        # HFEngine takes no min_new_tokens; it generates with the model's generation config
        # plus its own arguments, so the forced length goes on the model's config.
        force_length(self.student.generation_config, new)
        params = SamplingParams(max_new_tokens=new, temperature=1.0, top_p=1.0)
        with phases("generation"):
            samples = self.engine.generate(prompts, params)
            episodes = []
            for i, (prompt, sample) in enumerate(zip(prompts, samples, strict=True)):
                n, m = len(prompt), len(sample.tokens)
                seg = Segment(prompt_len=n)
                seg.append(prompt, None, sampled=False)
                seg.append(sample.tokens, sample.logprobs, sampled=True)
                episodes.append(
                    Episode(
                        env="vs-trl",
                        task_id=str(i),
                        segments=[seg],
                        turns=[Turn(index=0, segment=0, start=n, end=n + m)],
                    )
                )
        assert all(len(x.tokens) == new for x in samples), "a sequence stopped early"
        completions = [list(x.tokens) for x in samples]
        before = true_rkl(self.student, self.teacher_model, prompts, completions)  # untimed
        with phases("teacher"):
            self.teacher.score(episodes)
        with phases("learner"):
            metrics = self.learner.step(episodes)
        after = true_rkl(self.student, self.teacher_model, prompts, completions)
        return {
            "loss": metrics.get("learner/loss", float("nan")),
            "tokens": metrics["learner/tokens"],
            "rkl_before": before,
            "rkl_after": after,
            "learner_true_rkl": metrics.get("diag/true_rkl", float("nan")),
        }


# --------------------------------------------------------------------------------------------
# TRL: DistillationTrainer.training_step, then the optimizer step its loop would take
# --------------------------------------------------------------------------------------------


class TrlStep:
    """One step of TRL's ``DistillationTrainer``, driven the way its training loop drives it."""

    def __init__(self, s: Setting, workdir: str):
        from datasets import Dataset
        from trl import DistillationConfig, DistillationTrainer

        self.student, teacher_model = build_models(s.vocab)
        tok = build_tokenizer(s.vocab)
        args = DistillationConfig(
            output_dir=workdir,
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
            per_device_train_batch_size=s.batch,
            gradient_accumulation_steps=1,
            learning_rate=LR,
            adam_beta2=0.95,
            max_grad_norm=1.0,
            max_completion_length=s.new,
            generation_kwargs={"min_new_tokens": s.new},
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            beta=1.0,
            report_to="none",
            save_strategy="no",
            logging_steps=10**9,
            disable_tqdm=True,
            seed=0,
        )
        self.trainer = t = DistillationTrainer(
            model=self.student,
            teacher_model=teacher_model,
            args=args,
            train_dataset=Dataset.from_dict({"prompt": ["t3"]}),
            processing_class=tok,
        )
        t.create_optimizer_and_scheduler(num_training_steps=100)
        t.current_gradient_accumulation_steps = 1  # what its loop sets for one pass per update
        self.tokenizer = tok
        self.teacher_model = teacher_model
        self.phases: Phases | None = None
        self.new = s.new
        self.batch: tuple[list[list[int]], list[list[int]]] | None = None
        self.rkl_before = float("nan")
        generate, hidden = t._generate_and_score_completions, t._get_last_hidden_state

        def timed_generate(inputs: Any) -> Any:
            assert self.phases is not None
            with self.phases("generation"):
                out = generate(inputs)
            assert (out["completion_mask"].sum(-1) == self.new).all(), "a sequence stopped early"
            with self.phases(UNTIMED):  # the true reverse KL before the update
                self.batch = (out["prompt_ids"].tolist(), out["completion_ids"].tolist())
                self.rkl_before = true_rkl(self.student, self.teacher_model, *self.batch)
            return out

        def timed_hidden(model: Any, *args: Any, **kwargs: Any) -> Any:
            if model is not self.teacher_model:
                return hidden(model, *args, **kwargs)
            assert self.phases is not None
            with self.phases("teacher"):
                return hidden(model, *args, **kwargs)

        t._generate_and_score_completions = timed_generate
        t._get_last_hidden_state = timed_hidden

    def __call__(self, prompts: list[list[int]], new: int, phases: Phases) -> dict[str, float]:
        import torch

        t = self.trainer
        force_length(t.generation_config, new)
        self.new = new
        texts = [" ".join(f"t{i}" for i in p) for p in prompts]
        assert self.tokenizer(text=texts[:1])["input_ids"][0] == prompts[0]
        self.phases = phases
        with phases("learner"):
            loss = t.training_step(t.model, [{"prompt": x} for x in texts], None)
            torch.nn.utils.clip_grad_norm_(t.model.parameters(), t.args.max_grad_norm)
            t.optimizer.step()
            t.lr_scheduler.step()
            t.model.zero_grad()
        self.phases = None
        assert self.batch is not None and self.batch[0][0] == prompts[0]
        after = true_rkl(self.student, self.teacher_model, *self.batch)
        return {"loss": float(loss), "rkl_before": self.rkl_before, "rkl_after": after}


# --------------------------------------------------------------------------------------------
# One child process per (setting, side)
# --------------------------------------------------------------------------------------------


def child(setting: Setting, side: str, repeats: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as workdir:
        step = TrlStep(setting, workdir) if side == "trl" else AgentopdStep(setting, side)
        setup_mb = _status_kb("VmRSS") / 1024
        warm = Setting(setting.vocab, WARMUP.batch, WARMUP.prompt, WARMUP.new)
        step(make_prompts(warm, seed=99), warm.new, Phases())
        baseline_mb = _status_kb("VmRSS") / 1024
        steps = []
        for r in range(repeats):
            phases = Phases()
            out = step(make_prompts(setting, seed=r), setting.new, phases)
            steps.append({**phases.result(), **out})
    return {"setup_mb": setup_mb, "baseline_mb": baseline_mb, "steps": steps}


def run_child(setting: Setting, side: str, repeats: int, malloc: str) -> dict[str, Any]:
    """Run :func:`child` in a fresh interpreter (one torch thread) and return its result."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["TOKENIZERS_PARALLELISM"] = "false"
    if malloc == "fixed":
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    spec = json.dumps({"setting": asdict(setting), "side": side, "repeats": repeats})
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, __file__, "--child", spec, "--out", out.name]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{side} child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(Path(out.name).read_text())


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    steps = result["steps"]

    def med(get: Any) -> float:
        return statistics.median(get(s) for s in steps)

    phases = ("generation", "teacher", "learner")
    return {
        "step_s": med(lambda s: s["step_seconds"]),
        **{f"{p}_s": med(lambda s, p=p: s["seconds"].get(p, 0.0)) for p in phases},
        "peak_mb": max(s["peak_mb"] for s in steps),
        "gen_extra_mb": med(lambda s: s["extra_mb"].get("generation", 0.0)),
        "teacher_extra_mb": med(lambda s: s["extra_mb"].get("teacher", 0.0)),
        "learner_extra_mb": med(lambda s: s["extra_mb"].get("learner", 0.0)),
        "rkl_before": med(lambda s: s["rkl_before"]),
        "rkl_drop": med(lambda s: s["rkl_before"] - s["rkl_after"]),
        "rkl_drop_rel": med(lambda s: (s["rkl_before"] - s["rkl_after"]) / s["rkl_before"]),
        "setup_mb": result["setup_mb"],
        "baseline_mb": result["baseline_mb"],
        "steps": steps,
    }


def tables(rows: list[dict[str, Any]]) -> str:
    out = [
        "| setting | agentopd loss | step time agentopd/TRL | learner agentopd/TRL "
        "| peak memory agentopd/TRL | generation extra MB agentopd / TRL "
        "| true-RKL drop per step agentopd/TRL |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        trl = r["trl"]
        for loss in SIDES[1:]:
            if loss not in r:
                continue
            a = r[loss]
            out.append(
                f"| {r['setting']} | {loss} | {a['step_s'] / trl['step_s']:.2f} "
                f"| {a['learner_s'] / trl['learner_s']:.2f} | {a['peak_mb'] / trl['peak_mb']:.2f} "
                f"| {a['gen_extra_mb']:.1f} / {trl['gen_extra_mb']:.1f} "
                f"| {a['rkl_drop'] / trl['rkl_drop']:.2f} |"
            )
    out += [
        "",
        "| setting | V, batch, prompt + new | side | step s | generation s | teacher s "
        "| learner s | peak MB | before the step MB | extra MB: generation, teacher, learner |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r, name, x in _sides(rows):
        s = r["config"]
        what = f"{s['vocab']:,}, {s['batch']}, {s['prompt']:,} + {s['new']}"
        out.append(
            f"| {r['setting']} | {what} | {name} | {x['step_s']:.2f} | {x['generation_s']:.2f} "
            f"| {x['teacher_s']:.2f} | {x['learner_s']:.2f} | {x['peak_mb']:.0f} "
            f"| {x['baseline_mb']:.0f} | {x['gen_extra_mb']:.0f}, {x['teacher_extra_mb']:.0f}, "
            f"{x['learner_extra_mb']:.0f} |"
        )
    out += [
        "",
        "| setting | side | true RKL before (nats/token) | drop per step (nats/token) | relative |",
        "|---|---|---|---|---|",
    ]
    for r, name, x in _sides(rows):
        out.append(
            f"| {r['setting']} | {name} | {x['rkl_before']:.4f} | {x['rkl_drop']:.3e} "
            f"| {x['rkl_drop_rel']:.2e} |"
        )
    return "\n".join(out)


def _sides(rows: list[dict]) -> list[tuple[dict, str, dict]]:
    """``(row, side's name, side's numbers)`` for every side each row measured."""
    return [
        (r, "TRL" if side == "trl" else f"agentopd {side}", r[side])
        for r in rows
        for side in SIDES
        if side in r
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", type=int, nargs="+", default=list(SETTINGS), choices=SETTINGS)
    p.add_argument("--repeats", type=int, default=3, help="timed steps per child (medians)")
    p.add_argument("--losses", nargs="+", default=list(SIDES[1:]), choices=SIDES[1:])
    p.add_argument("--quick", action="store_true", help="one small setting (a smoke test)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument(
        "--malloc",
        default="fixed",
        choices=("fixed", "default"),
        help="fixed: glibc's mmap threshold pinned, so freed buffers leave the RSS",
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.child:
        spec = json.loads(a.child)
        result = child(Setting(**spec["setting"]), spec["side"], spec["repeats"])
        Path(a.out).write_text(json.dumps(result))
        return

    import importlib.util

    if importlib.util.find_spec("trl") is None:
        raise SystemExit("TRL is not installed: pip install trl==1.16 (this benchmark only)")
    chosen = {"quick": QUICK} if a.quick else {str(k): SETTINGS[k] for k in a.settings}
    rows = []
    for name, setting in chosen.items():
        row: dict[str, Any] = {"setting": name, "config": asdict(setting)}
        for side in ("trl", *a.losses):
            start = time.perf_counter()
            row[side] = summarise(run_child(setting, side, a.repeats, a.malloc))
            print(
                f"setting {name} {side}: step {row[side]['step_s']:.2f}s, peak "
                f"{row[side]['peak_mb']:.0f} MB ({time.perf_counter() - start:.0f}s wall)",
                file=sys.stderr,
                flush=True,
            )
        rows.append(row)
        if a.out:  # after every setting, so an interrupted run keeps what it measured
            write(a, rows)
    print(tables(rows))


def write(a: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    """The results so far, with what they were measured with, as JSON at ``--out``."""
    import trl

    meta = {
        "trl": trl.__version__,
        "threads": 1,
        "malloc": a.malloc,
        "repeats": a.repeats,
        "student": {**STUDENT, **COMMON},
        "teacher": {**TEACHER, **COMMON},
    }
    Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
