// Package config holds tailplane's server configuration: built-in defaults,
// an optional YAML file, and command-line flags, applied in that order.
package config

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"gopkg.in/yaml.v3"
)

// Config is the whole server configuration. The YAML keys are the field
// tags; docs/config.md and config.example.yaml describe every one.
type Config struct {
	// DataDir holds the SQLite database, the admin socket and the server's
	// keys when no database setting overrides them.
	DataDir string `yaml:"data_dir"`
	// Listen is the address the client protocol (and the embedded DERP
	// relay) is served on.
	Listen string `yaml:"listen"`
	// ServerURL is the URL clients use (--login-server). Derived from
	// Listen when empty.
	ServerURL string `yaml:"server_url"`

	TLS TLSConfig `yaml:"tls"`

	Database DatabaseConfig `yaml:"database"`

	Prefixes PrefixConfig `yaml:"prefixes"`

	DERP DERPConfig `yaml:"derp"`

	DNS DNSConfig `yaml:"dns"`

	Policy PolicyConfig `yaml:"policy"`

	// EphemeralTimeout is how long an ephemeral node may stay disconnected
	// before it is deleted.
	EphemeralTimeout time.Duration `yaml:"ephemeral_timeout"`
	// OfflineGrace is how long a node whose map stream ended still counts
	// as online; 0 marks it offline at once.
	OfflineGrace time.Duration `yaml:"offline_grace"`
	// RestartGrace is how long after a restart nodes that were online
	// still count as online while their clients reconnect; 0 marks them
	// offline at start.
	RestartGrace time.Duration `yaml:"restart_grace"`

	// MetricsListen serves Prometheus metrics at /metrics; empty disables.
	MetricsListen string `yaml:"metrics_listen"`
	// DebugListen serves pprof at /debug/pprof/; empty disables.
	DebugListen string `yaml:"debug_listen"`

	// LogLevel is debug, info, warn or error.
	LogLevel string `yaml:"log_level"`
	// LogFormat is text or json.
	LogFormat string `yaml:"log_format"`
}

// TLSConfig enables HTTPS when both files are set.
type TLSConfig struct {
	CertFile string `yaml:"cert_file"`
	KeyFile  string `yaml:"key_file"`
}

// DatabaseConfig selects the storage backend.
type DatabaseConfig struct {
	// Type is "sqlite" (default) or "postgres".
	Type string `yaml:"type"`
	// SQLitePath defaults to DATA_DIR/tailplane.db.
	SQLitePath string `yaml:"sqlite_path"`
	// PostgresDSN is a libpq/pgx connection string, e.g.
	// postgres://user@host:5432/db?sslmode=disable.
	PostgresDSN string `yaml:"postgres_dsn"`
}

// PrefixConfig sets the address ranges nodes are given addresses from.
type PrefixConfig struct {
	V4 string `yaml:"v4"`
	V6 string `yaml:"v6"`
}

// DERPConfig configures the embedded DERP relay and STUN server.
type DERPConfig struct {
	// Enabled serves a DERP relay at /derp on the main listener and
	// announces it as region RegionID in the DERP map.
	Enabled    bool   `yaml:"enabled"`
	RegionID   int    `yaml:"region_id"`
	RegionCode string `yaml:"region_code"`
	RegionName string `yaml:"region_name"`
	// STUNListen is the UDP address of the STUN server; port 0 picks a
	// free one. Empty disables STUN.
	STUNListen string `yaml:"stun_listen"`
	// MeshWith lists the DERP URLs of the other replicas
	// (http(s)://HOST:PORT/derp, as this replica can reach them). The
	// relays then forward packets between clients connected to
	// different replicas, as one region.
	MeshWith []string `yaml:"mesh_with"`
}

// DNSConfig configures MagicDNS.
type DNSConfig struct {
	MagicDNS bool `yaml:"magic_dns"`
	// BaseDomain is the suffix of node names: NAME.BASE_DOMAIN.
	BaseDomain  string   `yaml:"base_domain"`
	Nameservers []string `yaml:"nameservers"`
}

// PolicyConfig chooses where the ACL policy comes from.
type PolicyConfig struct {
	// Mode is "database" (set with `tailplane policy set`) or "file".
	Mode string `yaml:"mode"`
	// File is the HuJSON policy file for mode "file"; it is reloaded when
	// it changes and on SIGHUP.
	File string `yaml:"file"`
}

// Default returns the embedded defaults: everything needed to run with no
// configuration at all.
func Default() Config {
	return Config{
		DataDir:  "./tailplane-data",
		Listen:   "127.0.0.1:8080",
		Database: DatabaseConfig{Type: "sqlite"},
		Prefixes: PrefixConfig{V4: "100.64.0.0/10", V6: "fd7a:115c:a1e0::/48"},
		DERP: DERPConfig{
			Enabled:    true,
			RegionID:   900,
			RegionCode: "tailplane",
			RegionName: "tailplane embedded DERP",
			STUNListen: "127.0.0.1:3478",
		},
		DNS:              DNSConfig{MagicDNS: true, BaseDomain: "tailnet.internal"},
		Policy:           PolicyConfig{Mode: "database"},
		EphemeralTimeout: 5 * time.Minute,
		OfflineGrace:     10 * time.Second,
		RestartGrace:     2 * time.Minute,
		LogLevel:         "info",
		LogFormat:        "text",
	}
}

