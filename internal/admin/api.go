// Package admin is tailplane's management API: JSON over HTTP on a unix
// socket in the data directory that only the server's owner can open. The
// CLI's users, keys, nodes, routes and policy commands are its clients.
package admin

import (
	"net/netip"
	"time"
)

// User is a user as the API shows it.
type User struct {
	ID        uint64    `json:"id"`
	Name      string    `json:"name"`
	Email     string    `json:"email,omitempty"`
	CreatedAt time.Time `json:"created_at"`
}

// CreateUserRequest creates a user.
type CreateUserRequest struct {
	Name  string `json:"name"`
	Email string `json:"email,omitempty"`
}

// RenameRequest renames a user or node.
type RenameRequest struct {
	Name string `json:"name"`
}

// Key is a pre-auth key as the API shows it. Key (the secret) is present
// only in the response that created it.
type Key struct {
	ID         string     `json:"id"`
	Key        string     `json:"key,omitempty"`
	User       string     `json:"user"`
	Reusable   bool       `json:"reusable"`
	Ephemeral  bool       `json:"ephemeral"`
	Tags       []string   `json:"tags"`
	Expiration *time.Time `json:"expiration,omitempty"`
	CreatedAt  time.Time  `json:"created_at"`
	Used       bool       `json:"used"`
	Revoked    bool       `json:"revoked"`
	Valid      bool       `json:"valid"`
}

// CreateKeysRequest creates Count keys (default 1).
type CreateKeysRequest struct {
	User       string   `json:"user"`
	Reusable   bool     `json:"reusable"`
	Ephemeral  bool     `json:"ephemeral"`
	Tags       []string `json:"tags,omitempty"`
	Expiration string   `json:"expiration,omitempty"` // Go duration; "" never expires
	Count      int      `json:"count,omitempty"`
}

// Node is a node as the API shows it.
type Node struct {
	ID       uint64     `json:"id"`
	Name     string     `json:"name"`
	FQDN     string     `json:"fqdn"`
	Hostname string     `json:"hostname"`
	User     string     `json:"user"`
	IPv4     netip.Addr `json:"ipv4"`
	IPv6     netip.Addr `json:"ipv6"`
	Tags     []string   `json:"tags"`
	// Online is the node's presence as its peers see it; Connected
	// whether it has a map stream open to this server now, and
	// ConnectedElsewhere to another running replica sharing the
	// database. After a restart a node is online but connected nowhere
	// while its client reconnects (restart_grace).
	Online             bool           `json:"online"`
	Connected          bool           `json:"connected"`
	ConnectedElsewhere bool           `json:"connected_elsewhere"`
	Ephemeral          bool           `json:"ephemeral"`
	LastSeen           *time.Time     `json:"last_seen,omitempty"`
	Expiry             *time.Time     `json:"expiry,omitempty"`
	Expired            bool           `json:"expired"`
	AdvertisedRoutes   []netip.Prefix `json:"advertised_routes"`
	ApprovedRoutes     []netip.Prefix `json:"approved_routes"`
	CreatedAt          time.Time      `json:"created_at"`
}

// TagsRequest replaces a node's tags.
type TagsRequest struct {
	Tags []string `json:"tags"`
}

// RoutesRequest sets a node's approved routes.
type RoutesRequest struct {
	Routes []netip.Prefix `json:"routes"`
}

// Policy is the active policy.
type Policy struct {
	// Source is "default", "database" or "file".
	Source string `json:"source"`
	Text   string `json:"text"`
}

// Error is the body of every non-2xx response.
type Error struct {
	Error string `json:"error"`
}
