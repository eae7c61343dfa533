// Package derp runs the embedded DERP relay and STUN server and describes
// them in the DERP map sent to clients.
package derp

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strconv"

	tsderp "tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/derp/derpserver"
	"tailscale.com/net/netmon"
	"tailscale.com/net/stunserver"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
)

// Options configures the embedded relay.
type Options struct {
	PrivateKey key.NodePrivate
	// STUNListen is the UDP address for STUN; "" disables STUN.
	STUNListen string
	RegionID   int
	RegionCode string
	RegionName string
	// ServerURL is where clients reach the relay (the control URL; the
	// relay is served at /derp on the same listener).
	ServerURL string
	Logger    *slog.Logger
	// MeshKey, when set, is the secret replicas' relays share: relays
	// presenting it may watch this one's clients and send to them.
	MeshKey key.DERPMesh
	// MeshWith are the other replicas' relays (http(s)://HOST:PORT/derp);
	// packets for clients connected there are forwarded to them.
	MeshWith []string
}

// Embedded is a running relay.
type Embedded struct {
	srv      *derpserver.Server
	stun     *stunserver.STUNServer
	stunPort int
	opts     Options
	cancel   context.CancelFunc
}

// Start starts the relay and, if configured, the STUN server.
func Start(ctx context.Context, o Options) (*Embedded, error) {
	log := o.Logger
	if log == nil {
		log = slog.Default()
	}
	ctx, cancel := context.WithCancel(ctx)
	e := &Embedded{opts: o, stunPort: -1, cancel: cancel}
	e.srv = derpserver.New(o.PrivateKey, func(format string, args ...any) {
		log.Debug(fmt.Sprintf(format, args...), "component", "derp")
	})
	if !o.MeshKey.IsZero() {
		if err := e.srv.SetMeshKey(o.MeshKey.String()); err != nil {
			cancel()
			e.srv.Close()
			return nil, fmt.Errorf("derp: mesh key: %w", err)
		}
	}
	for _, peer := range o.MeshWith {
		if err := e.meshWith(ctx, peer, log); err != nil {
			cancel()
			e.srv.Close()
			return nil, err
		}
	}
	if o.STUNListen != "" {
		e.stun = stunserver.New(ctx)
		if err := e.stun.Listen(o.STUNListen); err != nil {
			cancel()
			e.srv.Close()
			return nil, fmt.Errorf("derp: stun listen %s: %w", o.STUNListen, err)
		}
		e.stunPort = e.stun.LocalAddr().(*net.UDPAddr).Port
		go func() {
			if err := e.stun.Serve(); err != nil && ctx.Err() == nil {
				log.Error("stun server stopped", "err", err)
			}
		}()
	}
	return e, nil
}

// meshWith follows the clients connected to another replica's relay at
// url, and forwards packets for them there, as relays of one region do.
// The connection is retried for as long as ctx lasts.
func (e *Embedded) meshWith(ctx context.Context, url string, log *slog.Logger) error {
	if e.opts.MeshKey.IsZero() {
		return fmt.Errorf("derp: meshing with %s needs a mesh key", url)
	}
	logf := func(format string, args ...any) {
		log.Debug(fmt.Sprintf(format, args...), "component", "derp-mesh", "peer", url)
	}
	// A key of its own: replicas share the relay's key (it is in the
	// database), and the peer must not take this watcher for itself.
	c, err := derphttp.NewClient(key.NewNode(), url, logf, netmon.NewStatic())
	if err != nil {
		return fmt.Errorf("derp: mesh with %s: %w", url, err)
	}
	c.MeshKey = e.opts.MeshKey
	c.WatchConnectionChanges = true
	add := func(m tsderp.PeerPresentMessage) { e.srv.AddPacketForwarder(m.Key, c) }
	remove := func(m tsderp.PeerGoneMessage) { e.srv.RemovePacketForwarder(m.Peer, c) }
	lost := func(err error) {
		log.Warn("DERP mesh connection to another replica lost; retrying", "peer", url, "err", err)
	}
	go func() {
		c.RunWatchConnectionLoop(ctx, e.srv.PublicKey(), logf, add, remove, lost)
		c.Close()
	}()
	log.Info("DERP relay meshed with another replica's", "peer", url)
	return nil
}

// Handler serves /derp.
func (e *Embedded) Handler() http.Handler { return derpserver.Handler(e.srv) }

// STUNPort is the bound STUN port, or -1 when STUN is off.
func (e *Embedded) STUNPort() int { return e.stunPort }

// DERPMap describes the embedded relay as the only region.
func (e *Embedded) DERPMap() (*tailcfg.DERPMap, error) {
	u, err := url.Parse(e.opts.ServerURL)
	if err != nil {
		return nil, fmt.Errorf("derp: server url: %w", err)
	}
	host := u.Hostname()
	port := 443
	if u.Scheme == "http" {
		port = 80
	}
	if p := u.Port(); p != "" {
		port, _ = strconv.Atoi(p)
	}
	node := &tailcfg.DERPNode{
		Name:     strconv.Itoa(e.opts.RegionID) + "a",
		RegionID: e.opts.RegionID,
		HostName: host,
		DERPPort: port,
		STUNPort: e.stunPort,
	}
	if ip := net.ParseIP(host); ip != nil {
		if ip.To4() != nil {
			node.IPv4 = host
		} else {
			node.IPv6 = host
		}
	}
	return &tailcfg.DERPMap{Regions: map[int]*tailcfg.DERPRegion{
		e.opts.RegionID: {
			RegionID:   e.opts.RegionID,
			RegionCode: e.opts.RegionCode,
			RegionName: e.opts.RegionName,
			Nodes:      []*tailcfg.DERPNode{node},
		},
	}}, nil
}

// Close stops the relay and STUN server.
func (e *Embedded) Close() {
	e.cancel() // the STUN server stops with its context
	e.srv.Close()
}
