// SPDX-License-Identifier: MIT

// Go peers of the hot-path workloads, in the suite's format: --variant NAME -n N, one JSON line
// {"value", "unit", "better", "params", "stats"} on stdout. GOMAXPROCS is 1, as concur's side of
// these workloads runs on 1 loop. Standard library only.
//
//	spawn_one: spawn a goroutine computing a trivial result and receive it from a channel made
//	           for that task (the channel is its future, as concur's future is the task's), n
//	           times; ns per task.
//	switch:    two goroutines, released together, each calling runtime.Gosched() n times;
//	           elapsed / (2n) per switch.
package main

import (
	"flag"
	"fmt"
	"os"
	"runtime"
	"sync"
	"time"
)

func trivial(i int64) int64 { return i & 1 }

func spawnOne(n int64) float64 {
	var sum int64
	t0 := time.Now()
	for i := int64(0); i < n; i++ {
		ch := make(chan int64, 1)
		go func(i int64, ch chan<- int64) { ch <- trivial(i) }(i, ch)
		sum += <-ch
	}
	el := time.Since(t0)
	if sum != n/2 {
		fmt.Fprintln(os.Stderr, "go_hotpath: wrong sum", sum)
		os.Exit(1)
	}
	return float64(el.Nanoseconds()) / float64(n)
}

func switchPingPong(n int64) float64 {
	var wg, ready sync.WaitGroup
	gate := make(chan struct{})
	for k := 0; k < 2; k++ {
		wg.Add(1)
		ready.Add(1)
		go func() {
			defer wg.Done()
			ready.Done()
			<-gate
			for i := int64(0); i < n; i++ {
				runtime.Gosched()
			}
		}()
	}
	ready.Wait()
	t0 := time.Now()
	close(gate)
	wg.Wait()
	return float64(time.Since(t0).Nanoseconds()) / (2 * float64(n))
}

func main() {
	variant := flag.String("variant", "", "spawn_one|switch")
	n := flag.Float64("n", 1e6, "iterations")
	flag.Parse()
	iters := int64(*n)
	if iters < 1 {
		iters = 1
	}
	runtime.GOMAXPROCS(1)
	var v float64
	var unit string
	switch *variant {
	case "spawn_one":
		v, unit = spawnOne(iters), "ns/task"
	case "switch":
		v, unit = switchPingPong(iters), "ns/switch"
	default:
		fmt.Fprintln(os.Stderr, "usage: go_hotpath --variant {spawn_one|switch} [-n N]")
		os.Exit(2)
	}
	fmt.Printf("{\"value\": %.6g, \"unit\": \"%s\", \"better\": \"lower\", \"params\": "+
		"{\"n\": %d, \"gomaxprocs\": 1, \"go\": \"%s\"}, \"stats\": {}}\n",
		v, unit, iters, runtime.Version())
}
