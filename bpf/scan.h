/* SPDX-License-Identifier: GPL-2.0 */
/*
 * scan.h - the scan signal: an estimate of how many distinct destinations
 * (address, port, protocol) a subscriber opens conversations to per window,
 * in its state slot (struct xz_scan), without keeping any destination.
 *
 * A conversation is opened by a TCP SYN without ACK, an ICMP / ICMPv6 echo
 * request (port 0: a ping sweep is a scan too) and any UDP packet: UDP has no
 * opening packet, and a sketch counts a destination once however often it is
 * seen, so every datagram may go in. Other packets do not touch the sketch.
 *
 * The sketch is a HyperLogLog of XZ_SCAN_REGS 4-bit registers: a destination's
 * 64-bit hash picks a register and a rank (1 + the leading zeros of its low 32
 * bits, at most XZ_SCAN_RMAX); a register keeps the highest rank it saw. It is
 * read with the martingale (HIP) estimator: when a destination raises a
 * register, it was new, and it stands for 1/P destinations, P being the chance
 * that a new one raises a register, which the registers say exactly (register
 * r is raised by a new destination with chance 2^-r / XZ_SCAN_REGS). The count
 * sums these in fixed point. Duplicates raise nothing and cost a hash and a load.
 *
 * Windows: xz_control.scan_epoch names the window in force (the control plane
 * moves it); a sketch of another window is zeroed by its next update (its
 * count at once, with the window; its registers just after).
 * Registers change by compare-and-swap, so that CPUs sharing a subscriber
 * count each raise once; a destination may be lost where a window starts.
 */
#ifndef XDPZOOT_SCAN_H
#define XDPZOOT_SCAN_H

#include "xdpzoot.h"
#include "parse.h"
#include "reply.h"

#define XZ_SCAN_TRIES 4   /* compare-and-swap retries under contention; then given up */
#define XZ_SCAN_FULL (0xf0000000ULL << XZ_SCAN_EST_SHIFT)   /* an estimate no longer raised */
/* The count a raise adds is 1/P destinations, P = q / XZ_SCAN_ONE (rounded: truncated, the
 * estimate of a few destinations came out 3% low). */
#define XZ_SCAN_ONE ((__u64)XZ_SCAN_REGS << (XZ_SCAN_RMAX + XZ_SCAN_FRAC))

/* Does this packet (from a subscriber) open a conversation? */
static __always_inline int xz_scan_opens(struct xz_pkt *p)
{
	if (!p->l4ok)
		return 0;   /* no ports: a later fragment, a header cut short */
	if (p->proto == IPPROTO_TCP)
		return (p->tcp_flags & (XZ_TCP_SYN | XZ_TCP_ACK | XZ_TCP_RST)) == XZ_TCP_SYN;
	if (p->proto == IPPROTO_UDP)
		return 1;
	return (p->proto == IPPROTO_ICMP && p->icmp_type == ICMP_ECHO) ||
	       (p->proto == IPPROTO_ICMPV6 && p->icmp_type == ICMPV6_ECHO_REQUEST);
}

/* murmur3's 64-bit finaliser: a bijection that spreads every input bit. */
static __always_inline __u64 xz_mix64(__u64 x)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdULL;
	x ^= x >> 33;
	x *= 0xc4ceb9fe1a85ec53ULL;
	x ^= x >> 33;
	return x;
}

/* The destination's hash in window ``epoch``: its 16-byte address (native-endian words a,
 * b), port and protocol. For IPv4, a is 0 and b holds the address above 24 bits that are
 * 0x00ff0000 in every mapped address, so b ^ (port, protocol) is one-to-one and no two IPv4
 * destinations share a hash; an IPv6 /64 prefix (a) is scrambled by a multiply. The window
 * salts it: the estimate's error for a set of destinations is drawn anew in every window
 * instead of sticking to a subscriber. */
