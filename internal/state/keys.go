package state

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"regexp"
	"strings"
)

// KeyPrefix starts every pre-auth key tailplane prints.
const KeyPrefix = "tpkey-auth-"

// Key errors are shown to the client that presented the key, so they say
// what is wrong and what to do, and never which part of a secret matched.
var (
	ErrKeyInvalid = errors.New("invalid pre-auth key: it is malformed or unknown to this server")
	ErrKeyExpired = errors.New("pre-auth key has expired: create a new one with 'tailplane keys create'")
	ErrKeyUsed    = errors.New("pre-auth key was already used: it is a one-off key; create a new one or use --reusable")
)

// newKeySecret returns a key id (public, 16 hex characters), its 256-bit
// secret (64 hex characters) and the full printed key.
func newKeySecret() (id string, hash [32]byte, full string) {
	var idb [8]byte
	var sec [32]byte
	if _, err := rand.Read(idb[:]); err != nil {
		panic(err) // crypto/rand never fails on supported platforms
	}
	if _, err := rand.Read(sec[:]); err != nil {
		panic(err)
	}
	id = hex.EncodeToString(idb[:])
	secret := hex.EncodeToString(sec[:])
	return id, sha256.Sum256([]byte(secret)), KeyPrefix + id + "-" + secret
}

// parseKey splits a printed key into its id and the SHA-256 of its secret.
func parseKey(k string) (id string, hash [32]byte, ok bool) {
	rest, found := strings.CutPrefix(strings.TrimSpace(k), KeyPrefix)
	if !found || len(rest) > 200 {
		return "", hash, false
	}
	id, secret, found := strings.Cut(rest, "-")
	if !found || id == "" || secret == "" {
		return "", hash, false
	}
	return id, sha256.Sum256([]byte(secret)), true
}

// secretMatches compares hashes in constant time.
func secretMatches(a, b [32]byte) bool { return subtle.ConstantTimeCompare(a[:], b[:]) == 1 }

var tagRE = regexp.MustCompile(`^tag:[a-zA-Z0-9][a-zA-Z0-9_-]*$`)

// validateTag checks the form of a tag name (tag:NAME).
func validateTag(t string) error {
	if !tagRE.MatchString(t) {
		return fmt.Errorf("invalid tag %q: tags look like tag:name (letters, digits, '-' and '_')", t)
	}
	return nil
}
