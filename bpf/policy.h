/* SPDX-License-Identifier: GPL-2.0 */
/*
 * policy.h - the one policy pipeline. It does not know which hook runs it:
 * entry points in xdpzoot.c adapt the context and turn the verdict into a
 * return code. Every verdict leaves through one exit that counts it.
 *
 *  upstream   (access ingress): classify source -> suspended? -> OP25B
 *  downstream (core ingress):   classify destination -> suspended? -> IP53B
 */
#ifndef XDPZOOT_POLICY_H
#define XDPZOOT_POLICY_H

#include "xdpzoot.h"
#include "maps.h"
#include "parse.h"

#define XZ_TCP_FIN 0x01
#define XZ_TCP_SYN 0x02
#define XZ_TCP_RST 0x04
#define XZ_TCP_ACK 0x10

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

/* Returns XZ_V_*: PASS, DROP, REJECT (packet to be rewritten by xz_make_rst). */
static __always_inline int xz_pipeline(struct xz_pkt *p, const int role)
{
	int verdict = XZ_V_PASS, reason = XZ_R_OK, hit = 0;
	struct xz_class *cls;
	struct xz_addr *peer;
	struct xz_control *ctl;
	__u32 key = 0, flags;

	/* No control entry means no rule is on: fail open. */
	ctl = xz_control.lookup(&key);
	flags = ctl ? ctl->flags : 0;
	if (flags & XZ_C_BYPASS) {
		reason = XZ_R_BYPASS;
		goto out;
	}
	/* Not Ethernet/VLAN/PPPoE + IPv4/IPv6 as we know it: fail open. */
	if (parse_frame(p) < 0) {
		reason = XZ_R_UNPARSED;
		goto out;
	}
	if (role == XZ_ROLE_ACCESS) {
		cls = xz_classify(&p->src);
		peer = &p->dst;
	} else {
		cls = xz_classify(&p->dst);
		peer = &p->src;
	}
	if (!cls) {
		reason = XZ_R_UNKNOWN;
		goto out;
	}
	if (xz_is_nd(p))
		goto out;
	if (cls->flags & XZ_F_SUSPENDED) {
		if (xz_allowed(peer, XZ_ALLOW_SUSPEND)) {
			reason = XZ_R_ALLOWLIST;
		} else {
			verdict = XZ_V_DROP;
			reason = XZ_R_SUSPENDED;
		}
		goto out;
	}
	if (p->frag == XZ_FRAG_LATER) {
		reason = XZ_R_FRAGMENT;
		goto out;
	}
	if (cls->type != XZ_TYPE_DYNAMIC)
		goto out;
	if (role == XZ_ROLE_ACCESS) {
		if (!(flags & XZ_C_OP25B) || (p->family == 6 && !(flags & XZ_C_OP25B_V6)) ||
		    p->proto != IPPROTO_TCP)
			goto out;
		reason = xz_port_rule(p, cls, 25, XZ_F_OP25B_EXEMPT, peer, XZ_R_OP25B, &hit);
		if (hit)
			verdict = (flags & XZ_C_OP25B_REJECT) && reason == XZ_R_OP25B &&
				  !p->ip_extra && !(p->tcp_flags & XZ_TCP_RST) ?
				  XZ_V_REJECT : XZ_V_DROP;
	} else {
		if (!(flags & XZ_C_IP53B) || (p->family == 6 && !(flags & XZ_C_IP53B_V6)) ||
		    !(p->proto == IPPROTO_UDP ||
		      (p->proto == IPPROTO_TCP && (flags & XZ_C_IP53B_TCP))))
			goto out;
		reason = xz_port_rule(p, cls, 53, XZ_F_IP53B_EXEMPT, NULL, XZ_R_IP53B, &hit);
		if (hit)
			verdict = XZ_V_DROP;
	}
out:
	if (verdict != XZ_V_PASS && (flags & XZ_C_MONITOR))
		verdict = XZ_V_MONITOR;
	xz_count(role, verdict, reason, p->len);
	return verdict;
}

static __always_inline __u16 xz_csum_fold(__s64 sum)
{
	__u32 c = (__u32)sum;

	c = (c & 0xffff) + (c >> 16);
	c = (c & 0xffff) + (c >> 16);
	return (__u16)~c;
}

