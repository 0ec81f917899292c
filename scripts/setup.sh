#!/usr/bin/env bash
# Sets up everything the project needs, inside the project folder only:
#   .venv/                  Python venv with sealroom installed editable, dev extras, CPU torch
#   tools/node_modules/     anvil, forge and solc from the npm registry, pinned by tools/package-lock.json
# Idempotent: each part is redone only when its inputs (pyproject.toml, the npm lock) changed.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

stamp_ok() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; }

py_inputs=$(sha256sum pyproject.toml | cut -d' ' -f1)
if ! stamp_ok .venv/.sealroom-stamp "$py_inputs"; then
  echo "setup: creating Python venv in .venv"
  [ -x .venv/bin/python ] || python3 -m venv .venv
  pipq() { .venv/bin/pip install --quiet "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }; }
  pipq --upgrade pip
  # torch first, pinned to the CPU build, so that no other dependency can pull a CUDA build
  pipq 'torch==2.13.0'
  pipq -e '.[dev]'
  if .venv/bin/pip list 2>/dev/null | grep -qi '^nvidia-'; then
    echo "setup: error: a CUDA package was pulled into the venv" >&2; exit 1
  fi
  echo "$py_inputs" > .venv/.sealroom-stamp
fi

npm_inputs=$(sha256sum tools/package-lock.json | cut -d' ' -f1)
if ! stamp_ok tools/node_modules/.sealroom-stamp "$npm_inputs"; then
  echo "setup: installing anvil, forge and solc from npm into tools/node_modules"
  (cd tools && npm ci --no-audit --no-fund --loglevel=error)
  echo "$npm_inputs" > tools/node_modules/.sealroom-stamp
fi

# bubblewrap isolates each study run (compose/backends.py). Without it runs still work, and every run record and
# API answer says NOT ISOLATED. Installed from Debian when this machine lets us (root with apt-get).
if ! command -v bwrap >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing bubblewrap (Debian) to sandbox study runs"
  if ! { apt-get update -qq && apt-get install -y -qq bubblewrap; } >/dev/null 2>&1; then
    echo "setup: note: bubblewrap could not be installed; study runs will say NOT ISOLATED" >&2
  fi
fi

# Chromium for the owners' console browser tests (tests/test_console_browser.py: Playwright from PyPI drives Debian's
# /usr/bin/chromium; no browser is downloaded). Without it those tests are skipped, saying why.
if ! [ -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing chromium (Debian) for the console's browser tests"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1; then
    echo "setup: note: chromium could not be installed; the console's browser tests will be skipped" >&2
  fi
fi

# A container engine for the container backend (compose/backends/container.py, which starts `podman system service`
# itself): podman and runc from Debian, where no engine is present and this machine lets us (root with apt-get).
# Without one the container backend's tests are skipped, saying so loudly; the process backend works as before.
if ! command -v podman >/dev/null 2>&1 && ! [ -S /var/run/docker.sock ] && [ "$(id -u)" = 0 ] \
    && command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing podman and runc (Debian) for the container backend"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      podman runc crun uidmap slirp4netns fuse-overlayfs; } >/dev/null 2>&1; then
    echo "setup: note: podman could not be installed; the container backend cannot run here" >&2
  fi
fi
