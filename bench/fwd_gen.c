// SPDX-License-Identifier: GPL-2.0
/* The traffic of bench_fwd.py, all in the kernel:
 *  gen   run by BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES in the generator's
 *        namespace; rewrites each frame (a 64-byte Eth/IPv4/TCP template) with a random
 *        source and destination and sends it with XDP_TX to the router.
 *  sink  on the sink's veth: counts and drops (a per-CPU counter, read by bench_fwd.py).
 *  pass  on the router's ingress veth when the router itself runs no XDP: native XDP_TX on
 *        a veth reaches the peer only when the peer runs XDP (it puts the veth in NAPI mode).
 * Live frames are not reset between runs, so gen writes every field it varies each time. */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/tcp.h>

#ifndef GEN_STATICS
#define GEN_STATICS 1024
#endif
#ifndef GEN_LISTED
#define GEN_LISTED 100000
#endif

#define MIX_FORWARD 0     /* TCP to 443, sources from pools and static hosts, unlisted dst */
#define MIX_DROP 1        /* half TCP to 25 from pools, half to addresses on the CSAM list */

struct gen_cfg {
	u32 mix;
	u32 pool_base;        /* first address of the pools, host order */
	u32 pool_span;        /* addresses in the pools (pools x 1024) */
	u32 n_static;         /* entries used in gen_static */
	u32 n_listed;         /* entries used in gen_listed */
};

/* One entry, written by bench_fwd.py before each ladder. */
BPF_ARRAY(gen_cfg, struct gen_cfg, 1);
/* Static host addresses (network order), written by bench_fwd.py. */
BPF_ARRAY(gen_static, u32, GEN_STATICS);
/* One address inside each CSAM list entry (network order), written by bench_fwd.py. */
BPF_ARRAY(gen_listed, u32, GEN_LISTED);
/* Frames the sink saw, per CPU; slot 0. */
BPF_PERCPU_ARRAY(sink_count, u64, 1);

/* A random destination in unicast space that the router sends to the sink: first octet
 * 1..223, without 100 (the pools), 127, 192, 198, 203 (the links' test nets). */
static __always_inline u32 random_dst(void)
{
	u32 r = bpf_get_prandom_u32();
	u32 first = (r >> 24) % 223 + 1;

	if (first == 100 || first == 127 || first == 192 || first == 198 || first == 203)
		first = 45;
	return (first << 24) | (r & 0xffffff);
}

int gen(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct iphdr *ip = data + sizeof(struct ethhdr);
	struct tcphdr *tcp = (void *)(ip + 1);
	u32 zero = 0, r = bpf_get_prandom_u32(), src, dst;
	u16 dport = 443, *w = (void *)ip;
	u32 idx, *v;
	struct gen_cfg *c = gen_cfg.lookup(&zero);
	u32 sum = 0;

	if (!c || (void *)(tcp + 1) > end || !c->pool_span)
		return XDP_ABORTED;
	src = bpf_htonl(c->pool_base + bpf_get_prandom_u32() % c->pool_span);
	if (c->mix == MIX_DROP) {
		if (r & 1) {
			dport = 25;
			dst = bpf_htonl(random_dst());
		} else {
			idx = c->n_listed ? (r >> 1) % c->n_listed : 0;
			v = gen_listed.lookup(&idx);
			dst = v ? *v : 0;
		}
	} else {
		if ((r & 7) == 0 && c->n_static) {   /* one frame in 8 from a static host */
			idx = (r >> 3) % c->n_static;
			v = gen_static.lookup(&idx);
			if (v)
				src = *v;
		}
		dst = bpf_htonl(random_dst());
	}
	ip->saddr = src;
	ip->daddr = dst;
	ip->check = 0;
	tcp->dest = bpf_htons(dport);
	tcp->source = bpf_htons(1024 + (r >> 22));
#pragma unroll
	for (int i = 0; i < (int)(sizeof(*ip) / 2); i++)
		sum += w[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	ip->check = ~sum & 0xffff;
	return XDP_TX;
}

int sink(struct xdp_md *ctx)
{
	u32 zero = 0;
	u64 *n = sink_count.lookup(&zero);

	if (n)
		*n += 1;
	return XDP_DROP;
}

int pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}
