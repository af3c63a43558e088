#!/usr/bin/env bash
# Builds llama.cpp's command-line tools (llama-bench, llama-perplexity, llama-completion, llama-tokenize,
# llama-quantize) from the llama.cpp that the PyPI sdist of llama-cpp-python vendors (the package registries are
# the only network here), with its converter, gguf-py and Python binding beside them. A benchmark dependency,
# never a test one. Idempotent: the finished build lives under $BRICKWORK_HOME/llama.cpp/<version>-<cpu flags
# hash>/ and is only ever moved into place complete. Prints that folder.
# About 25 minutes on 2 lightly loaded cores (measured 2026-11-26), an hour on busy ones.
set -euo pipefail

VERSION=0.3.36
SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
HOME_DIR="${BRICKWORK_HOME:-$HOME/.cache/brickwork}"
# Built for this CPU (GGML_NATIVE), so the cache is keyed on the CPU's flags: machines here change class.
CPU_KEY="$(grep -m1 '^flags' /proc/cpuinfo | sha256sum | cut -c1-12)"
DEST="$HOME_DIR/llama.cpp/$VERSION-$CPU_KEY"
PIP="${PIP:-${VENV:-.venv}/bin/pip}"

if [ -x "$DEST/bin/llama-bench" ] && [ -x "$DEST/bin/llama-quantize" ] && [ -d "$DEST/conversion" ]; then
    echo "$DEST"
    exit 0
fi
command -v cmake >/dev/null || { echo "cmake is needed to build llama.cpp (apt-get install cmake)" >&2; exit 1; }

WORK="$(mktemp -d "$HOME_DIR/llama.cpp.tmp.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
"$PIP" download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK" >&2
SDIST="$WORK/llama_cpp_python-$VERSION.tar.gz"
echo "$SHA256  $SDIST" | sha256sum -c --quiet - >&2 || {
    echo "llama-cpp-python $VERSION sdist does not have the pinned SHA-256 $SHA256" >&2
    exit 1
}
tar -xzf "$SDIST" -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION"
cmake -S "$SRC/vendor/llama.cpp" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF -DBUILD_SHARED_LIBS=ON '-DCMAKE_BUILD_RPATH=$ORIGIN' >&2
cmake --build "$WORK/build" -j "$(nproc)" --target llama-bench llama-perplexity llama-completion llama-tokenize llama-quantize >&2

mkdir -p "$WORK/out"
cp -a "$WORK/build/bin" "$WORK/out/bin"
# The converter and gguf-py that match this llama.cpp, and the Python binding (used with LLAMA_CPP_LIB_PATH=bin).
cp -a "$SRC/vendor/llama.cpp/convert_hf_to_gguf.py" "$SRC/vendor/llama.cpp/conversion" "$SRC/vendor/llama.cpp/gguf-py" "$WORK/out/"
cp -a "$SRC/llama_cpp" "$WORK/out/llama_cpp"
echo "llama-cpp-python $VERSION ($SHA256)" > "$WORK/out/SOURCE"
mkdir -p "$(dirname "$DEST")"
rm -rf "$DEST"
mv "$WORK/out" "$DEST"
echo "$DEST"
