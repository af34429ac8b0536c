/* SPDX-License-Identifier: MIT */
/*
 * What the example servers share, on concur's public API only: options (--port, --loops), one
 * SO_REUSEPORT listener and one accepting task (a multishot accept stream) per loop, a task per
 * connection, and a clean stop on SIGINT/SIGTERM: the signal is read from a signalfd through the
 * ring, the listeners are shut down and every open connection is shut down, so each task ends.
 */
#ifndef CONCUR_BENCH_SERVER_H
#define CONCUR_BENCH_SERVER_H

#include <stdbool.h>
#include <stdint.h>

#include "concur.h"

/* Serve connections with conn(fd), which must call server_conn_done(fd) before it returns (it
 * closes fd). Returns the process exit status. */
int server_main(int argc, char **argv, const char *name, uint16_t default_port,
                int64_t (*conn)(int fd));

/* True once a stop was requested: a connection task should wind down. */
bool server_stopping(void);

/* Close a connection's fd and forget it. */
void server_conn_done(int fd);

/* Send all of buf (the direct form: call it from the connection's task). 0 or -errno. */
int server_send_all(int fd, const void *buf, size_t len);

#endif
