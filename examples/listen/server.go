// An HTTP server on a socket held by oxmgr (see server.py for the idea).
//
//	go build -o web examples/listen/server.go
//	python3 oxmgr.py start ./web --name web --listen tcp://127.0.0.1:8000 --instances 2
//	python3 oxmgr.py reload web
//
// Go turns the passed descriptor into a net.Listener with net.FileListener.
package main

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"syscall"
)

func main() {
	if os.Getenv("LISTEN_PID") != strconv.Itoa(os.Getpid()) || os.Getenv("LISTEN_FDS") == "" {
		fmt.Fprintln(os.Stderr, "no socket from oxmgr: start me with --listen tcp://HOST:PORT")
		os.Exit(1)
	}
	listener, err := net.FileListener(os.NewFile(3, "oxmgr-listen"))
	if err != nil {
		fmt.Fprintln(os.Stderr, "fd 3 is not a listening socket:", err)
		os.Exit(1)
	}
	server := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "pid %d\n", os.Getpid())
	})}
	// SIGTERM (oxmgr's stop): stop accepting, finish what is in flight, exit.
	go func() {
		stop := make(chan os.Signal, 1)
		signal.Notify(stop, syscall.SIGTERM)
		<-stop
		server.Shutdown(context.Background())
	}()
	fmt.Printf("serving on fd 3 as pid %d\n", os.Getpid())
	if err := server.Serve(listener); err != http.ErrServerClosed {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
