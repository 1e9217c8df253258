/* SPDX-License-Identifier: GPL-2.0 */
/*
 * forward.h - the fast path. A packet the pipeline passed is forwarded by the
 * program itself, as the kernel would: route lookup (bpf_fib_lookup, in the
 * ingress interface's namespace, with its ingress ifindex), TTL / hop limit
 * decremented (IPv4 checksum updated incrementally), and a redirect: from XDP
 * into the devmap of the router's interfaces, with the MACs of the route's
 * neighbour; from TC ingress to the route's interface with bpf_redirect_neigh
 * (the kernel writes the link header).
 *
 * Whenever the fast path cannot be exact, the packet goes to the kernel's
 * stack (XDP_PASS, TC_ACT_OK) untouched, and the reason is counted
 * (XZ_FAST_REASONS): the kernel then answers what needs an answer (ICMP time
 * exceeded, packet too big), resolves neighbours, and handles what is for the
 * router itself.
 *
 * At TC a GRO aggregate is forwarded whole when its segments fit the route's and
 * the egress device's MTU (bpf_check_mtu, BPF_MTU_CHK_SEGS).
 *
 * The kernel's reverse path filter (rp_filter) holds: from an interface with it on, an
 * IPv4 packet whose source the route back does not accept goes to the kernel.
 *
 * Its programs (xdpzoot.c: xz_xdp_fast, xz_tc_fast) are tail-called by the entry points.
 *
 * Skipped on the fast path, by design: netfilter (forward rules, conntrack),
 * the kernel's forwarding counters; from XDP also the egress qdisc and taps
 * on egress (from TC the packet goes through the egress interface's qdisc).
 */
#ifndef XDPZOOT_FORWARD_H
#define XDPZOOT_FORWARD_H

#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>
#include "xdpzoot.h"
#include "maps.h"

#define XZ_AF_INET 2
#define XZ_AF_INET6 10
#define XZ_IPV6_FLOWINFO 0x0fffffff   /* traffic class and flow label */
#define XZ_SEG_UNKNOWN 0xffffffff     /* a GRO aggregate whose segments' size is not told */

/* bpf_redirect_neigh as the kernel declares it (bcc 0.26's has no ``plen``). */
static long (*xz_redirect_neigh)(__u32 ifindex, struct bpf_redir_neigh *params, int plen,
				 __u64 flags) = (void *)BPF_FUNC_redirect_neigh;

static __always_inline void xz_fast_count(int reason, __u32 len)
{
	__u32 key = reason;
	struct xz_counter *c = xz_fast.lookup(&key);

	if (c) {
		c->packets++;
		c->bytes += len;
	}
}

/* IPv4 addresses the kernel routes specially (ip_route_input_slow): multicast,
 * limited broadcast, 0/8, loopback, either way. Network order in, 1: special. */
static __always_inline int xz_special4(__be32 a)
{
	__u32 h = bpf_ntohl(a);

	return (h >> 28) == 0xe || h == 0xffffffff || (h >> 24) == 0 || (h >> 24) == 127;
}

/* IPv6 addresses of link scope or multicast (ND, link-local, loopback ::1,
 * unspecified ::): the kernel's business, never forwarded as is. */
static __always_inline int xz_special6(struct in6_addr *a)
{
	__u32 w0 = bpf_ntohl(a->s6_addr32[0]);

	if ((w0 >> 24) == 0xff || (w0 & 0xffc00000) == 0xfe800000)
		return 1;
	return w0 == 0 && a->s6_addr32[1] == 0 && a->s6_addr32[2] == 0 &&
	       (bpf_ntohl(a->s6_addr32[3]) >> 1) == 0;
}

/* As ip_decrease_ttl(): the checksum adjusted for the TTL's byte (RFC 1624). */
static __always_inline void xz_ttl_dec(struct iphdr *ip)
{
	__u32 check = ip->check;

	check += bpf_htons(0x0100);
	ip->check = (__u16)(check + (check >= 0xffff));
	ip->ttl--;
}

