#!/usr/bin/env bash
# The demo: compile the bundled MiniLM example into the default local store (or $KILN_STORE),
# show the release, then compile again to show that nothing is redone.
set -euo pipefail
KILN="${KILN:-.venv/bin/kiln}"
export PJRT_DEVICE=CPU
echo "== kiln compile workflows/examples/minilm.yaml"
"$KILN" compile workflows/examples/minilm.yaml
echo "== kiln show minilm:latest"
"$KILN" show minilm:latest
echo "== again: every graph is a direct cache hit"
"$KILN" compile workflows/examples/minilm.yaml
"$KILN" stats
