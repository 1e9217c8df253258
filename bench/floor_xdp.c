// SPDX-License-Identifier: GPL-2.0
/* The floor of bench_fwd.py: what any XDP program costs the lab's router before it looks
 * anything up. It reads the frame's Ethernet type and IPv4 destination (the first touch of
 * the packet, which every router pays) and returns the verdict bench_fwd.py set for the mix
 * being run (floor_verdict: XDP_PASS for the forward mix, XDP_DROP for the drop mix, whose
 * every frame a router should drop), counting its drops. No lookup: no XDP program that
 * decides from tables can do better in this lab. Compiled by bcc.
 *
 * With FLOOR_MISSES = k > 0 (bench_fwd's xdp-floor-miss<k>-<size>), it first reads k words of
 * an array of 2^FLOOR_MEM_BITS words, each at an index hashed from the destination and the
 * word before: k dependent reads at random, the least that a verdict which looks up k
 * structures of that size costs in this lab (the drop mix's destinations are spread). */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>

BPF_ARRAY(floor_verdict, u32, 1);
BPF_PERCPU_ARRAY(floor_drops, u64, 1);
#ifndef FLOOR_MISSES
#define FLOOR_MISSES 0
#endif
#if FLOOR_MISSES
#ifndef FLOOR_MEM_BITS
#define FLOOR_MEM_BITS 19
#endif
BPF_ARRAY(floor_mem, u64, 1 << FLOOR_MEM_BITS);
#endif

int floor_prog(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);
	u32 zero = 0, *v;
	u64 *n;

	if ((void *)(ip + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP) || !ip->daddr)
		return XDP_PASS;
#if FLOOR_MISSES
	u64 w = ip->daddr, *m;
	u32 i;

#pragma unroll
	for (int k = 0; k < FLOOR_MISSES; k++) {
		i = (u32)((w * 0x9E3779B97F4A7C15ULL) >> (64 - FLOOR_MEM_BITS));
		m = floor_mem.lookup(&i);
		if (!m)
			return XDP_PASS;
		w ^= *m + k + 1;
	}
	if (w == 0)   /* never (the words are 0): keeps the loads */
		return XDP_PASS;
#endif
#ifdef FLOOR_SPIN
	u64 x = ip->daddr | 1;

#pragma unroll
	for (int k = 0; k < FLOOR_SPIN; k++) {
		x = x * 0x9E3779B97F4A7C15ULL + k;
		asm volatile("" : "+r"(x));
	}
	if (x == 0)
		return XDP_PASS;
#endif
#ifdef FLOOR_CODE
	u64 a = ip->daddr, b = a + 1, c = a + 2, d = a + 3;

#pragma unroll
	for (int k = 0; k < FLOOR_CODE; k++) {
		a = (a ^ (a >> 3)) + k;
		b = (b ^ (b << 5)) + k;
		c = (c ^ (c >> 7)) + k;
		d = (d ^ (d << 9)) + k;
		asm volatile("" : "+r"(a), "+r"(b), "+r"(c), "+r"(d));
	}
	if ((a ^ b ^ c ^ d) == 1)
		return XDP_PASS;
#endif
	v = floor_verdict.lookup(&zero);
	if (!v || *v != XDP_DROP)
		return XDP_PASS;
	n = floor_drops.lookup(&zero);
	if (n)
		*n += 1;
	return XDP_DROP;
}
