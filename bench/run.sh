#!/usr/bin/env bash
# Build concur (Release) and run the whole benchmark suite against its peers, in one run.
# Installs what is missing first (Debian, as root): the build tools and every peer.
# Usage: bash bench/run.sh [run.py options: --quick, --filter NAME, --runs N, --list ...]
set -euo pipefail
cd "$(dirname "$0")/.."

bash .ci/deps.sh
# Peers only the benchmarks use (kept out of .ci/deps.sh, so the test setup stays light): Go,
# Boost.Context / Boost.Fiber with a C++ compiler, and nginx's stream module (the proxy workload's
# peer). Not root, or apt-get failing: they are skipped.
bench_only=(g++ golang-go libboost-context-dev libboost-fiber-dev libnginx-mod-stream)
missing=()
for p in "${bench_only[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	echo "== installing the benchmark-only peers: ${missing[*]}" >&2
	install() {
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			"${missing[@]}" >/dev/null
	}
	{ [ "$(id -u)" -eq 0 ] && { install || { apt-get update -qq && install; }; }; } ||
		echo "== could not install ${missing[*]}: those peers will be reported SKIPPED" >&2
fi

echo "== building (Release) in build-bench/" >&2
cmake -S . -B build-bench -DCMAKE_BUILD_TYPE=Release -DCONCUR_TESTS=OFF >/dev/null
cmake --build build-bench -j"$(nproc)" >/dev/null
exec python3 bench/run.py --build-dir build-bench "$@"
