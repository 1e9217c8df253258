/* SPDX-License-Identifier: GPL-2.0 */
/*
 * policy.h - the one policy pipeline. It does not know which hook runs it:
 * entry points in xdpzoot.c adapt the context and turn the verdict into a
 * return code. Every verdict leaves through one exit that counts it.
 *
 *  upstream   (access ingress): classify source -> suspended? -> OP25B -> CSAM
 *  downstream (core ingress):   classify destination -> suspended? -> IP53B
 *                               (-> CSAM source, when switched on)
 */
#ifndef XDPZOOT_POLICY_H
#define XDPZOOT_POLICY_H

#include "xdpzoot.h"
#include "maps.h"
#include "parse.h"
#include "reply.h"

/* Most specific entry wins: a host entry, else the longest prefix. */
static __always_inline struct xz_class *xz_classify(struct xz_addr *a)
{
	struct xz_lpm_key key = { .prefixlen = 128 };
	struct xz_class *cls = xz_hosts.lookup(a);

	if (cls)
		return cls;
	__builtin_memcpy(key.addr, a->addr, 16);
	return xz_prefixes.lookup(&key);
}

static __always_inline __u32 xz_allowed(struct xz_addr *a, __u32 bit)
{
	struct xz_lpm_key key = { .prefixlen = 128 };
	__u32 *bits;

	__builtin_memcpy(key.addr, a->addr, 16);
	bits = xz_allow.lookup(&key);
	return bits ? *bits & bit : 0;
}

/* IPv6 neighbour discovery always passes: the router needs it to reach anyone. */
static __always_inline int xz_is_nd(struct xz_pkt *p)
{
	return p->family == 6 && p->proto == IPPROTO_ICMPV6 && p->l4ok &&
	       p->icmp_type >= 133 && p->icmp_type <= 137;
}

/*
 * A port rule (OP25B, IP53B) for a dynamic subscriber: matches the
 * destination port, or a first fragment too short to show it.
 * Returns the reason; *hit says whether the packet is to be stopped.
 */
static __always_inline int xz_port_rule(struct xz_pkt *p, struct xz_class *cls, __u16 port,
					__u8 exempt, struct xz_addr *relay, int reason, int *hit)
{
	int is_short = p->frag == XZ_FRAG_FIRST && p->l4_len < xz_l4_need(p->proto);

	if (!is_short) {
		if (!p->l4ok)
			return XZ_R_UNPARSED;
		if (p->dport != port)
			return XZ_R_OK;
	}
	if (cls->flags & exempt)
		return XZ_R_EXEMPT;
	if (relay && xz_allowed(relay, XZ_ALLOW_OP25B))
		return XZ_R_ALLOWLIST;
	*hit = 1;
	return is_short ? XZ_R_FRAG_SHORT : reason;
}

static __always_inline void xz_count(int role, int verdict, int reason, __u32 len)
{
	__u32 key = XZ_COUNTER(role, verdict, reason);
	struct xz_counter *c = xz_counters.lookup(&key);

	if (c) {
		c->packets++;
		c->bytes += len;
	}
}

/* Is the address on the CSAM list in force? Exact host, else prefix; a kind
 * of entry the list does not have is not looked up. */
static __always_inline int xz_csam_listed(struct xz_addr *a, __u32 csam)
{
	struct xz_lpm_key key = { .prefixlen = 128 };
	int gen = csam & XZ_CSAM_GEN;

	if (csam & XZ_CSAM_HOSTS) {
		if (gen ? !!xz_csam_h1.lookup(a) : !!xz_csam_h0.lookup(a))
			return 1;
	}
	if (!(csam & XZ_CSAM_PREFIXES))
		return 0;
	__builtin_memcpy(key.addr, a->addr, 16);
	return gen ? !!xz_csam_p1.lookup(&key) : !!xz_csam_p0.lookup(&key);
}

/* Hits per generation and family only: nothing says who hit which entry. */
static __always_inline void xz_csam_count(__u32 csam, __u8 family)
{
	__u32 key = (csam & XZ_CSAM_GEN) * 2 + (family == 6);
	__u64 *n = xz_csam_hits.lookup(&key);

	if (n)
		*n += 1;
}

