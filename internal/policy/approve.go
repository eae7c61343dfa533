package policy

import (
	"net/netip"
	"slices"
)

// Directory is what the ownership and approval checks need to know about
// the tailnet: users by ID, to resolve users, groups and domains.
type Directory interface {
	User(id uint64) (User, bool)
}

// Users is a Directory over a slice of users.
type Users []User

// User implements Directory.
func (us Users) User(id uint64) (User, bool) {
	for _, u := range us {
		if u.ID == id {
			return u, true
		}
	}
	return User{}, false
}

// MayOwnTag reports whether user u may apply tag to a node, per tagOwners.
// Owners may be users, groups and autogroup:member; a tag owned by another tag
// may be applied by nodes carrying that tag, which ownerTags lists (the tags
// of the node asking, if it is tagged).
func (p *Policy) MayOwnTag(u User, tag string, ownerTags ...string) bool {
	owners, ok := p.tagOwners[tag]
	if !ok {
		return false
	}
	for _, o := range owners {
		switch o.kind {
		case akUser:
			if len(ownerTags) == 0 && u.Login() == o.name {
				return true
			}
		case akGroup:
			if len(ownerTags) == 0 && slices.Contains(p.groups[o.name], u.Login()) {
				return true
			}
		case akMember:
			if len(ownerTags) == 0 && u.ID != 0 {
				return true
			}
		case akTag:
			if slices.Contains(ownerTags, o.name) {
				return true
			}
		}
	}
	return false
}

// AutoApprove reports whether autoApprovers approve route for node n: a
// default route (exit node) needs an exitNode approver; any other route
// needs a routes entry whose prefix contains it. users resolves
// the node's owner for user, group and domain approvers.
func (p *Policy) AutoApprove(n Node, route netip.Prefix, users Directory) bool {
	route = route.Masked()
	match := func(as []alias) bool {
		for _, a := range as {
			if p.approverMatches(a, &n, users) {
				return true
			}
		}
		return false
	}
	if isExitRoute(route) {
		return match(p.autoExit)
	}
	for _, ar := range p.autoRoutes {
		if ar.prefix.Bits() <= route.Bits() && ar.prefix.Contains(route.Addr()) && match(ar.approvers) {
			return true
		}
	}
	return false
}

func (p *Policy) approverMatches(a alias, n *Node, users Directory) bool {
	switch a.kind {
	case akTag:
		return slices.Contains(n.Tags, a.name)
	case akTagged:
		return n.IsTagged()
	}
	if n.IsTagged() {
		return false
	}
	u, ok := users.User(n.UserID)
	if !ok {
		return false
	}
	switch a.kind {
	case akUser:
		return u.Login() == a.name
	case akGroup:
		return slices.Contains(p.groups[a.name], u.Login())
	case akMember:
		return true
	}
	return false
}
