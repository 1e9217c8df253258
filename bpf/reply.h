/* SPDX-License-Identifier: GPL-2.0 */
/*
 * reply.h - the answer to a rejected packet, sent back where it came from:
 * a TCP RST for TCP, an ICMP / ICMPv6 "administratively prohibited" otherwise.
 * Two steps around the hook's resize: xz_reply_prepare() saves what the
 * answer needs (its L2 part too) and says its length, the entry point resizes
 * the frame, xz_reply_write() writes the whole answer from the frame's start,
 * keeping the encapsulation (VLAN tags, PPPoE session).
 */
#ifndef XDPZOOT_REPLY_H
#define XDPZOOT_REPLY_H

#include <uapi/linux/icmp.h>
#include <uapi/linux/icmpv6.h>
#include "xdpzoot.h"
#include "parse.h"

#define XZ_TCP_FIN 0x01
#define XZ_TCP_SYN 0x02
#define XZ_TCP_RST 0x04
#define XZ_TCP_ACK 0x10

/* Longest L2 part: Ethernet, XZ_MAX_VLAN tags, PPPoE session header. */
#define XZ_L2_MAX (14 + 4 * XZ_MAX_VLAN + 8)
/* What is saved of the L2 part: XZ_L2_MAX rounded up (every answer is longer). */
#define XZ_L2_SAVE ((XZ_L2_MAX + 7) & ~7)
/* ICMP quotes the offending IP header and 8 bytes of what follows. */
#define XZ_QUOTE4 (20 + 8)
#define XZ_QUOTE6 (40 + 8)

#define XZ_REPLY_RST 1
#define XZ_REPLY_ICMP 2

struct xz_reply {
	__u32 len;          /* frame length of the answer */
	__u16 l2len;        /* bytes before the IP header */
	__u8 kind;          /* XZ_REPLY_* */
	__u8 family;
	__u8 pppoe_off;     /* offset of the PPPoE session header, 0: none */
	__u8 tcp_flags;
	__be16 sport;       /* of the answer */
	__be16 dport;
	__be32 seq;
	__be32 ack;
	struct xz_addr src; /* of the answer: the rejected packet's destination */
	struct xz_addr dst;
	__u8 quote[XZ_QUOTE6];
	__u8 l2[XZ_L2_SAVE]; /* the frame's start: L2 part (and whatever follows it) */
};

/* Can this packet be answered (and not just dropped)? */
static __always_inline int xz_can_reply(struct xz_pkt *p)
{
	if (p->ip_extra || !p->l4ok)
		return 0;   /* options or extension headers: the answer would not fit */
	if (p->proto == IPPROTO_TCP)
		return !(p->tcp_flags & XZ_TCP_RST);   /* never answer a RST */
	/* No ICMP error about an ICMP error. */
	if (p->proto == IPPROTO_ICMP)
		return p->icmp_type == ICMP_ECHO;
	if (p->proto == IPPROTO_ICMPV6)
		return p->icmp_type == ICMPV6_ECHO_REQUEST;
	return 1;
}