static __always_inline __u64 xz_scan_hash(struct xz_pkt *p, __u32 epoch)
{
	__u64 a, b;

	__builtin_memcpy(&a, &p->dst.addr[0], 8);
	__builtin_memcpy(&b, &p->dst.addr[8], 8);
	return xz_mix64((a ^ epoch) * 0x9e3779b97f4a7c15ULL ^ b ^
			((__u64)p->dport << 8 | p->proto));
}

/* A new destination's chance to raise the registers of one word, x 2^XZ_SCAN_RMAX x 16:
 * 2^(RMAX - r) for each register r below RMAX (one at RMAX cannot be raised). With RMAX =
 * 15 that is 0x8000 >> r with the lowest bit cleared: 1 for r = 15 becomes 0, every other
 * weight is even. */
static __always_inline __u32 xz_scan_weight(__u64 w)
{
	__u32 q = 0;

#pragma unroll
	for (int j = 0; j < 16; j++, w >>= 4)
		q += ((1U << XZ_SCAN_RMAX) >> (w & 15)) & ~1U;
	return q;
}
_Static_assert(XZ_SCAN_RMAX == 15, "xz_scan_weight: 4-bit registers, 15 the highest rank");

/* 1 + the leading zeros of ``low``, at most XZ_SCAN_RMAX: a binary search. */
static __always_inline __u32 xz_scan_rank(__u32 low)
{
	__u32 rank = 1;

	if (!(low >> 24)) {
		rank += 8;
		low <<= 8;
	}
	if (!(low >> 28)) {
		rank += 4;
		low <<= 4;
	}
	if (!(low >> 30)) {
		rank += 2;
		low <<= 2;
	}
	if (!(low >> 31))
		rank += 1;
	return rank < XZ_SCAN_RMAX ? rank : XZ_SCAN_RMAX;
}

/* Count the destination of packet ``p`` in sketch ``s`` for window ``epoch``. */
static __always_inline void xz_scan_count(struct xz_pkt *p, struct xz_scan *s, __u32 epoch)
{
	__u64 h = xz_scan_hash(p, epoch), old, seen = s->count;
	/* The high half picks the register, the low half's leading zeros make the rank. */
	__u32 idx = ((h >> 32) * XZ_SCAN_REGS) >> 32, low = (__u32)h, rank, q, r;
	__u32 wi = idx >> 4, shift = (idx & 15) * 4;

	if (wi >= XZ_SCAN_WORDS)
		return;   /* cannot be (idx < XZ_SCAN_REGS); for the verifier */
	if ((__u32)seen != epoch && __sync_val_compare_and_swap(&s->count, seen, epoch) == seen) {
		/* The first update of a new window: the old one's count is gone. */
#pragma unroll
		for (int i = 0; i < XZ_SCAN_WORDS; i++)
			s->reg[i] = 0;
	}
#pragma unroll
	for (int t = 0; t < XZ_SCAN_TRIES; t++) {
		old = *(volatile __u64 *)&s->reg[wi];
		r = (old >> shift) & 15;
		/* Not higher than the register (rank <= r, the rank not computed: a one among
		 * the top r bits): seen before, or a destination as rare. The common case. */
		if (r == XZ_SCAN_RMAX || (r && low >> (32 - r)))
			return;
		rank = xz_scan_rank(low);
		/* The chance of a raise as the registers are now (one changed meanwhile: the
		 * compare-and-swap below fails). */
		q = 0;
		for (int i = 0; i < XZ_SCAN_WORDS; i++)
			q += xz_scan_weight(s->reg[i]);
		if (__sync_val_compare_and_swap(&s->reg[wi], old,
						(old & ~(15ULL << shift)) | ((__u64)rank << shift)) == old) {
			if (s->count < XZ_SCAN_FULL)   /* saturate, never wrap */
				__sync_fetch_and_add(&s->count, (XZ_SCAN_ONE + q / 2) / q <<
						     XZ_SCAN_EST_SHIFT);
			return;
		}
	}
}

#endif /* XDPZOOT_SCAN_H */
