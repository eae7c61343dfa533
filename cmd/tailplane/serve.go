package main

import (
	"time"

	"github.com/spf13/cobra"

	"github.com/tailplane/tailplane/internal/config"
	"github.com/tailplane/tailplane/internal/server"
)

// loadConfig applies defaults, the config file and the shared flags.
func loadConfig(g *globals) (config.Config, error) {
	cfg := config.Default()
	if g.config != "" {
		if err := cfg.LoadFile(g.config); err != nil {
			return cfg, err
		}
	}
	if g.dataDir != "" {
		cfg.DataDir = g.dataDir
	}
	return cfg, nil
}

func newServeCmd(g *globals) *cobra.Command {
	var f struct {
		listen, serverURL, tlsCert, tlsKey, dbType, sqlitePath, pgDSN string
		v4, v6, stun, baseDomain, policyFile, metrics, debug          string
		logLevel, logFormat                                           string
		noDERP, noMagicDNS                                            bool
		ephemeral, offlineGrace, restartGrace                         time.Duration
		nameservers, meshWith                                         []string
	}
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run the control server",
		Long: `Run the control server. With no flags and no config file it uses embedded
defaults: listen on 127.0.0.1:8080 (server URL http://127.0.0.1:8080), state in
./tailplane-data (SQLite), an embedded DERP relay at /derp with STUN on UDP
127.0.0.1:3478, and MagicDNS names NAME.tailnet.internal.

Settings come from the defaults, then the --config YAML file, then flags.

Production: serve HTTPS with --tls-cert/--tls-key (clients reach the embedded
DERP relay over TLS unless TS_DEBUG_USE_DERP_HTTP=1 is set on them), or run
behind a reverse proxy that passes WebSocket/Upgrade requests and set
--server-url to the public URL (see README). For several replicas use
--db-type postgres with a shared --postgres-dsn: each replica follows the
others' changes. Give each one the others' DERP URLs with --derp-mesh-with
so that their relays forward between clients of different replicas.

Clients older than Tailscale v1.80 are refused with a message saying so.`,
		Example: `  tailplane serve
  tailplane serve --data-dir /var/lib/tailplane --listen 0.0.0.0:443 \
      --server-url https://tp.example.com --tls-cert cert.pem --tls-key key.pem
  tailplane serve --policy-file /etc/tailplane/policy.hujson --metrics-listen 127.0.0.1:9090`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadConfig(g)
			if err != nil {
				return err
			}
			fl := cmd.Flags()
			set := func(name string, dst *string, v string) {
				if fl.Changed(name) {
					*dst = v
				}
			}
			set("listen", &cfg.Listen, f.listen)
			set("server-url", &cfg.ServerURL, f.serverURL)
			set("tls-cert", &cfg.TLS.CertFile, f.tlsCert)
			set("tls-key", &cfg.TLS.KeyFile, f.tlsKey)
			set("db-type", &cfg.Database.Type, f.dbType)
			set("sqlite-path", &cfg.Database.SQLitePath, f.sqlitePath)
			set("postgres-dsn", &cfg.Database.PostgresDSN, f.pgDSN)
			set("prefix-v4", &cfg.Prefixes.V4, f.v4)
			set("prefix-v6", &cfg.Prefixes.V6, f.v6)
			set("stun-listen", &cfg.DERP.STUNListen, f.stun)
			set("base-domain", &cfg.DNS.BaseDomain, f.baseDomain)
			set("metrics-listen", &cfg.MetricsListen, f.metrics)
			set("debug-listen", &cfg.DebugListen, f.debug)
			set("log-level", &cfg.LogLevel, f.logLevel)
			set("log-format", &cfg.LogFormat, f.logFormat)
			if fl.Changed("policy-file") {
				cfg.Policy.Mode, cfg.Policy.File = "file", f.policyFile
			}
			if fl.Changed("no-derp") {
				cfg.DERP.Enabled = !f.noDERP
			}
			if fl.Changed("no-magic-dns") {
				cfg.DNS.MagicDNS = !f.noMagicDNS
			}
			if fl.Changed("ephemeral-timeout") {
				cfg.EphemeralTimeout = f.ephemeral
			}
			if fl.Changed("offline-grace") {
				cfg.OfflineGrace = f.offlineGrace
			}
			if fl.Changed("restart-grace") {
				cfg.RestartGrace = f.restartGrace
			}
			if fl.Changed("nameserver") {
				cfg.DNS.Nameservers = f.nameservers
			}
			if fl.Changed("derp-mesh-with") {
				cfg.DERP.MeshWith = f.meshWith
			}
			if err := cfg.Finish(); err != nil {
				return err
			}
			return server.Run(cmd.Context(), cfg)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.listen, "listen", "127.0.0.1:8080", "address for the client protocol and the embedded DERP relay")
	fl.StringVar(&f.serverURL, "server-url", "", "URL clients use as --login-server (default: derived from --listen)")
	fl.StringVar(&f.tlsCert, "tls-cert", "", "TLS certificate file (PEM); with --tls-key serves HTTPS")
	fl.StringVar(&f.tlsKey, "tls-key", "", "TLS private key file (PEM)")
	fl.StringVar(&f.dbType, "db-type", "sqlite", "storage backend: sqlite or postgres")
	fl.StringVar(&f.sqlitePath, "sqlite-path", "", "SQLite database file (default DATA_DIR/tailplane.db)")
	fl.StringVar(&f.pgDSN, "postgres-dsn", "", "PostgreSQL connection string, e.g. postgres://user@host/db")
	fl.StringVar(&f.v4, "prefix-v4", "100.64.0.0/10", "IPv4 range for node addresses (within 100.64.0.0/10)")
	fl.StringVar(&f.v6, "prefix-v6", "fd7a:115c:a1e0::/48", "IPv6 range for node addresses (within fd7a:115c:a1e0::/48)")
	fl.BoolVar(&f.noDERP, "no-derp", false, "do not run the embedded DERP relay")
	fl.StringSliceVar(&f.meshWith, "derp-mesh-with", nil, "DERP URLs of the other replicas (http://HOST:PORT/derp, comma-separated or repeated): relay between clients of different replicas")
	fl.StringVar(&f.stun, "stun-listen", "127.0.0.1:3478", "UDP address of the STUN server (port 0 picks one; empty disables)")
	fl.StringVar(&f.baseDomain, "base-domain", "tailnet.internal", "MagicDNS base domain: nodes are NAME.BASE_DOMAIN")
	fl.BoolVar(&f.noMagicDNS, "no-magic-dns", false, "do not ask clients to use MagicDNS")
	fl.StringSliceVar(&f.nameservers, "nameserver", nil, "upstream DNS resolver for clients (repeatable)")
	fl.StringVar(&f.policyFile, "policy-file", "", "take the ACL policy from this HuJSON file (reloaded on change and SIGHUP) instead of the database")
	fl.DurationVar(&f.ephemeral, "ephemeral-timeout", 5*time.Minute, "delete ephemeral nodes disconnected this long")
	fl.DurationVar(&f.offlineGrace, "offline-grace", 10*time.Second, "keep a node whose map stream ended online for its peers this long (0: offline at once)")
	fl.DurationVar(&f.restartGrace, "restart-grace", 2*time.Minute, "after a restart, keep nodes that were online online this long while their clients reconnect (0: offline at start)")
	fl.StringVar(&f.metrics, "metrics-listen", "", "serve Prometheus metrics at http://ADDR/metrics")
	fl.StringVar(&f.debug, "debug-listen", "", "serve pprof at http://ADDR/debug/pprof/")
	fl.StringVar(&f.logLevel, "log-level", "info", "debug, info, warn or error")
	fl.StringVar(&f.logFormat, "log-format", "text", "text or json")
	return cmd
}
