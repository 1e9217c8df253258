// SPDX-License-Identifier: GPL-2.0
/*
 * ref_cold.c - the cold benchmark's reference: the least an IPv4 program must do
 * to apply OP25B and the CSAM list, and nothing else (no VLAN/PPPoE, no IPv6, no
 * counters, no rates, no control word). bench/bench_cold.py times it on the same
 * packets and with the same pools and list as the data plane: the ratio of the two
 * says what xdpzoot's generality costs per packet.
 *
 *   Ethernet + IPv4 -> source in a dynamic pool (LPM trie)? -> TCP :25: drop
 *                   -> destination on the list (LPM trie, hosts as /32)? drop
 *                   -> pass
 */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>

#ifndef REF_MAX_POOLS
#define REF_MAX_POOLS 65536
#endif
#ifndef REF_MAX_CSAM
#define REF_MAX_CSAM 2097152
#endif

/* 8-byte LPM key: prefix length, then the IPv4 address in network order. */
struct ref_key {
	__u32 prefixlen;
	__u32 addr;
};

/* Dynamic IPv4 pools (value unused); written by bench_cold.py. */
BPF_LPM_TRIE(ref_pools, struct ref_key, __u32, REF_MAX_POOLS);
/* The IPv4 part of the CSAM list, hosts as /32 (value unused); written by bench_cold.py. */
BPF_LPM_TRIE(ref_csam, struct ref_key, __u32, REF_MAX_CSAM);

int ref_cold(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);
	struct ref_key key = { .prefixlen = 32 };
	struct tcphdr *th;
	int dynamic;

	if ((void *)(ip + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	key.addr = ip->saddr;
	dynamic = ref_pools.lookup(&key) != NULL;   /* looked up for every packet */
	if (dynamic && ip->protocol == IPPROTO_TCP) {
		th = (void *)ip + (ip->ihl & 0xf) * 4;
		if ((void *)(th + 1) <= end && th->dest == bpf_htons(25))
			return XDP_DROP;
	}
	key.addr = ip->daddr;
	return ref_csam.lookup(&key) ? XDP_DROP : XDP_PASS;
}
