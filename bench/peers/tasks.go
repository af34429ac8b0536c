// SPDX-License-Identifier: MIT
//
// tasks/1M, Go's side: n goroutines each blocked receiving on its own unbuffered channel
// (made in the same loop that starts them, as concur's bench makes a promise per task); once
// all are blocked, main sends i on channel i and waits for all. Prints bench_tasks.c's JSON:
// peak RSS per blocked goroutine in KiB, (VmHWM at park - VmRSS before) / n, with park_ms,
// wake_ms, pte_kb and rss_after_kb (after debug.FreeOSMemory) as params.
//
//	peer_go_tasks --variant go [-n N] [-l GOMAXPROCS]
package main

import (
	"bufio"
	"fmt"
	"os"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

func statusKB(field string) int64 {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return -1
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		l := s.Text()
		if strings.HasPrefix(l, field+":") {
			v, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(l[len(field)+1:], "kB")), 10, 64)
			return v
		}
	}
	return -1
}

func die(format string, a ...interface{}) {
	fmt.Fprintf(os.Stderr, format+"\n", a...)
	os.Exit(1)
}

func main() {
	n, procs := 1000000, 0
	variant := ""
	for i := 1; i+1 < len(os.Args); i += 2 {
		v, err := strconv.ParseFloat(os.Args[i+1], 64)
		switch os.Args[i] {
		case "--variant":
			variant = os.Args[i+1]
			continue
		case "-n":
			n = int(v)
		case "-l":
			procs = int(v)
		case "-b":
		default:
			err = fmt.Errorf("unknown option")
		}
		if err != nil {
			die("usage: %s --variant go [-n N] [-l GOMAXPROCS]", os.Args[0])
		}
	}
	if variant != "go" || n <= 0 {
		die("usage: %s --variant go [-n N] [-l GOMAXPROCS]", os.Args[0])
	}
	if procs > 0 {
		runtime.GOMAXPROCS(procs)
	}
	runtime.GC()
	base := statusKB("VmRSS")

	chans := make([]chan int64, n)
	results := make([]int64, n)
	var parked int64
	var wg sync.WaitGroup
	wg.Add(n)
	t0 := time.Now()
	for i := 0; i < n; i++ {
		c := make(chan int64)
		chans[i] = c
		go func(i int, c chan int64) {
			atomic.AddInt64(&parked, 1)
			results[i] = <-c
			wg.Done()
		}(i, c)
	}
	for atomic.LoadInt64(&parked) < int64(n) {
		time.Sleep(200 * time.Microsecond)
	}
	t1 := time.Now()
	hwm, pte := statusKB("VmHWM"), statusKB("VmPTE")
	for i := 0; i < n; i++ {
		chans[i] <- int64(i)
	}
	wg.Wait()
	t2 := time.Now()
	for i := 0; i < n; i++ {
		if results[i] != int64(i) {
			die("goroutine %d got %d", i, results[i])
		}
	}
	parkMs := float64(t1.Sub(t0).Microseconds()) / 1e3
	wakeMs := float64(t2.Sub(t1).Microseconds()) / 1e3
	chans, results = nil, nil
	debug.FreeOSMemory()
	after := statusKB("VmRSS") - base
	fmt.Printf("{\"value\": %.6g, \"unit\": \"KiB/task\", \"better\": \"lower\", \"params\": "+
		"{\"n\": %d, \"gomaxprocs\": %d, \"park_ms\": %.1f, \"wake_ms\": %.1f, \"pte_kb\": %d, "+
		"\"rss_after_kb\": %d, \"go\": \"%s\"}, \"stats\": {}, "+
		"\"extra\": {\"park_ms\": %.1f, \"wake_ms\": %.1f}}\n",
		float64(hwm-base)/float64(n), n, runtime.GOMAXPROCS(0), parkMs, wakeMs, pte,
		after, runtime.Version(), parkMs, wakeMs)
}
