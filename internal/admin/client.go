package admin

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"syscall"
	"time"
)

// Client talks to a running server's admin socket.
type Client struct {
	socket string
	hc     *http.Client
}

// NewClient returns a client for the socket at path.
func NewClient(path string) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
	}
	return &Client{socket: path, hc: &http.Client{Transport: tr, Timeout: 5 * time.Minute}}
}

func (c *Client) do(ctx context.Context, method, path string, body []byte, out any) error {
	req, err := http.NewRequestWithContext(ctx, method, "http://tailplane"+path, bytes.NewReader(body))
	if err != nil {
		return err
	}
	res, err := c.hc.Do(req)
	if err != nil {
		if errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) {
			return fmt.Errorf("cannot reach the tailplane server at %s: is 'tailplane serve' running with this --data-dir?", c.socket)
		}
		if errors.Is(err, syscall.EACCES) {
			return fmt.Errorf("permission denied on %s: run as the user that runs the server", c.socket)
		}
		return err
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		return err
	}
	if res.StatusCode >= 300 {
		var e Error
		if json.Unmarshal(b, &e) == nil && e.Error != "" {
			return errors.New(e.Error)
		}
		return fmt.Errorf("%s %s: %s", method, path, res.Status)
	}
	if out != nil && len(b) > 0 {
		return json.Unmarshal(b, out)
	}
	return nil
}

func (c *Client) doJSON(ctx context.Context, method, path string, in, out any) error {
	var body []byte
	if in != nil {
		var err error
		if body, err = json.Marshal(in); err != nil {
			return err
		}
	}
	return c.do(ctx, method, path, body, out)
}

// Users lists users.
func (c *Client) Users(ctx context.Context) ([]User, error) {
	var out []User
	return out, c.doJSON(ctx, http.MethodGet, "/v1/users", nil, &out)
}

// CreateUser creates a user.
func (c *Client) CreateUser(ctx context.Context, req CreateUserRequest) (*User, error) {
	var out User
	return &out, c.doJSON(ctx, http.MethodPost, "/v1/users", req, &out)
}

// RenameUser renames a user.
func (c *Client) RenameUser(ctx context.Context, name, newName string) (*User, error) {
	var out User
	return &out, c.doJSON(ctx, http.MethodPost, "/v1/users/"+url.PathEscape(name)+"/rename", RenameRequest{Name: newName}, &out)
}

// DeleteUser deletes a user.
func (c *Client) DeleteUser(ctx context.Context, name string) error {
	return c.doJSON(ctx, http.MethodDelete, "/v1/users/"+url.PathEscape(name), nil, nil)
}

// Keys lists pre-auth keys.
func (c *Client) Keys(ctx context.Context) ([]Key, error) {
	var out []Key
	return out, c.doJSON(ctx, http.MethodGet, "/v1/keys", nil, &out)
}

// CreateKeys creates pre-auth keys; the secrets are in Key.Key.
func (c *Client) CreateKeys(ctx context.Context, req CreateKeysRequest) ([]Key, error) {
	var out []Key
	return out, c.doJSON(ctx, http.MethodPost, "/v1/keys", req, &out)
}

// ExpireKey revokes a key.
func (c *Client) ExpireKey(ctx context.Context, id string) error {
	return c.doJSON(ctx, http.MethodPost, "/v1/keys/"+url.PathEscape(id)+"/expire", nil, nil)
}

// Nodes lists nodes.
func (c *Client) Nodes(ctx context.Context) ([]Node, error) {
	var out []Node
	return out, c.doJSON(ctx, http.MethodGet, "/v1/nodes", nil, &out)
}

func nodePath(id uint64, suffix string) string {
	return "/v1/nodes/" + strconv.FormatUint(id, 10) + suffix
}

// DeleteNode deletes a node.
func (c *Client) DeleteNode(ctx context.Context, id uint64) error {
	return c.doJSON(ctx, http.MethodDelete, nodePath(id, ""), nil, nil)
}

// ExpireNode expires a node's key.
func (c *Client) ExpireNode(ctx context.Context, id uint64) (*Node, error) {
	var out Node
	return &out, c.doJSON(ctx, http.MethodPost, nodePath(id, "/expire"), nil, &out)
}

// RenameNode sets a node's DNS name.
func (c *Client) RenameNode(ctx context.Context, id uint64, name string) (*Node, error) {
	var out Node
	return &out, c.doJSON(ctx, http.MethodPost, nodePath(id, "/rename"), RenameRequest{Name: name}, &out)
}

// TagNode replaces a node's tags.
func (c *Client) TagNode(ctx context.Context, id uint64, tags []string) (*Node, error) {
	var out Node
	return &out, c.doJSON(ctx, http.MethodPost, nodePath(id, "/tags"), TagsRequest{Tags: tags}, &out)
}

// ApproveRoutes sets a node's approved routes.
func (c *Client) ApproveRoutes(ctx context.Context, id uint64, req RoutesRequest) (*Node, error) {
	var out Node
	return &out, c.doJSON(ctx, http.MethodPost, nodePath(id, "/routes"), req, &out)
}

// Policy returns the active policy.
func (c *Client) Policy(ctx context.Context) (*Policy, error) {
	var out Policy
	return &out, c.doJSON(ctx, http.MethodGet, "/v1/policy", nil, &out)
}

// SetPolicy validates and activates a policy.
func (c *Client) SetPolicy(ctx context.Context, text []byte) error {
	return c.do(ctx, http.MethodPut, "/v1/policy", text, nil)
}

// CheckPolicy validates a policy and runs its tests without applying it.
func (c *Client) CheckPolicy(ctx context.Context, text []byte) error {
	return c.do(ctx, http.MethodPost, "/v1/policy/check", text, nil)
}
