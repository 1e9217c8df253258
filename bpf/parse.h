/* SPDX-License-Identifier: GPL-2.0 */
/*
 * parse.h - one cursor walks the frame: Ethernet, up to XZ_MAX_VLAN 802.1Q /
 * 802.1ad tags, PPPoE session, IPv4 (options, fragments), IPv6 (extension
 * headers, fragments), then the fixed TCP/UDP/ICMP header. Each parse_*
 * checks its bounds once and advances the cursor; -1 means "cannot parse".
 */
#ifndef XDPZOOT_PARSE_H
#define XDPZOOT_PARSE_H

#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include "xdpzoot.h"

#define XZ_ETH_P_PPPOE_SES 0x8864
#define XZ_PPP_IPV4 0x0021
#define XZ_PPP_IPV6 0x0057
#define XZ_IP_MF 0x2000
#define XZ_IP_OFFMASK 0x1fff

/* Fragment state of the packet. */
#define XZ_FRAG_NONE 0
#define XZ_FRAG_FIRST 1   /* offset 0, more fragments follow */
#define XZ_FRAG_LATER 2   /* offset > 0: no L4 header here */

struct xz_vlan_hdr {
	__be16 tci;
	__be16 proto;
};

struct xz_pppoe_hdr {
	__u8 ver_type;
	__u8 code;
	__be16 session;
	__be16 length;   /* PPP payload length, protocol field included */
	__be16 ppp_proto;
};

/* What the parser learnt; the policy reads only this. */
struct xz_pkt {
	void *data;
	void *end;
	void *l3;
	void *l4;
	struct xz_pppoe_hdr *pppoe;  /* NULL unless PPPoE session */
	__u32 len;                   /* frame (TC: packet) length */
	__u32 ip_len;                /* IP bytes according to the IP header */
	__u32 l4_len;                /* L4 bytes according to the IP header */
	__u16 segs;                  /* packets on the wire: >1 for a GSO/GRO aggregate (TC) */
	__u8 hook;                   /* XZ_HOOK_*: set by the entry point (drop events) */
	__u8 l4_hlen;                /* TCP/UDP header length, options included */
	__u8 family;                 /* 4 or 6; 0 before L3 parsed */
	__u8 proto;                  /* L4 protocol number */
	__u8 frag;                   /* XZ_FRAG_* */
	__u8 l4ok;                   /* fixed L4 header present and read */
	__u8 ip_extra;               /* IPv4 options or IPv6 extension headers */
	__u8 tcp_flags;
	__u8 icmp_type;
	__u16 sport;                 /* host order */
	__u16 dport;
	struct xz_addr src;
	struct xz_addr dst;
};

static __always_inline void xz_map_v4(struct xz_addr *a, __be32 v4)
{
	__builtin_memset(a->addr, 0, 10);
	a->addr[10] = 0xff;
	a->addr[11] = 0xff;
	__builtin_memcpy(&a->addr[12], &v4, 4);
}

/* Ethernet and VLAN tags; returns the inner ethertype (network order). */
static __always_inline int parse_eth(struct xz_pkt *p, void **pos, __be16 *proto)
{
	struct ethhdr *eth = *pos;

	if ((void *)(eth + 1) > p->end)
		return -1;
	*proto = eth->h_proto;
	*pos = eth + 1;
#pragma unroll
	for (int i = 0; i < XZ_MAX_VLAN; i++) {
		struct xz_vlan_hdr *vh = *pos;

		if (*proto != bpf_htons(ETH_P_8021Q) && *proto != bpf_htons(ETH_P_8021AD))
			break;
		if ((void *)(vh + 1) > p->end)
			return -1;
		*proto = vh->proto;
		*pos = vh + 1;
	}
	return 0;
}

/* PPPoE session stage: IPv4/IPv6 inside become plain ethertypes. */
static __always_inline int parse_pppoe(struct xz_pkt *p, void **pos, __be16 *proto)
{
	struct xz_pppoe_hdr *ph = *pos;

	if (*proto != bpf_htons(XZ_ETH_P_PPPOE_SES))
		return 0;
	if ((void *)(ph + 1) > p->end || ph->ver_type != 0x11 || ph->code != 0)
		return -1;
	if (ph->ppp_proto == bpf_htons(XZ_PPP_IPV4))
		*proto = bpf_htons(ETH_P_IP);
	else if (ph->ppp_proto == bpf_htons(XZ_PPP_IPV6))
		*proto = bpf_htons(ETH_P_IPV6);
	else
		return -1;   /* LCP, IPCP, ...: not for us */
	p->pppoe = ph;
	*pos = ph + 1;
	return 0;
}

static __always_inline int parse_ipv4(struct xz_pkt *p, void **pos)
{
	struct iphdr *ip = *pos;
	__u32 hlen, tot;
	__u16 frag;

	if ((void *)(ip + 1) > p->end || ip->version != 4 || ip->ihl < 5)
		return -1;
	hlen = ip->ihl * 4;
	tot = bpf_ntohs(ip->tot_len);
	if (*pos + hlen > p->end || tot < hlen)
		return -1;
	p->family = 4;
	p->proto = ip->protocol;
	p->ip_extra = hlen > sizeof(*ip);
	p->ip_len = tot;
	p->l4_len = tot - hlen;
	frag = bpf_ntohs(ip->frag_off);
	if (frag & XZ_IP_OFFMASK)
		p->frag = XZ_FRAG_LATER;
	else if (frag & XZ_IP_MF)
		p->frag = XZ_FRAG_FIRST;
	xz_map_v4(&p->src, ip->saddr);
	xz_map_v4(&p->dst, ip->daddr);
	p->l3 = ip;
	*pos += hlen;
	return 0;
}