/* Save what the answer needs; returns 0, or -1 when it cannot be built. */
static __always_inline int xz_reply_prepare(struct xz_pkt *p, struct xz_reply *r)
{
	__u32 l2len = p->l3 - p->data;

	if (l2len > XZ_L2_MAX)
		return -1;
	r->l2len = l2len;
	r->family = p->family;
	r->pppoe_off = p->pppoe ? (void *)p->pppoe - p->data : 0;
	/* The answer is written from the start of the frame, which may move (the XDP
	 * entry grows short frames at the head, where there is room). */
	if (p->data + XZ_L2_SAVE > p->end)
		return -1;
	__builtin_memcpy(r->l2, p->data, XZ_L2_SAVE);
	__builtin_memcpy(&r->src, &p->dst, sizeof(r->src));
	__builtin_memcpy(&r->dst, &p->src, sizeof(r->dst));
	if (p->proto == IPPROTO_TCP) {
		struct tcphdr *th = p->l4;
		__u8 flags;
		__u32 paylen;

		if ((void *)(th + 1) > p->end)
			return -1;
		flags = ((__u8 *)th)[13];
		paylen = p->l4_len > (__u32)th->doff * 4 ? p->l4_len - th->doff * 4 : 0;
		r->kind = XZ_REPLY_RST;
		r->sport = th->dest;
		r->dport = th->source;
		if (flags & XZ_TCP_ACK) {
			r->seq = th->ack_seq;
			r->ack = 0;
			r->tcp_flags = XZ_TCP_RST;
		} else {
			r->seq = 0;
			r->ack = bpf_htonl(bpf_ntohl(th->seq) + paylen + !!(flags & XZ_TCP_SYN) +
					   !!(flags & XZ_TCP_FIN));
			r->tcp_flags = XZ_TCP_RST | XZ_TCP_ACK;
		}
		r->len = l2len + (p->family == 4 ? 20 : 40) + sizeof(struct tcphdr);
		return 0;
	}
	r->kind = XZ_REPLY_ICMP;
	if (p->family == 4) {
		if (p->l3 + XZ_QUOTE4 > p->end)
			return -1;
		__builtin_memcpy(r->quote, p->l3, XZ_QUOTE4);
		r->len = l2len + 20 + 8 + XZ_QUOTE4;
	} else {
		if (p->l3 + XZ_QUOTE6 > p->end)
			return -1;
		__builtin_memcpy(r->quote, p->l3, XZ_QUOTE6);
		r->len = l2len + 40 + 8 + XZ_QUOTE6;
	}
	return 0;
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

/* Upper-layer checksum seed: the pseudo-header (none for ICMPv4). */
static __always_inline __s64 xz_pseudo_sum(struct xz_reply *r, __u8 proto, __u16 len)
{
	if (r->family == 4) {
		struct xz_pseudo4 ph = {};

		if (proto == IPPROTO_ICMP)
			return 0;
		__builtin_memcpy(&ph.src, &r->src.addr[12], 4);
		__builtin_memcpy(&ph.dst, &r->dst.addr[12], 4);
		ph.proto = proto;
		ph.len = bpf_htons(len);
		return bpf_csum_diff(0, 0, (void *)&ph, sizeof(ph), 0);
	} else {
		struct xz_pseudo6 ph = {};

		__builtin_memcpy(&ph.src, &r->src, 16);
		__builtin_memcpy(&ph.dst, &r->dst, 16);
		ph.len = bpf_htonl(len);
		ph.nexthdr = bpf_htonl(proto);
		return bpf_csum_diff(0, 0, (void *)&ph, sizeof(ph), 0);
	}
}

/* Write the answer into the resized frame; returns 0, or -1 (then drop). */
static __always_inline int xz_reply_write(void *data, void *end, struct xz_reply *r)
{
	struct ethhdr *eth = data;
	__u32 l2len = r->l2len & 0x3f;   /* verifier: a small, bounded offset */
	__u8 mac[ETH_ALEN], proto;
	__u16 l4len, l3len;
	void *l3, *l4;
	__s64 sum;

	if (data + XZ_L2_SAVE > end || l2len > XZ_L2_MAX)
		return -1;
	__builtin_memcpy(data, r->l2, XZ_L2_SAVE);   /* the L3 part below overwrites the rest */
	__builtin_memcpy(mac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, mac, ETH_ALEN);

	l3 = data + l2len;
	if (r->kind == XZ_REPLY_RST) {
		proto = IPPROTO_TCP;
		l4len = sizeof(struct tcphdr);
	} else {
		proto = r->family == 4 ? IPPROTO_ICMP : IPPROTO_ICMPV6;
		l4len = 8 + (r->family == 4 ? XZ_QUOTE4 : XZ_QUOTE6);
	}

	if (r->family == 4) {
		struct iphdr *ip = l3;

		if ((void *)(ip + 1) > end)
			return -1;
		l3len = sizeof(*ip) + l4len;
		ip->version = 4;
		ip->ihl = 5;
		ip->tos = 0;
		ip->tot_len = bpf_htons(l3len);
		ip->id = 0;
		ip->frag_off = bpf_htons(0x4000);   /* DF */
		ip->ttl = 64;
		ip->protocol = proto;
		__builtin_memcpy(&ip->saddr, &r->src.addr[12], 4);
		__builtin_memcpy(&ip->daddr, &r->dst.addr[12], 4);
		ip->check = 0;
		ip->check = xz_csum_fold(bpf_csum_diff(0, 0, (void *)ip, sizeof(*ip), 0));
		l4 = ip + 1;
	} else {
		struct ipv6hdr *ip6 = l3;

		if ((void *)(ip6 + 1) > end)
			return -1;
		l3len = sizeof(*ip6) + l4len;
		*(__be32 *)ip6 = bpf_htonl(0x60000000);   /* version 6, no class, no flow */
		ip6->payload_len = bpf_htons(l4len);
		ip6->nexthdr = proto;
		ip6->hop_limit = 64;
		__builtin_memcpy(&ip6->saddr, &r->src, 16);
		__builtin_memcpy(&ip6->daddr, &r->dst, 16);
		l4 = ip6 + 1;
	}
	sum = xz_pseudo_sum(r, proto, l4len);

	if (r->kind == XZ_REPLY_RST) {
		struct tcphdr *th = l4;

		if ((void *)(th + 1) > end)
			return -1;
		__builtin_memset(th, 0, sizeof(*th));
		th->source = r->sport;
		th->dest = r->dport;
		th->seq = r->seq;
		th->ack_seq = r->ack;
		((__u8 *)th)[12] = 5 << 4;   /* doff 5: no options */
		((__u8 *)th)[13] = r->tcp_flags;
		th->check = xz_csum_fold(bpf_csum_diff(0, 0, (void *)th, sizeof(*th), sum));
	} else if (r->family == 4) {
		__u8 *ic = l4;

		if ((void *)(ic + 8 + XZ_QUOTE4) > end)
			return -1;
		__builtin_memset(ic, 0, 8);
		ic[0] = ICMP_DEST_UNREACH;
		ic[1] = ICMP_PKT_FILTERED;   /* 13: communication administratively prohibited */
		__builtin_memcpy(ic + 8, r->quote, XZ_QUOTE4);
		*(__u16 *)(ic + 2) = xz_csum_fold(bpf_csum_diff(0, 0, (void *)ic, 8 + XZ_QUOTE4, 0));
	} else {
		__u8 *ic = l4;

		if ((void *)(ic + 8 + XZ_QUOTE6) > end)
			return -1;
		__builtin_memset(ic, 0, 8);
		ic[0] = ICMPV6_DEST_UNREACH;
		ic[1] = ICMPV6_ADM_PROHIBITED;
		__builtin_memcpy(ic + 8, r->quote, XZ_QUOTE6);
		*(__u16 *)(ic + 2) = xz_csum_fold(bpf_csum_diff(0, 0, (void *)ic, 8 + XZ_QUOTE6,
								 sum));
	}

	if (r->pppoe_off) {
		struct xz_pppoe_hdr *ph = data + (r->pppoe_off & 0x3f);

		if ((void *)(ph + 1) > end)
			return -1;
		ph->length = bpf_htons(l3len + 2);
	}
	return 0;
}

#endif /* XDPZOOT_REPLY_H */
