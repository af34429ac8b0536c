#!/usr/bin/env bash
# Build concur and pass every test, the way CI does: installs what is missing (Debian, as root),
# then builds three ways -- normal, ASan+UBSan, TSan -- with -Werror and runs all tests in each;
# any sanitizer report fails the run. Finally the benchmark suite's smoke mode (--quick), so the
# suite cannot rot. Usage: bash tests/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."

bash .ci/deps.sh

export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:strict_string_checks=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1

run() { # name, cmake options...
	local name=$1
	shift
	echo "== build: $name"
	cmake -S . -B "build-test/$name" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCONCUR_WERROR=ON "$@" >/dev/null
	cmake --build "build-test/$name" -j"$(nproc)" >/dev/null
	echo "== test: $name"
	ctest --test-dir "build-test/$name" --output-on-failure --timeout 600
}

start=$(date +%s)
run normal
run asan-ubsan -DCONCUR_SANITIZE=address,undefined
run tsan -DCONCUR_SANITIZE=thread
echo "== bench smoke: python3 bench/run.py --quick"
python3 bench/run.py --quick --build-dir build-test/normal --out build-test/bench-quick
echo "== all tests passed in normal, asan-ubsan and tsan builds ($(($(date +%s) - start)) s)"
