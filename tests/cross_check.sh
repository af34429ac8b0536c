#!/usr/bin/env bash
# Developer check of the assembly context switches, without the library (no liburing): builds
# tests/fiber_switch_check.c with src/fiber_<cpu>.S and runs it, natively on x86-64 and under
# qemu-user for aarch64 -- when aarch64-linux-gnu-gcc and qemu-aarch64 are installed (Debian:
# apt-get install gcc-aarch64-linux-gnu qemu-user); without them aarch64 is skipped. On aarch64 it
# also builds with -mbranch-protection=standard and runs tests/fiber_bti_check.c with BTI enforced.
# Not part of ctest or CI (the CI machines have no cross tools). Usage: bash tests/cross_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
fails=0
ran=0

check() { # name, command...
	local name=$1
	shift
	ran=$((ran + 1))
	local log="$out/log"
	if "$@" >"$log" 2>&1; then
		echo "PASS  $name: $(tail -n 1 "$log")"
	else
		echo "FAIL  $name"
		sed 's/^/      /' "$log" | head -n 30
		fails=$((fails + 1))
	fi
}

build_run() { # name, runner ("" for native), compiler, flags, sources...
	local name=$1 runner=$2 cc=$3 flags=$4
	shift 4
	# shellcheck disable=SC2086
	if ! "$cc" $flags -o "$out/$name" "$@" >"$out/log" 2>&1; then
		ran=$((ran + 1))
		echo "FAIL  $name: does not build"
		sed 's/^/      /' "$out/log" | head -n 30
		fails=$((fails + 1))
		return
	fi
	# shellcheck disable=SC2086
	check "$name" timeout 300 $runner "$out/$name"
}

cflags="-O2 -Wall -Wextra -Werror -std=gnu11"

if [ "$(uname -m)" = x86_64 ] && command -v cc >/dev/null; then
	build_run x86_64 "" cc "$cflags" tests/fiber_switch_check.c src/fiber_x86_64.S
	build_run x86_64-O0 "" cc "-O0 -g -Wall" tests/fiber_switch_check.c src/fiber_x86_64.S
	build_run x86_64-cet "" cc "$cflags -fcf-protection=full" tests/fiber_switch_check.c \
		src/fiber_x86_64.S
else
	echo "SKIP  x86_64: not an x86-64 machine"
fi

if command -v aarch64-linux-gnu-gcc >/dev/null && command -v qemu-aarch64 >/dev/null; then
	a64=aarch64-linux-gnu-gcc
	build_run aarch64 qemu-aarch64 $a64 "$cflags -static" tests/fiber_switch_check.c \
		src/fiber_aarch64.S
	build_run aarch64-O0 qemu-aarch64 $a64 "-O0 -g -Wall -static" tests/fiber_switch_check.c \
		src/fiber_aarch64.S
	build_run aarch64-pac-bti qemu-aarch64 $a64 "$cflags -static -mbranch-protection=standard" \
		tests/fiber_switch_check.c src/fiber_aarch64.S
	# enforced BTI: no libc, so that every object carries the BTI note
	build_run aarch64-bti-enforced "qemu-aarch64 -cpu max" $a64 \
		"$cflags -static -nostdlib -ffreestanding -fno-stack-protector -mbranch-protection=standard" \
		tests/fiber_bti_check.c src/fiber_aarch64.S
	if [ -x "$out/aarch64-bti-enforced" ]; then
		ran=$((ran + 1))
		if aarch64-linux-gnu-readelf -n "$out/aarch64-bti-enforced" | grep -q 'feature: BTI'; then
			echo "PASS  aarch64-bti-enforced: the program is marked BTI (guarded pages)"
		else
			echo "FAIL  aarch64-bti-enforced: the program is not marked BTI, so nothing was enforced"
			fails=$((fails + 1))
		fi
	fi
else
	echo "SKIP  aarch64: needs aarch64-linux-gnu-gcc and qemu-aarch64" \
		"(apt-get install gcc-aarch64-linux-gnu qemu-user)"
fi

if [ "$ran" -eq 0 ]; then
	echo "FAIL: nothing was checked"
	exit 1
fi
if [ "$fails" -ne 0 ]; then
	echo "FAIL: $fails of $ran checks failed"
	exit 1
fi
echo "PASS: all $ran checks"