/* Whether the kernel's reverse path filter (fib_validate_source) may refuse IPv4 packet
 * ``ip`` come in by interface ``from``, whose rp_filter is ``mode`` (XZ_RPF_*, not off): 1
 * unless the route back to its source is unicast (loose), by that interface (strict). The
 * lookup is the kernel's: from the loopback, addresses swapped, in ``r`` (the caller's,
 * zeroed, which the caller fills anew after: the stack has no room for two). Where it
 * says 1 the kernel decides (one path of a multipath route back, a VRF's member: it may
 * accept). */
static __always_inline int xz_rp_refused(void *ctx, struct bpf_fib_lookup *r,
					 struct iphdr *ip, __u32 from, __u64 mode)
{
	__u64 bad;
	int rc;

	r->family = XZ_AF_INET;
	r->ifindex = 1;
	r->tos = ip->tos;
	r->ipv4_src = ip->daddr;
	r->ipv4_dst = ip->saddr;
	rc = bpf_fib_lookup(ctx, r, sizeof(*r), 0);
	/* Without a branch: unicast (found, or its neighbour not resolved), by ``from`` where
	 * strict (mode 1), and not XZ_RPF_KERNEL (mode 3). */
	bad = (__u64)rc * (__u64)(rc ^ BPF_FIB_LKUP_RET_NO_NEIGH) |
	      (__u64)(r->ifindex ^ from) * (mode & ~(mode >> 1) & 1) | (mode & (mode >> 1) & 1);
	asm volatile("" : "+r"(bad));
	return bad != 0;
}

/* Whether the fast path is on and not bypassed (the fail-safe: everything to the kernel
 * untouched, not counted): the entry points ask before they tail-call it (XZ_TAIL_FAST),
 * so that the fast path itself need not ask again. */
static __always_inline int xz_fast_on(void)
{
	__u32 key = 0;
	struct xz_control *ctl = xz_control.lookup(&key);

	return ctl && (ctl->flags & (XZ_C_FAST_PATH | XZ_C_BYPASS)) == XZ_C_FAST_PATH;
}

/*
 * The fast path for a packet the pipeline passed, at either hook, while it is on
 * (xz_fast_on): 1, forwarded (redirected, its frame rewritten), or 0, left to the kernel
 * untouched, the reason counted. ``ctx``: the
 * hook's context (for the route lookup); ``data``..``end`` the frame (``len`` bytes, counted),
 * ``in_if`` its ingress interface. XDP redirects into the devmap; TC (ingress) to any
 * interface. ``seg_len``: 0 for a packet; for a GRO aggregate (TC), the IP length of its
 * segments, which the route's MTU and the egress device's are checked against, as the
 * kernel checks them (XZ_SEG_UNKNOWN: one it cannot tell, to the kernel as ``frame``).
 */
