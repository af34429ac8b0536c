#!/usr/bin/env bash
# Build concur (Release) and run the whole benchmark suite against its peers, in one run.
# Installs what is missing first (Debian, as root): the build tools and every peer.
# Usage: bash bench/run.sh [run.py options: --quick, --filter NAME, --runs N, --list ...]
set -euo pipefail
cd "$(dirname "$0")/.."

need=(cmake make gcc g++ pkg-config liburing-dev libcmocka-dev python3
      libuv1-dev wrk nginx-light redis-server redis-tools fio)
missing=()
for p in "${need[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	echo "== installing: ${missing[*]}" >&2
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
	# the Debian packages start services on install; the suite starts its own on loopback
	for s in nginx redis-server; do systemctl stop "$s" 2>/dev/null || service "$s" stop 2>/dev/null || true; done
fi

echo "== building (Release) in build-bench/" >&2
cmake -S . -B build-bench -DCMAKE_BUILD_TYPE=Release -DCONCUR_TESTS=OFF >/dev/null
cmake --build build-bench -j"$(nproc)" >/dev/null
exec python3 bench/run.py --build-dir build-bench "$@"