struct xz_ipv6_opt {
	__u8 nexthdr;
	__u8 hdrlen;
};

struct xz_ipv6_frag {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off;   /* offset << 3 | M */
	__be32 id;
};

/* IPv6 header and extension chain; stops at the upper-layer header. */
static __always_inline int parse_ipv6(struct xz_pkt *p, void **pos)
{
	struct ipv6hdr *ip6 = *pos;
	__u32 plen, ext = 0;
	__u8 nh;

	if ((void *)(ip6 + 1) > p->end || ip6->version != 6)
		return -1;
	p->family = 6;
	__builtin_memcpy(p->src.addr, &ip6->saddr, 16);
	__builtin_memcpy(p->dst.addr, &ip6->daddr, 16);
	plen = bpf_ntohs(ip6->payload_len);
	nh = ip6->nexthdr;
	p->l3 = ip6;
	*pos = ip6 + 1;
#pragma unroll
	for (int i = 0; i < XZ_MAX_EXTHDR; i++) {
		struct xz_ipv6_opt *opt = *pos;
		__u32 len;

		if (nh == IPPROTO_FRAGMENT) {
			struct xz_ipv6_frag *fh = *pos;
			__u16 off;

			if ((void *)(fh + 1) > p->end)
				return -1;
			off = bpf_ntohs(fh->frag_off);
			if (off & 0xfff8)
				p->frag = XZ_FRAG_LATER;
			else if (off & 1)
				p->frag = XZ_FRAG_FIRST;
			nh = fh->nexthdr;
			len = sizeof(*fh);
		} else if (nh == IPPROTO_HOPOPTS || nh == IPPROTO_ROUTING ||
			   nh == IPPROTO_DSTOPTS || nh == IPPROTO_AH) {
			if ((void *)(opt + 1) > p->end)
				return -1;
			/* AH counts 4-byte words minus 2, the others 8-byte words minus 1. */
			len = nh == IPPROTO_AH ? (opt->hdrlen + 2) * 4 : (opt->hdrlen + 1) * 8;
			nh = opt->nexthdr;
		} else {
			break;
		}
		ext += len;
		*pos += len;
		p->ip_extra = 1;
		if (p->frag == XZ_FRAG_LATER)
			break;
	}
	/* A chain longer than XZ_MAX_EXTHDR: cannot be parsed (fail open, counted). */
	if (p->frag != XZ_FRAG_LATER &&
	    (nh == IPPROTO_HOPOPTS || nh == IPPROTO_ROUTING || nh == IPPROTO_DSTOPTS ||
	     nh == IPPROTO_AH || nh == IPPROTO_FRAGMENT))
		return -1;
	p->proto = nh;
	p->ip_len = sizeof(*ip6) + plen;
	p->l4_len = plen > ext ? plen - ext : 0;
	return 0;
}

/* Fixed upper-layer header size the policy reads, by protocol; 0: none. */
static __always_inline __u32 xz_l4_need(__u8 proto)
{
	switch (proto) {
	case IPPROTO_TCP:
		return sizeof(struct tcphdr);
	case IPPROTO_UDP:
		return sizeof(struct udphdr);
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6:
		return 8;
	}
	return 0;
}

/* Upper-layer header of an unfragmented packet or a first fragment. */
static __always_inline void parse_l4(struct xz_pkt *p, void *pos)
{
	__u32 need = xz_l4_need(p->proto);

	p->l4 = pos;
	if (p->frag == XZ_FRAG_LATER || need == 0 || p->l4_len < need)
		return;
	if (p->proto == IPPROTO_TCP) {
		struct tcphdr *th = pos;

		if ((void *)(th + 1) > p->end)
			return;
		p->sport = bpf_ntohs(th->source);
		p->dport = bpf_ntohs(th->dest);
		p->tcp_flags = ((__u8 *)th)[13];
		p->l4_hlen = (((__u8 *)th)[12] >> 4) * 4;
	} else if (p->proto == IPPROTO_UDP) {
		struct udphdr *uh = pos;

		if ((void *)(uh + 1) > p->end)
			return;
		p->sport = bpf_ntohs(uh->source);
		p->dport = bpf_ntohs(uh->dest);
		p->l4_hlen = sizeof(*uh);
	} else {
		__u8 *icmp = pos;

		if ((void *)(icmp + 8) > p->end)
			return;
		p->icmp_type = icmp[0];
	}
	p->l4ok = 1;
}

/* Whole frame; -1 when L2/L3 cannot be parsed (the caller fails open). */
static __always_inline int parse_frame(struct xz_pkt *p)
{
	void *pos = p->data;
	__be16 proto;

	if (parse_eth(p, &pos, &proto) < 0 || parse_pppoe(p, &pos, &proto) < 0)
		return -1;
	if (proto == bpf_htons(ETH_P_IP)) {
		if (parse_ipv4(p, &pos) < 0)
			return -1;
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		if (parse_ipv6(p, &pos) < 0)
			return -1;
	} else {
		return -1;
	}
	parse_l4(p, pos);
	return 0;
}

#endif /* XDPZOOT_PARSE_H */