static __always_inline int xz_fast_forward(void *ctx, void *data, void *end, __u32 len,
					   __u32 in_if, __u32 seg_len, const int hook)
{
	struct bpf_fib_lookup fib = {};
	struct ethhdr *eth = data;
	struct iphdr *ip = NULL;
	struct ipv6hdr *ip6 = NULL;
	__u32 key = in_if, egress, tot;
	struct xz_fast_mac *mac;
	__u64 dst = 0, addr = 0, ours, via, rpf, same;
	__u32 from;
	int reason = XZ_FP_FRAME, rc;
	__u8 ttl;

	/* Untagged Ethernet only: VLAN tags and PPPoE go to the kernel. */
	if ((void *)(eth + 1) > end || seg_len == XZ_SEG_UNKNOWN)
		goto out;
	if (eth->h_dest[0] & 1) {   /* L2 broadcast or multicast: for the router */
		reason = XZ_FP_LOCAL;
		goto out;
	}
	/* For another host's MAC (an interface in promiscuous mode, a macvlan's frames but for
	 * the VRRP ones of [interfaces] vmacs, which the kernel would route too): the
	 * kernel drops it or gives it to whom it is for (PACKET_OTHERHOST), never forwards it.
	 * Against the MACs the control plane wrote for the ingress interface; none: the same.
	 * A VRRP one's frames the kernel routes as the macvlan's (its `iif` rules, its VRF,
	 * its forwarding switch): so does the route lookup, from the entry's ``via``. */
	mac = xz_fast_macs.lookup(&key);
	__builtin_memcpy(&dst, eth->h_dest, ETH_ALEN);
	__builtin_memset(&addr, 0xff, ETH_ALEN);   /* a word's six bytes of address */
	ours = 0;
	via = 0;
	rpf = 0;
	if (mac) {
#pragma unroll
		for (int i = 0; i < XZ_FAST_MACS; i++) {
			/* 1 where the addresses are equal, without a branch (each would double
			 * the paths the verifier walks): (x - 1) & ~x has bit 63 set only where x
			 * is 0. */
			__u64 w = mac->mac[i], x = (w ^ dst) & addr, eq;

			asm volatile("" : "+r"(x));   /* else clang makes it a compare again */
			eq = ((x - 1) & ~x) >> 63;
			ours |= eq;
			/* the word's last two bytes: its top 16 bits little-endian, else its low */
			via |= ((w & ~addr) >> ((addr & 1) * 48)) & -eq;
			rpf |= (mac->rpf >> (2 * i)) & 3 & -eq;
		}
	}
	if (!dst || !ours) {
		reason = XZ_FP_OTHER_HOST;
		goto out;
	}
	/* via, else the ingress itself (without a branch: via is below 2^16) */
	from = via + in_if * ((((__u64)via + 0xFFFF) >> 16) ^ 1);
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		ip = (void *)(eth + 1);
		/* Options (router alert, source route...) need the kernel. */
		if ((void *)(ip + 1) > end || ip->version != 4 || ip->ihl != 5)
			goto out;
		if (xz_special4(ip->saddr) || xz_special4(ip->daddr)) {
			reason = XZ_FP_LOCAL;
			goto out;
		}
		/* What the kernel's reverse path filter may drop (counted in its
		 * IPReversePathFilter): the kernel's to decide. */
		if (rpf && xz_rp_refused(ctx, &fib, ip, from, rpf)) {
			reason = XZ_FP_RP_FILTER;
			goto out;
		}
		ttl = ip->ttl;
		fib.family = XZ_AF_INET;
		fib.ifindex = from;
		fib.tos = ip->tos;
		fib.l4_protocol = ip->protocol;
		/* checked against the egress MTU: the packet's length, or its segments' */
		fib.tot_len = seg_len ? seg_len : bpf_ntohs(ip->tot_len);
		fib.ipv4_src = ip->saddr;
		fib.ipv4_dst = ip->daddr;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		ip6 = (void *)(eth + 1);
		/* Hop-by-hop options are for every router on the way: the kernel's. */
		if ((void *)(ip6 + 1) > end || ip6->version != 6 || ip6->nexthdr == IPPROTO_HOPOPTS)
			goto out;
		if (xz_special6(&ip6->saddr) || xz_special6(&ip6->daddr)) {
			reason = XZ_FP_LOCAL;
			goto out;
		}
		ttl = ip6->hop_limit;
		fib.ifindex = from;
		tot = seg_len ? seg_len : sizeof(*ip6) + bpf_ntohs(ip6->payload_len);
		fib.family = XZ_AF_INET6;
		fib.flowinfo = *(__be32 *)ip6 & bpf_htonl(XZ_IPV6_FLOWINFO);
		fib.l4_protocol = ip6->nexthdr;
		fib.tot_len = tot > 0xffff ? 0xffff : tot;
		__builtin_memcpy(fib.ipv6_src, &ip6->saddr, 16);
		__builtin_memcpy(fib.ipv6_dst, &ip6->daddr, 16);
	} else {
		goto out;
	}

	rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
	/* The kernel's order: the route, then the TTL, then the MTU, then the neighbour. */
	if ((rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH ||
	     rc == BPF_FIB_LKUP_RET_FRAG_NEEDED) && ttl <= 1) {
		reason = XZ_FP_TTL;   /* the kernel answers: ICMP time exceeded */
		goto out;
	}
	switch (rc) {
	case BPF_FIB_LKUP_RET_SUCCESS:
		break;
	case BPF_FIB_LKUP_RET_NO_NEIGH:
		reason = XZ_FP_NO_NEIGH;   /* the kernel resolves it and sends the packet */
		goto out;
	case BPF_FIB_LKUP_RET_FRAG_NEEDED:
		reason = XZ_FP_MTU;   /* the kernel fragments, or answers: too big */
		goto out;
	case BPF_FIB_LKUP_RET_NOT_FWDED:
		reason = XZ_FP_LOCAL;   /* for the router (local, broadcast, multicast route) */
		goto out;
	case BPF_FIB_LKUP_RET_BLACKHOLE:
	case BPF_FIB_LKUP_RET_UNREACHABLE:
	case BPF_FIB_LKUP_RET_PROHIBIT:
		reason = XZ_FP_UNROUTABLE;   /* the kernel drops or answers unreachable */
		goto out;
	default:   /* forwarding off on ingress, lightweight tunnels, no source address */
		reason = XZ_FP_OTHER;
		goto out;
	}
	egress = fib.ifindex;
	/* A GRO aggregate's segments against the egress device's MTU too, as the kernel
	 * counts them (a tunnel's inner headers included). */
	if (hook == XZ_HOOK_TC && seg_len) {
		__u32 mtu = 0;

		if (bpf_check_mtu(ctx, egress, &mtu, 0, BPF_MTU_CHK_SEGS) !=
		    BPF_MTU_CHK_RET_SUCCESS) {
			reason = XZ_FP_MTU;
			goto out;
		}
	}
	/* Out where it came in (or where the kernel would say it came in): the kernel would
	 * also send an ICMP redirect. (One branch for both: a second one took xz_tc_access
	 * past the verifier's limit.) */
	same = (__u64)(egress ^ in_if) * (egress ^ from);
	asm volatile("" : "+r"(same));
	if (!same) {
		reason = XZ_FP_EGRESS;
		goto out;
	}
	if (hook == XZ_HOOK_XDP) {
		/* Not a router's interface (a VLAN device, a tunnel): not in the devmap. */
		if (!xz_fast_ifs.lookup(&egress)) {
			reason = XZ_FP_EGRESS;
			goto out;
		}
		if (xz_fast_ifs.redirect_map(egress, 0) != XDP_REDIRECT) {
			reason = XZ_FP_REDIRECT;   /* the entry went away meanwhile */
			goto out;
		}
		__builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
		__builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);
	} else {
		/* Any interface: the kernel's neighbour output writes the link header the
		 * egress needs (Ethernet, a VLAN tag, none for a tunnel) for the route's next
		 * hop, which the lookup left in the destination. (TC does not look at the
		 * devmap: with a TC program using it, 6.18 refused to load the XDP ones.) */
		struct bpf_redir_neigh nh = { .nh_family = fib.family };

		__builtin_memcpy(nh.ipv6_nh, fib.ipv6_dst, sizeof(nh.ipv6_nh));
		if (xz_redirect_neigh(egress, &nh, sizeof(nh), 0) != TC_ACT_REDIRECT) {
			reason = XZ_FP_REDIRECT;
			goto out;
		}
	}
	/* Committed: the packet leaves by the interface, its TTL as the kernel's would be. */
	if (ip)
		xz_ttl_dec(ip);
	else if (ip6)
		ip6->hop_limit--;
	xz_fast_count(XZ_FP_FORWARDED, len);
	return 1;
out:
	xz_fast_count(reason, len);
	return 0;
}

#endif /* XDPZOOT_FORWARD_H */
