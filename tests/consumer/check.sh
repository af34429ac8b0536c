#!/usr/bin/env bash
# Install concur from a build tree into a scratch prefix, then build and run a consumer against
# it twice: with CMake's find_package(concur) and with pkg-config. Usage: check.sh BUILD_DIR
set -euo pipefail
build=$1
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cmake --install "$build" --prefix "$tmp/prefix" >/dev/null
libdir=$(ls -d "$tmp"/prefix/lib*/ | head -n 1)

cmake -S "$here" -B "$tmp/cmake" -DCMAKE_PREFIX_PATH="$tmp/prefix" >/dev/null
cmake --build "$tmp/cmake" >/dev/null
LD_LIBRARY_PATH="$libdir" "$tmp/cmake/consumer"

export PKG_CONFIG_PATH="$libdir/pkgconfig"
cc -std=gnu11 "$here/main.c" $(pkg-config --cflags concur) $(pkg-config --libs concur) -o "$tmp/pc"
LD_LIBRARY_PATH="$libdir" "$tmp/pc"
cc -std=gnu11 "$here/main.c" $(pkg-config --cflags --static concur) \
	"$libdir/libconcur.a" $(pkg-config --libs-only-other --libs-only-l --static liburing) -pthread \
	-o "$tmp/pc-static"
"$tmp/pc-static"
echo "consumer: find_package and pkg-config (shared and static) both work"