/* The rules that depend on who the subscriber is; returns XZ_V_*, sets *reason. */
static __always_inline int xz_subscriber_rules(struct xz_pkt *p, const int role, __u32 flags,
					       int *reason)
{
	struct xz_class *cls;
	struct xz_addr *peer;
	int hit = 0;

	if (role == XZ_ROLE_ACCESS) {
		cls = xz_classify(&p->src);
		peer = &p->dst;
	} else {
		cls = xz_classify(&p->dst);
		peer = &p->src;
	}
	if (!cls) {
		*reason = XZ_R_UNKNOWN;
		return XZ_V_PASS;
	}
	if (xz_is_nd(p))
		return XZ_V_PASS;
	if (cls->flags & XZ_F_SUSPENDED) {
		if (xz_allowed(peer, XZ_ALLOW_SUSPEND)) {
			*reason = XZ_R_ALLOWLIST;
			return XZ_V_PASS;
		}
		*reason = XZ_R_SUSPENDED;
		return XZ_V_DROP;
	}
	if (p->frag == XZ_FRAG_LATER) {
		*reason = XZ_R_FRAGMENT;
		return XZ_V_PASS;
	}
	if (cls->type != XZ_TYPE_DYNAMIC)
		return XZ_V_PASS;
	if (role == XZ_ROLE_ACCESS) {
		if (!(flags & XZ_C_OP25B) || (p->family == 6 && !(flags & XZ_C_OP25B_V6)) ||
		    p->proto != IPPROTO_TCP)
			return XZ_V_PASS;
		*reason = xz_port_rule(p, cls, 25, XZ_F_OP25B_EXEMPT, peer, XZ_R_OP25B, &hit);
		if (!hit)
			return XZ_V_PASS;
		return (flags & XZ_C_OP25B_REJECT) && *reason == XZ_R_OP25B && xz_can_reply(p) ?
		       XZ_V_REJECT : XZ_V_DROP;
	}
	if (!(flags & XZ_C_IP53B) || (p->family == 6 && !(flags & XZ_C_IP53B_V6)) ||
	    !(p->proto == IPPROTO_UDP || (p->proto == IPPROTO_TCP && (flags & XZ_C_IP53B_TCP))))
		return XZ_V_PASS;
	*reason = xz_port_rule(p, cls, 53, XZ_F_IP53B_EXEMPT, NULL, XZ_R_IP53B, &hit);
	return hit ? XZ_V_DROP : XZ_V_PASS;
}

/* Returns XZ_V_*: PASS, DROP, REJECT (the entry point answers via reply.h). */
static __always_inline int xz_pipeline(struct xz_pkt *p, const int role)
{
	int verdict = XZ_V_PASS, reason = XZ_R_OK, listed = 0;
	struct xz_control *ctl;
	__u32 key = 0, flags, csam;

	/* No control entry means no rule is on: fail open. */
	ctl = xz_control.lookup(&key);
	flags = ctl ? ctl->flags : 0;
	csam = ctl ? ctl->csam : 0;   /* read once: one packet, one list */
	if (flags & XZ_C_BYPASS) {
		reason = XZ_R_BYPASS;
		goto out;
	}
	/* Not Ethernet/VLAN/PPPoE + IPv4/IPv6 as we know it: fail open. */
	if (parse_frame(p) < 0) {
		reason = XZ_R_UNPARSED;
		goto out;
	}
	/* The CSAM list applies to every packet from the access side, subscriber or not.
	 * Looked up first: the verifier then meets one scalar, not two map paths, below. */
	if (role == XZ_ROLE_ACCESS || (flags & XZ_C_CSAM_CORE))
		listed = xz_csam_listed(role == XZ_ROLE_ACCESS ? &p->dst : &p->src, csam);
	verdict = xz_subscriber_rules(p, role, flags, &reason);
	if (listed && verdict == XZ_V_PASS) {
		xz_csam_count(csam, p->family);
		reason = XZ_R_CSAM;
		verdict = role == XZ_ROLE_ACCESS && (flags & XZ_C_CSAM_REJECT) && xz_can_reply(p) &&
			  p->frag != XZ_FRAG_LATER ? XZ_V_REJECT : XZ_V_DROP;
	}
out:
	if (verdict != XZ_V_PASS && (flags & XZ_C_MONITOR))
		verdict = XZ_V_MONITOR;
	xz_count(role, verdict, reason, p->len);
	return verdict;
}

#endif /* XDPZOOT_POLICY_H */
