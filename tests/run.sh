#!/usr/bin/env bash
# Build concur and pass every test, the way CI does: installs what is missing (Debian, as root),
# then builds three ways -- normal, ASan+UBSan, TSan -- with -Werror and runs all tests in each;
# any sanitizer report fails the run (the reliability suite included: test_stress, a seeded
# random stress; test_fault, fault injection), then the libFuzzer harnesses of tests/fuzz for
# FUZZ_SECONDS each (60). Finally the benchmark suite's smoke mode (--quick), so the suite
# cannot rot. Usage: bash tests/run.sh [--long]
#   --long: also a long reliability run in the normal build: CONCUR_STRESS_SEEDS (20) seeds of
#   CONCUR_STRESS_OPS (1000000) operations, the full fault-injection sweep, 10 min of fuzzing.
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

long=0
[ "${1:-}" = --long ] && long=1

start=$(date +%s)
run normal
# the fallback switch of CPUs without concur's assembly one (anything but x86-64 and aarch64)
run ucontext -DCONCUR_UCONTEXT=ON
run asan-ubsan -DCONCUR_SANITIZE=address,undefined
run tsan -DCONCUR_SANITIZE=thread
echo "== fuzz: bash tests/fuzz/run.sh"
bash tests/fuzz/run.sh "${FUZZ_SECONDS:-$([ $long = 1 ] && echo 600 || echo 60)}" build-test/fuzz
if [ $long = 1 ]; then
	echo "== long reliability run (normal build)"
	CONCUR_STRESS_SEEDS=${CONCUR_STRESS_SEEDS:-20} CONCUR_STRESS_OPS=${CONCUR_STRESS_OPS:-1000000} \
		build-test/normal/tests/test_stress
	CONCUR_FAULT_FULL=1 build-test/normal/tests/test_fault
fi
echo "== bench smoke: python3 bench/run.py --quick"
python3 bench/run.py --quick --build-dir build-test/normal --out build-test/bench-quick
echo "== all tests passed in normal, ucontext, asan-ubsan and tsan builds ($(($(date +%s) - start)) s)"
