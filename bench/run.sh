#!/usr/bin/env bash
# Build concur (Release) and run the whole benchmark suite against its peers, in one run.
# Installs what is missing first (Debian, as root): the build tools and every peer.
# Usage: bash bench/run.sh [run.py options: --quick, --filter NAME, --runs N, --list ...]
set -euo pipefail
cd "$(dirname "$0")/.."

bash .ci/deps.sh

echo "== building (Release) in build-bench/" >&2
cmake -S . -B build-bench -DCMAKE_BUILD_TYPE=Release -DCONCUR_TESTS=OFF >/dev/null
cmake --build build-bench -j"$(nproc)" >/dev/null
exec python3 bench/run.py --build-dir build-bench "$@"
