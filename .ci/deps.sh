#!/usr/bin/env bash
# Install, with apt-get, whatever concur needs that is missing (Debian, as root): the build and
# test tools, and the benchmark peers. Used by tests/run.sh and bench/run.sh.
set -euo pipefail
need=(cmake make gcc g++ pkg-config liburing-dev libcmocka-dev python3 curl
      libuv1-dev wrk nginx-light redis-server redis-tools fio
      clang libclang-rt-14-dev) # clang + libFuzzer: tests/fuzz
missing=()
for p in "${need[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "== installing: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# the Debian packages start their services on install; the tests and benchmarks start their own
for s in nginx redis-server; do
	systemctl stop "$s" 2>/dev/null || service "$s" stop 2>/dev/null || true
done
