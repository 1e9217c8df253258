// SPDX-License-Identifier: GPL-2.0
/* The reference router of bench_fwd.py: the least an XDP program can do for OP25B and the
 * CSAM list. Two LPM lookups a packet: the source in the subscriber trie (pools and static
 * hosts; the longest match says dynamic or not), the destination in the CSAM trie. No VLAN,
 * no IPv6, no counters beyond its drops: a floor to hold xdpzoot against, not a product.
 * Compiled by bcc; sizes come as -D flags. */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>

#ifndef REF_SUBS
#define REF_SUBS 65536
#endif
#ifndef REF_CSAM
#define REF_CSAM 1048576
#endif

struct ref_key {          /* the 8-byte LPM key of an IPv4 trie */
	u32 prefixlen;
	u32 addr;             /* network order */
};

/* Pools (value 1: dynamic) and static hosts (value 0) inside them; bench_fwd.py writes it. */
BPF_LPM_TRIE(ref_subs, struct ref_key, u8, REF_SUBS);
/* The CSAM list: addresses as /32, prefixes as they are; bench_fwd.py writes it. */
BPF_LPM_TRIE(ref_csam, struct ref_key, u8, REF_CSAM);
/* Drops by reason: 0 OP25B, 1 CSAM. */
BPF_PERCPU_ARRAY(ref_drops, u64, 2);

static __always_inline int drop(u32 reason)
{
	u64 *n = ref_drops.lookup(&reason);

	if (n)
		*n += 1;
	return XDP_DROP;
}

int ref(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);
	struct tcphdr *tcp;
	struct ref_key key = { .prefixlen = 32 };
	u8 *dynamic;

	/* Anything that is not a whole IPv4 header passes (fail open). */
	if ((void *)(ip + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	key.addr = ip->saddr;
	dynamic = ref_subs.lookup(&key);
	if (dynamic && *dynamic && ip->protocol == IPPROTO_TCP && ip->ihl >= 5) {
		tcp = (void *)ip + ip->ihl * 4;
		if ((void *)(tcp + 1) <= end && tcp->dest == bpf_htons(25))
			return drop(0);
	}
	key.addr = ip->daddr;
	if (ref_csam.lookup(&key))
		return drop(1);
	return XDP_PASS;
}
