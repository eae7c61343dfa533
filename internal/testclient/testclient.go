// Package testclient is a minimal Tailscale protocol client for tests: it
// uses tailscale.com's own Noise client (control/ts2021) to register and
// read map streams, so tests exercise the server exactly as clients do
// without running tailscaled. Real-client tests live in internal/e2e.
package testclient

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"time"

	"tailscale.com/control/ts2021"
	"tailscale.com/net/netmon"
	"tailscale.com/net/tsdial"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
	"tailscale.com/util/zstdframe"
)

// Client is one simulated machine.
type Client struct {
	URL     string
	Machine key.MachinePrivate
	Node    key.NodePrivate
	Version tailcfg.CapabilityVersion
	nc      *ts2021.Client
}

// New connects a new machine to the server at url.
func New(ctx context.Context, url string) (*Client, error) {
	c := &Client{URL: url, Machine: key.NewMachine(), Node: key.NewNode(), Version: tailcfg.CurrentCapabilityVersion}
	return c, c.Dial(ctx)
}

// Dial (re)opens the Noise connection, e.g. after a server restart.
func (c *Client) Dial(ctx context.Context) error {
	req, err := http.NewRequestWithContext(ctx, "GET", c.URL+"/key?v="+fmt.Sprint(c.Version), nil)
	if err != nil {
		return err
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer res.Body.Close()
	if res.StatusCode != 200 {
		b, _ := io.ReadAll(res.Body)
		return fmt.Errorf("/key: %s: %s", res.Status, b)
	}
	var keys tailcfg.OverTLSPublicKeyResponse
	if err := json.NewDecoder(res.Body).Decode(&keys); err != nil {
		return err
	}
	if c.nc != nil {
		c.nc.Close()
	}
	c.nc, err = ts2021.NewClient(ts2021.ClientOpts{
		ServerURL: c.URL, PrivKey: c.Machine, ServerPubKey: keys.PublicKey,
		Dialer: tsdial.NewDialer(netmon.NewStatic()), Logf: func(string, ...any) {},
	})
	return err
}

// Close closes the Noise connection.
func (c *Client) Close() {
	if c.nc != nil {
		c.nc.Close()
	}
}

// Post sends a raw body (not necessarily valid JSON) to path and returns
// status and response body.
func (c *Client) Post(ctx context.Context, path string, body []byte) (int, []byte, error) {
	u, _ := url.Parse(c.URL)
	req, err := http.NewRequestWithContext(ctx, "POST", "https://"+u.Hostname()+path, bytes.NewReader(body))
	if err != nil {
		return 0, nil, err
	}
	ts2021.AddLBHeader(req, c.Node.Public())
	res, err := c.nc.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer res.Body.Close()
	b, err := io.ReadAll(io.LimitReader(res.Body, 1<<20))
	return res.StatusCode, b, err
}

// Register registers with authKey; a refusal is returned as an error
// carrying the server's message.
func (c *Client) Register(ctx context.Context, authKey, hostname string) (*tailcfg.RegisterResponse, error) {
	req := tailcfg.RegisterRequest{
		Version: c.Version, NodeKey: c.Node.Public(),
		Hostinfo: &tailcfg.Hostinfo{Hostname: hostname},
	}
	if authKey != "" {
		req.Auth = &tailcfg.RegisterResponseAuth{AuthKey: authKey}
	}
	b, _ := json.Marshal(req)
	code, body, err := c.Post(ctx, "/machine/register", b)
	if err != nil {
		return nil, err
	}
	if code != 200 {
		return nil, fmt.Errorf("register: %d: %s", code, bytes.TrimSpace(body))
	}
	var rr tailcfg.RegisterResponse
	if err := json.Unmarshal(body, &rr); err != nil {
		return nil, err
	}
	if rr.Error != "" {
		return &rr, fmt.Errorf("register refused: %s", rr.Error)
	}
	return &rr, nil
}

// Stream is an open streaming map response.
type Stream struct {
	body   io.ReadCloser
	cancel context.CancelFunc
}

// Map opens a streaming map request.
func (c *Client) Map(ctx context.Context) (*Stream, error) {
	ctx, cancel := context.WithCancel(ctx)
	b, _ := json.Marshal(tailcfg.MapRequest{
		Version: c.Version, NodeKey: c.Node.Public(), DiscoKey: key.NewDisco().Public(),
		Stream: true, Compress: "zstd", KeepAlive: true, Hostinfo: &tailcfg.Hostinfo{},
	})
	res, err := c.nc.DoWithBody(ctx, "POST", "/machine/map", c.Node.Public(), json.RawMessage(b))
	if err != nil {
		cancel()
		return nil, err
	}
	if res.StatusCode != 200 {
		msg, _ := io.ReadAll(res.Body)
		res.Body.Close()
		cancel()
		return nil, fmt.Errorf("map: %d: %s", res.StatusCode, bytes.TrimSpace(msg))
	}
	return &Stream{body: res.Body, cancel: cancel}, nil
}

// Next reads the next non-keep-alive message, waiting at most d.
func (s *Stream) Next(d time.Duration) (*tailcfg.MapResponse, error) {
	t := time.AfterFunc(d, s.cancel)
	defer t.Stop()
	for {
		var hdr [4]byte
		if _, err := io.ReadFull(s.body, hdr[:]); err != nil {
			return nil, err
		}
		n := binary.LittleEndian.Uint32(hdr[:])
		if n > 64<<20 {
			return nil, fmt.Errorf("map message of %d bytes", n)
		}
		buf := make([]byte, n)
		if _, err := io.ReadFull(s.body, buf); err != nil {
			return nil, err
		}
		raw, err := zstdframe.AppendDecode(nil, buf)
		if err != nil {
			return nil, err
		}
		var m tailcfg.MapResponse
		if err := json.Unmarshal(raw, &m); err != nil {
			return nil, fmt.Errorf("decoding map message: %w: %s", err, raw)
		}
		if m.KeepAlive {
			continue
		}
		return &m, nil
	}
}

// Close ends the stream.
func (s *Stream) Close() {
	s.cancel()
	s.body.Close()
}
