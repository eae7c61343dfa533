package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestExampleConfigMatchesDefaults(t *testing.T) {
	cfg := Default()
	if err := cfg.LoadFile(filepath.Join("..", "..", "config.example.yaml")); err != nil {
		t.Fatal(err)
	}
	want := Default()
	if err := cfg.Finish(); err != nil {
		t.Fatal(err)
	}
	if err := want.Finish(); err != nil {
		t.Fatal(err)
	}
	if cfg.ServerURL != "http://127.0.0.1:8080" || cfg.Listen != want.Listen || cfg.DNS.BaseDomain != want.DNS.BaseDomain ||
		cfg.EphemeralTimeout != want.EphemeralTimeout || cfg.Database.SQLitePath != want.Database.SQLitePath {
		t.Fatalf("example config differs from defaults:\n%+v\n%+v", cfg, want)
	}
}

func TestUnknownKeysAndBadValuesAreErrors(t *testing.T) {
	dir := t.TempDir()
	for name, body := range map[string]string{
		"unknown key":  "listne: 1.2.3.4:80\n",
		"bad prefix":   "prefixes:\n  v4: 10.0.0.0/8\n",
		"bad db":       "database:\n  type: mysql\n",
		"tls half":     "tls:\n  cert_file: a.pem\n",
		"policy file":  "policy:\n  mode: file\n",
		"bad domain":   "dns:\n  base_domain: .x.\n",
		"bad duration": "ephemeral_timeout: soon\n",
		"mesh url":     "database:\n  type: postgres\n  postgres_dsn: postgres://x/y\nderp:\n  mesh_with: [10.0.0.2:8080]\n",
		"mesh sqlite":  "derp:\n  mesh_with: [http://10.0.0.2:8080/derp]\n",
	} {
		p := filepath.Join(dir, strings.ReplaceAll(name, " ", "_")+".yaml")
		os.WriteFile(p, []byte(body), 0o600)
		cfg := Default()
		err := cfg.LoadFile(p)
		if err == nil {
			err = cfg.Finish()
		}
		if err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestMeshWithReplicas(t *testing.T) {
	cfg := Default()
	cfg.Database = DatabaseConfig{Type: "postgres", PostgresDSN: "postgres://x/y"}
	cfg.DERP.MeshWith = []string{"http://10.0.0.2:8080/derp", "https://tp2.example.com/derp"}
	if err := cfg.Finish(); err != nil {
		t.Errorf("replicas meshing their relays: %v", err)
	}
}

func TestServerURLDerivedFromListen(t *testing.T) {
	cfg := Default()
	cfg.Listen = "0.0.0.0:9443"
	cfg.TLS = TLSConfig{CertFile: "c", KeyFile: "k"}
	if err := cfg.Finish(); err != nil {
		t.Fatal(err)
	}
	if cfg.ServerURL != "https://127.0.0.1:9443" {
		t.Fatalf("server url %q", cfg.ServerURL)
	}
}