struct xz_pseudo6 {
	struct xz_addr src;
	struct xz_addr dst;
	__be32 len;
	__be32 nexthdr;
};

struct xz_pseudo4 {
	__be32 src;
	__be32 dst;
	__u8 zero;
	__u8 proto;
	__be16 len;
};

/*
 * Turn a TCP segment without IP options or extension headers into the RST
 * that answers it, in place, keeping the L2 encapsulation (VLAN tags, PPPoE).
 * Returns the new frame length, 0 when the frame cannot be rewritten.
 */
static __always_inline __u32 xz_make_rst(struct xz_pkt *p)
{
	struct ethhdr *eth = p->data;
	struct tcphdr *th = p->l4;
	__u8 mac[ETH_ALEN], *tb;
	__u32 seq, ack, paylen, l3len;
	__u16 port;
	__s64 sum;

	if ((void *)(eth + 1) > p->end || (void *)(th + 1) > p->end)
		return 0;
	__builtin_memcpy(mac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, mac, ETH_ALEN);

	tb = (__u8 *)th;
	paylen = p->l4_len > (__u32)th->doff * 4 ? p->l4_len - th->doff * 4 : 0;
	if (tb[13] & XZ_TCP_ACK) {
		seq = th->ack_seq;
		ack = 0;
		tb[13] = XZ_TCP_RST;
	} else {
		seq = 0;
		ack = bpf_htonl(bpf_ntohl(th->seq) + paylen + !!(tb[13] & XZ_TCP_SYN) +
				!!(tb[13] & XZ_TCP_FIN));
		tb[13] = XZ_TCP_RST | XZ_TCP_ACK;
	}
	port = th->source;
	th->source = th->dest;
	th->dest = port;
	th->seq = seq;
	th->ack_seq = ack;
	tb[12] = 5 << 4;   /* doff 5: no options */
	th->window = 0;
	th->check = 0;
	th->urg_ptr = 0;

	if (p->family == 4) {
		struct iphdr *ip = p->l3;
		struct xz_pseudo4 ph = {};
		__be32 a;

		if ((void *)(ip + 1) > p->end)
			return 0;
		a = ip->saddr;
		ip->saddr = ip->daddr;
		ip->daddr = a;
		l3len = sizeof(*ip) + sizeof(*th);
		ip->tot_len = bpf_htons(l3len);
		ip->id = 0;
		ip->frag_off = bpf_htons(0x4000);   /* DF */
		ip->ttl = 64;
		ip->check = 0;
		ip->check = xz_csum_fold(bpf_csum_diff(0, 0, (void *)ip, sizeof(*ip), 0));
		ph.src = ip->saddr;
		ph.dst = ip->daddr;
		ph.proto = IPPROTO_TCP;
		ph.len = bpf_htons(sizeof(*th));
		sum = bpf_csum_diff(0, 0, (void *)&ph, sizeof(ph), 0);
	} else {
		struct ipv6hdr *ip6 = p->l3;
		struct xz_pseudo6 ph = {};

		if ((void *)(ip6 + 1) > p->end)
			return 0;
		__builtin_memcpy(&ph.src, &ip6->daddr, 16);
		__builtin_memcpy(&ph.dst, &ip6->saddr, 16);
		__builtin_memcpy(&ip6->saddr, &ph.src, 16);
		__builtin_memcpy(&ip6->daddr, &ph.dst, 16);
		l3len = sizeof(*ip6) + sizeof(*th);
		ip6->payload_len = bpf_htons(sizeof(*th));
		ip6->hop_limit = 64;
		ph.len = bpf_htonl(sizeof(*th));
		ph.nexthdr = bpf_htonl(IPPROTO_TCP);
		sum = bpf_csum_diff(0, 0, (void *)&ph, sizeof(ph), 0);
	}
	th->check = xz_csum_fold(bpf_csum_diff(0, 0, (void *)th, sizeof(*th), sum));

	if (p->pppoe) {
		struct xz_pppoe_hdr *ph = p->pppoe;

		if ((void *)(ph + 1) > p->end)
			return 0;
		ph->length = bpf_htons(l3len + 2);
	}
	return (__u32)((void *)(th + 1) - p->data);
}

#endif /* XDPZOOT_POLICY_H */