// LoadFile overlays the YAML file at path onto c. Unknown keys are errors,
// so a typo does not silently fall back to a default.
func (c *Config) LoadFile(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("config: %w", err)
	}
	defer f.Close()
	dec := yaml.NewDecoder(f)
	dec.KnownFields(true)
	// An empty file decodes to io.EOF: it is valid and changes nothing.
	if err := dec.Decode(c); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("config %s: %w", path, err)
	}
	return nil
}

// Finish derives unset values and validates the configuration.
func (c *Config) Finish() error {
	if c.DataDir == "" {
		return errors.New("config: data_dir must not be empty")
	}
	host, port, err := net.SplitHostPort(c.Listen)
	if err != nil {
		return fmt.Errorf("config: listen %q: %w", c.Listen, err)
	}
	tlsOn := c.TLS.CertFile != "" || c.TLS.KeyFile != ""
	if tlsOn && (c.TLS.CertFile == "" || c.TLS.KeyFile == "") {
		return errors.New("config: tls needs both cert_file and key_file")
	}
	if c.ServerURL == "" {
		scheme := "http"
		if tlsOn {
			scheme = "https"
		}
		if host == "" || host == "0.0.0.0" || host == "::" {
			host = "127.0.0.1"
		}
		c.ServerURL = scheme + "://" + net.JoinHostPort(host, port)
	}
	c.ServerURL = strings.TrimRight(c.ServerURL, "/")
	if !strings.HasPrefix(c.ServerURL, "http://") && !strings.HasPrefix(c.ServerURL, "https://") {
		return fmt.Errorf("config: server_url %q must start with http:// or https://", c.ServerURL)
	}
	if _, err := c.V4Prefix(); err != nil {
		return err
	}
	if _, err := c.V6Prefix(); err != nil {
		return err
	}
	switch c.Database.Type {
	case "sqlite":
		if c.Database.SQLitePath == "" {
			c.Database.SQLitePath = filepath.Join(c.DataDir, "tailplane.db")
		}
	case "postgres":
		if c.Database.PostgresDSN == "" {
			return errors.New("config: database.type postgres needs database.postgres_dsn")
		}
	default:
		return fmt.Errorf("config: database.type %q: want sqlite or postgres", c.Database.Type)
	}
	switch c.Policy.Mode {
	case "database":
	case "file":
		if c.Policy.File == "" {
			return errors.New("config: policy.mode file needs policy.file")
		}
	default:
		return fmt.Errorf("config: policy.mode %q: want database or file", c.Policy.Mode)
	}
	if c.DNS.BaseDomain == "" || strings.HasPrefix(c.DNS.BaseDomain, ".") || strings.HasSuffix(c.DNS.BaseDomain, ".") {
		return fmt.Errorf("config: dns.base_domain %q must be a domain like tailnet.internal", c.DNS.BaseDomain)
	}
	for _, m := range c.DERP.MeshWith {
		u, err := url.Parse(m)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.Path != "/derp" {
			return fmt.Errorf("config: derp.mesh_with %q: want the DERP URL of another replica, like http://10.0.0.2:8080/derp", m)
		}
	}
	if len(c.DERP.MeshWith) > 0 && (!c.DERP.Enabled || c.Database.Type != "postgres") {
		return errors.New("config: derp.mesh_with needs the embedded DERP relay and database.type postgres (the replicas share the mesh key there)")
	}
	if c.OfflineGrace < 0 {
		return errors.New("config: offline_grace must not be negative")
	}
	if c.RestartGrace < 0 {
		return errors.New("config: restart_grace must not be negative")
	}
	if c.EphemeralTimeout <= 0 {
		return errors.New("config: ephemeral_timeout must be positive")
	}
	return nil
}

// V4Prefix parses Prefixes.V4; it must lie within 100.64.0.0/10.
func (c *Config) V4Prefix() (netip.Prefix, error) {
	p, err := netip.ParsePrefix(c.Prefixes.V4)
	if err != nil || !p.Addr().Is4() {
		return netip.Prefix{}, fmt.Errorf("config: prefixes.v4 %q: want an IPv4 prefix", c.Prefixes.V4)
	}
	if !netip.MustParsePrefix("100.64.0.0/10").Contains(p.Addr()) || p.Bits() < 10 {
		return netip.Prefix{}, fmt.Errorf("config: prefixes.v4 %q must lie within 100.64.0.0/10 (the range Tailscale clients route)", c.Prefixes.V4)
	}
	return p.Masked(), nil
}

// V6Prefix parses Prefixes.V6; it must lie within fd7a:115c:a1e0::/48.
func (c *Config) V6Prefix() (netip.Prefix, error) {
	p, err := netip.ParsePrefix(c.Prefixes.V6)
	if err != nil || !p.Addr().Is6() {
		return netip.Prefix{}, fmt.Errorf("config: prefixes.v6 %q: want an IPv6 prefix", c.Prefixes.V6)
	}
	if !netip.MustParsePrefix("fd7a:115c:a1e0::/48").Contains(p.Addr()) || p.Bits() < 48 {
		return netip.Prefix{}, fmt.Errorf("config: prefixes.v6 %q must lie within fd7a:115c:a1e0::/48", c.Prefixes.V6)
	}
	return p.Masked(), nil
}

// AdminSocket is the path of the admin API's unix socket.
func (c *Config) AdminSocket() string { return filepath.Join(c.DataDir, "admin.sock") }
