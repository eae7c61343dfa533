package realclient

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/net/proxy"
)

// maxHTTPBody bounds what HTTPGet reads, so a misrouted stream cannot eat
// the test's memory.
const maxHTTPBody = 64 << 20

// Ping runs `tailscale ping` (disco ping, 5 tries) to ip and returns how many
// were answered. The exit status is not used: with the default
// --until-direct=true the CLI exits 1 on a DERP-only path even when every
// ping was answered, so this passes --until-direct=false and counts the
// "pong from" lines. It is an error only if none came back.
//
// A pong proves the path, not the policy: disco pings are answered even when
// the packet filter denies the pair. Use HTTPGet for that.
func (c *Client) Ping(ctx context.Context, ip netip.Addr) (pongs int, err error) {
	c.t.Helper()
	out, err := c.CLI(ctx, "ping", "-c", "5", "--until-direct=false", "--timeout=5s", ip.String())
	var last string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		if strings.HasPrefix(sc.Text(), "pong from") {
			pongs++
			last = sc.Text()
		}
	}
	if pongs == 0 {
		if err == nil {
			err = fmt.Errorf("tailscale ping %v (%s): no pong: %s", ip, c.name, bytes.TrimSpace(out))
		}
		return 0, err
	}
	c.t.Logf("realclient %s: ping %v: %d/5 pongs, last: %s", c.name, ip, pongs, last)
	return pongs, nil
}

// Serve makes the node answer HTTP on its tailnet port with text (`tailscale
// serve --bg --http=PORT text:TEXT`). Serve routes by Host header, so
// clients must send the node's MagicDNS name (see HTTPGet).
func (c *Client) Serve(ctx context.Context, port int, text string) error {
	return c.serve(ctx, port, "text:"+text)
}

// ServeFile makes the node serve the file at path on its tailnet port, for
// transfers larger than a command line can carry.
func (c *Client) ServeFile(ctx context.Context, port int, path string) error {
	if !filepath.IsAbs(path) {
		return fmt.Errorf("ServeFile: %q is not an absolute path", path)
	}
	return c.serve(ctx, port, path)
}

func (c *Client) serve(ctx context.Context, port int, target string) error {
	_, err := c.CLI(ctx, "serve", "--bg", "--yes", "--http="+strconv.Itoa(port), target)
	return err
}

// HTTPGet fetches http://IP:PORT/ through this client's SOCKS5 proxy, i.e.
// across the tailnet from this node, with the Host header set to
// host:port, and returns the body of a 200 response. host should be the
// target node's MagicDNS name (a bare IP gets a 404 from serve). Each call
// uses a new connection.
func (c *Client) HTTPGet(ctx context.Context, ip netip.Addr, host string, port int) ([]byte, error) {
	socks5 := c.SOCKS5Addr()
	if socks5 == "" {
		return nil, fmt.Errorf("%s: tailscaled is not running", c.name)
	}
	d, err := proxy.SOCKS5("tcp", socks5, nil, proxy.Direct)
	if err != nil {
		return nil, err
	}
	cd, ok := d.(proxy.ContextDialer)
	if !ok {
		return nil, errors.New("SOCKS5 dialer without DialContext")
	}
	tr := &http.Transport{
		Proxy:             nil, // the test process's own *_PROXY must not apply
		DialContext:       cd.DialContext,
		DisableKeepAlives: true,
	}
	defer tr.CloseIdleConnections()
	ctx, cancel := withDefaultTimeout(ctx)
	defer cancel()
	u := "http://" + netip.AddrPortFrom(ip, uint16(port)).String() + "/"
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, err
	}
	if host != "" {
		req.Host = net.JoinHostPort(strings.TrimSuffix(host, "."), strconv.Itoa(port))
	}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return nil, fmt.Errorf("GET %s (Host %s) from %s: %w", u, req.Host, c.name, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxHTTPBody+1))
	if err != nil {
		return nil, fmt.Errorf("GET %s (Host %s) from %s: after %d bytes: %w", u, req.Host, c.name, len(body), err)
	}
	if len(body) > maxHTTPBody {
		return nil, fmt.Errorf("GET %s from %s: body larger than %d bytes", u, c.name, maxHTTPBody)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s (Host %s) from %s: %s: %.200q", u, req.Host, c.name, resp.Status, body)
	}
	return body, nil
}
