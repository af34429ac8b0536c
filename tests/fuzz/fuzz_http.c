/* SPDX-License-Identifier: MIT */
/* libFuzzer harness: the HTTP server's request parser (bench/servers/http.c). */
#define main http_server_main
#include "http.c"
#undef main

#include "fuzz_server.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	fuzz_feed(data, size, IN_CAP, OUT_CAP, http_process);
	return 0;
}
