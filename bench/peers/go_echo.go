// SPDX-License-Identifier: MIT

// A Go echo server, the way Go programs are written: net.Listen on 127.0.0.1, one goroutine per
// connection reading into its own buffer and writing back what it read (Go's netpoller parks the
// goroutine while a socket is not ready; TCP_NODELAY is Go's default). --threads N sets
// GOMAXPROCS (default 1, like the other single-threaded servers of the workload). Standard
// library only. Stops on SIGINT/SIGTERM (exit status 0).
package main

import (
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"runtime"
	"syscall"
)

func serve(c net.Conn) {
	defer c.Close()
	buf := make([]byte, 65536)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func main() {
	port := flag.Int("port", 0, "port on 127.0.0.1 (0: any)")
	threads := flag.Int("threads", 1, "GOMAXPROCS")
	flag.Parse()
	if *threads < 1 || *port < 0 || *port > 65535 {
		fmt.Fprintln(os.Stderr, "usage: go_echo [--port N] [--threads N]")
		os.Exit(2)
	}
	runtime.GOMAXPROCS(*threads)
	ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", *port))
	if err != nil {
		fmt.Fprintln(os.Stderr, "go_echo:", err)
		os.Exit(1)
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		s := <-sig
		fmt.Printf("go_echo: signal %v: stopped\n", s)
		os.Exit(0)
	}()
	fmt.Printf("go_echo: listening on %s with %d threads (%s)\n", ln.Addr(), *threads,
		runtime.Version())
	for {
		c, err := ln.Accept()
		if err != nil {
			continue
		}
		go serve(c)
	}
}
