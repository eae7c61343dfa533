package e2e

import "syscall"

// serverProcAttr makes the kernel kill a tailplane server when the test
// binary dies without running its cleanups (e.g. on a go test -timeout
// panic), so no server is left holding its port.
func serverProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
