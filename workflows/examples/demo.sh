#!/usr/bin/env bash
# The demo: a store round trip in a throwaway store (replaced by the MiniLM compile once the
# pipeline lands). Uses only the `kiln` command line.
set -euo pipefail
KILN="${KILN:-.venv/bin/kiln}"
PY="${PY:-.venv/bin/python}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export KILN_STORE="$work/store"
"$PY" workflows/examples/make_demo_release.py
"$KILN" ls
"$KILN" show demo:latest
"$KILN" verify
"$KILN" export demo:latest -o "$work/demo.tar"
KILN_STORE="$work/other" "$KILN" import "$work/demo.tar"
KILN_STORE="$work/other" "$KILN" ls
