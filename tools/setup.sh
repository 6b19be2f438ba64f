#!/usr/bin/env bash
# `make setup`: .venv with the pinned stack, AudioCraft 1.3.0's source (its config tree) in audiocraft/, and an
# ffmpeg binary on the venv's PATH. No root needed. Idempotent: a finished setup is recorded in a stamp file
# holding a hash of its inputs, and a second run with the same inputs returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."

AUDIOCRAFT_VERSION=1.3.0
VENV=.venv
STAMP=$VENV/.setup-stamp
SRC=${AUDIOCRAFT_SRC:-audiocraft}

inputs_hash=$( { cat requirements.lock tools/setup.sh pyproject.toml; echo "$SRC"; } | sha256sum | cut -d' ' -f1)
if [[ -f $STAMP && "$(cat "$STAMP")" == "$inputs_hash" && -x $VENV/bin/python ]]; then
    echo "setup: up to date ($VENV)"
    exit 0
fi

# A Python AudioCraft and the pinned torch support: 3.10 to 3.12.
supported() { "$1" -c 'import sys; sys.exit(not ((3, 10) <= sys.version_info[:2] <= (3, 12)))'; }
if [[ -n ${PYTHON:-} ]] && ! supported "$PYTHON" 2>/dev/null; then
    echo "setup: PYTHON=$PYTHON is not a Python 3.10, 3.11 or 3.12 ($("$PYTHON" --version 2>&1 || echo 'not found'))." >&2
    exit 1
fi
if [[ -x $VENV/bin/python ]] && ! supported "$VENV/bin/python"; then
    echo "setup: $VENV was made with $($VENV/bin/python --version 2>&1); remove it (rm -rf $VENV) and re-run." >&2
    exit 1
fi

pick_python() {
    for candidate in ${PYTHON:-} python3 python3.12 python3.11 python3.10; do
        command -v "$candidate" >/dev/null 2>&1 || continue
        if supported "$candidate"; then
            echo "$candidate"; return 0
        fi
    done
    return 1
}
if ! PY=$(pick_python); then
    found=$(python3 --version 2>&1 || echo "no python3")
    echo "setup: needs Python 3.10, 3.11 or 3.12 (found: $found). Install one of them and re-run," \
         "or point PYTHON=/path/to/python3.11 at it: make setup PYTHON=..." >&2
    exit 1
fi

if [[ ! -x $VENV/bin/python ]]; then
    echo "setup: creating $VENV with $($PY --version)"
    "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check --quiet)

echo "setup: installing the pinned stack from requirements.lock (a CUDA build of torch: several GB the first time)"
"${PIP[@]}" install -r requirements.lock

# AudioCraft's PyPI release ships its yaml config tree only in the source archive; unpack it once.
if [[ -z ${AUDIOCRAFT_SRC:-} && ! -f $SRC/config/config.yaml ]]; then
    echo "setup: unpacking the AudioCraft $AUDIOCRAFT_VERSION source into $SRC/"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    "${PIP[@]}" download --no-deps --no-binary :all: "audiocraft==$AUDIOCRAFT_VERSION" -d "$tmp"
    mkdir -p "$tmp/src"
    tar -xzf "$tmp/audiocraft-$AUDIOCRAFT_VERSION.tar.gz" -C "$tmp/src" --strip-components=1
    rm -rf "$SRC" && mv "$tmp/src" "$SRC"
fi
if [[ ! -f $SRC/config/config.yaml ]]; then
    echo "setup: $SRC has no config/config.yaml; AUDIOCRAFT_SRC must be an AudioCraft source checkout." >&2
    exit 1
fi
echo "setup: installing AudioCraft from $SRC without its outdated pins"
"${PIP[@]}" install --no-deps "$SRC"

# Our package, editable: importable from anywhere in the venv (dora -P musicgen_finetune), this checkout's code.
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
rm -f "$site/musicgen_finetune.pth"  # what earlier versions of this script wrote instead
echo "setup: installing musicgen_finetune (editable, pyproject.toml)"
"${PIP[@]}" install --no-deps --no-build-isolation --editable .

# AudioCraft pipes every audio file it writes through the ffmpeg binary. Use the system's when there is one,
# else the static build that the imageio-ffmpeg wheel carries.
if ! command -v ffmpeg >/dev/null 2>&1; then
    ln -sf "$("$VENV/bin/python" -c 'import imageio_ffmpeg; print(imageio_ffmpeg.get_ffmpeg_exe())')" "$VENV/bin/ffmpeg"
fi
"$VENV/bin/python" -c 'import audiocraft, torch; print(f"setup: audiocraft {audiocraft.__version__}, torch {torch.__version__}")'
# librosa's numba kernels, compiled into its cache now, by this one process: processes compiling them at the same
# time can leave a cache that crashes whoever loads it (musicgen_finetune/data/librosa_loader.py).
echo "setup: compiling librosa's numba kernels"
"$VENV/bin/python" -m musicgen_finetune.data.librosa_loader
echo "$inputs_hash" > "$STAMP"
echo "setup: done"
