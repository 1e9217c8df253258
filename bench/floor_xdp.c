// SPDX-License-Identifier: GPL-2.0
/* The floor of bench_fwd.py: what any XDP program costs the lab's router before it looks
 * anything up. It reads the frame's Ethernet type and IPv4 destination (the first touch of
 * the packet, which every router pays) and returns the verdict bench_fwd.py set for the mix
 * being run (floor_verdict: XDP_PASS for the forward mix, XDP_DROP for the drop mix, whose
 * every frame a router should drop), counting its drops. No lookup: no XDP program that
 * decides from tables can do better in this lab. Compiled by bcc. */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>

BPF_ARRAY(floor_verdict, u32, 1);
BPF_PERCPU_ARRAY(floor_drops, u64, 1);

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
	v = floor_verdict.lookup(&zero);
	if (!v || *v != XDP_DROP)
		return XDP_PASS;
	n = floor_drops.lookup(&zero);
	if (n)
		*n += 1;
	return XDP_DROP;
}
