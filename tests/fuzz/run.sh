#!/usr/bin/env bash
# Build and run the libFuzzer harnesses of the example servers' parsers (HTTP, RESP), each for
# SECONDS (default 60), under ASan+UBSan. Needs clang and libFuzzer (Debian: clang,
# libclang-rt-14-dev or the clang version's libclang-rt-N-dev). The committed corpus in
# tests/fuzz/corpus/<name> seeds each run and is not written to; new inputs go to a temporary
# directory, crashes to build-fuzz/. Usage: bash tests/fuzz/run.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-60}
out=build-fuzz
mkdir -p "$out"
for name in http resp; do
	clang -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
		-Iinclude -Ibench/servers -o "$out/fuzz_$name" "tests/fuzz/fuzz_$name.c" -lpthread
	work=$(mktemp -d)
	echo "== fuzz_$name: ${secs}s"
	(cd "$out" && "./fuzz_$name" -max_total_time="$secs" -max_len=70000 -timeout=10 \
		-rss_limit_mb=2048 -print_final_stats=1 "$work" "../tests/fuzz/corpus/$name")
	rm -rf "$work"
done
echo "== fuzz: no crash"
