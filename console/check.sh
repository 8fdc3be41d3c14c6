#!/usr/bin/env bash
# Checks that the committed generated code (src/gen) and bundle (dist/) are what the sources
# make today: regenerates from ../proto and bundles into a temporary folder, and compares.
# `mesh up` embeds dist/ into the Rust binary, so a stale dist/ ships a stale page.
#
#   bash console/check.sh          (from anywhere; installs node_modules with `npm ci` if missing)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

if [[ ! -d node_modules ]]; then
  echo "check: node_modules missing, running npm ci"
  npm ci --no-audit --no-fund
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# buf writes the template's `out` (src/gen) under --output, so this regenerates into
# "$tmp/gen/src/gen" with the same template, plugin and inputs, leaving src/gen alone.
node_modules/.bin/buf generate --output "$tmp/gen"
node build.mjs --out "$tmp/dist" >/dev/null

failed=0
if ! diff -r src/gen "$tmp/gen/src/gen" >"$tmp/gen.diff"; then
  echo "check: src/gen differs from what buf generates from ../proto:" >&2
  head -n 40 "$tmp/gen.diff" >&2
  failed=1
fi
if ! diff -r --brief dist "$tmp/dist" >"$tmp/dist.diff"; then
  echo "check: dist/ differs from a fresh bundle of the sources:" >&2
  cat "$tmp/dist.diff" >&2
  failed=1
fi
if [[ $failed -ne 0 ]]; then
  echo "check: FAILED. Refresh the committed files with: (cd console && npm run build), then commit console/src/gen and console/dist" >&2
  exit 1
fi
echo "check: src/gen and dist/ are up to date"
