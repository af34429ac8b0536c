/* SPDX-License-Identifier: MIT */
/* libFuzzer harness: the RESP server's command parser and commands (bench/servers/resp.c). The
 * store is emptied every 256 inputs (a scan of the whole table), so a run does not grow without
 * bound. */
#define main resp_server_main
#include "resp.c"
#undef main

#include "fuzz_server.h"

static void store_clear(void)
{
	for (size_t i = 0; i < NBUCKETS; i++)
		while (table[i]) {
			struct entry *e = table[i];
			table[i] = e->next;
			free(e->val);
			free(e);
		}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static unsigned runs;
	fuzz_feed(data, size, IN_CAP, OUT_CAP, resp_process);
	if (++runs % 256 == 0)
		store_clear();
	return 0;
}
