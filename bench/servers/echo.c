/* SPDX-License-Identifier: MIT */
/* An echo server: every byte received is sent back. Receives through an on-demand recv stream:
 * an idle connection, or one blocked sending to a client that does not read, holds no receive
 * buffer (server_send_chunk). A stop closes the connection at its next wait for bytes; an idle
 * one closes after --idle-ms, a send making no progress after --send-ms. */
#include "server.h"

static int64_t echo_conn(int fd)
{
	concur_stream *s;
	int64_t r = concur_recv_stream_on_demand(&s, fd, 0);
	if (r == 0) {
		struct concur_chunk c;
		while ((r = server_next(s, &c, true)) >
		       0) { /* idle between chunks: a stop ends it */
			int err = server_send_chunk(fd, s, &c);
			if (err) {
				r = err;
				break;
			}
		}
		concur_stream_close(s);
	}
	server_conn_done(fd);
	return r;
}

int main(int argc, char **argv)
{
	return server_main(argc, argv, "echo", 7000, echo_conn);
}
