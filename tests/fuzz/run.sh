#!/usr/bin/env bash
# Build the libFuzzer harnesses of tests/fuzz (clang, ASan+UBSan, libconcur with coverage) and
# run each (the API call-sequence fuzzer and the servers' HTTP and RESP parsers) for SECONDS
# (default 60) from its committed seed corpus tests/fuzz/corpus/<name>/.
# New inputs go to a scratch corpus in the build dir, never into the repository; a crash, leak
# or timeout fails the run and leaves its reproducer there (replay: <fuzzer> <file>).
# Usage: bash tests/fuzz/run.sh [SECONDS] [BUILD_DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-60}
build=${2:-build-fuzz}

# libFuzzer comes with clang (Debian: clang, libclang-rt-14-dev; .ci/deps.sh installs them)
if ! command -v clang >/dev/null ||
	! echo 'int LLVMFuzzerTestOneInput(const char *d, long n) { return 0; }' |
	clang -x c -fsanitize=fuzzer -o /dev/null - 2>/dev/null; then
	echo "== fuzz: clang with libFuzzer not found, skipped"
	exit 0
fi
cmake -S . -B "$build" -DCMAKE_C_COMPILER=clang -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	-DCONCUR_WERROR=ON -DCONCUR_BENCH=OFF -DCONCUR_FUZZ=ON -DCONCUR_SANITIZE=address,undefined >/dev/null
cmake --build "$build" -j"$(nproc)" >/dev/null

for bin in "$build"/tests/fuzz/fuzz_*; do
	[ -x "$bin" ] || continue
	name=$(basename "$bin")
	work="$build/fuzz-work/$name"
	mkdir -p "$work/corpus"
	if ! "$bin" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
		-artifact_prefix="$work/" "$work/corpus" "tests/fuzz/corpus/$name" 2>"$work/log"; then
		tail -60 "$work/log"
		echo "== fuzz: $name FAILED (reproducer in $work/)"
		exit 1
	fi
	execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/log")
	echo "== fuzz: $name: ${execs:-?} inputs in $secs s, no failure"
done
