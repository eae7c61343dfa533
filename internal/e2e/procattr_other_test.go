//go:build !linux

package e2e

import "syscall"

// serverProcAttr has no parent-death signal to offer outside Linux.
func serverProcAttr() *syscall.SysProcAttr { return nil }
