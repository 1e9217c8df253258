// SPDX-License-Identifier: GPL-2.0
/* The traffic of bench_fwd.py, all in the kernel:
 *  gen   run by BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES in the generator's
 *        namespace; rewrites each frame (a 64-byte Eth/IPv4/TCP template) with a random
 *        source and destination and sends it with XDP_TX to the router.
 *  sink  on the sink's veth: counts and drops (a per-CPU counter, read by bench_fwd.py).
 *  pass  on the router's ingress veth when the router itself runs no XDP: native XDP_TX on
 *        a veth reaches the peer only when the peer runs XDP (it puts the veth in NAPI mode).
 * Live frames are not reset between runs and a page comes back from the router with its
 * Ethernet header and TTL rewritten, so gen writes every header byte of every frame. */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/tcp.h>

#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_ACK 0x10
#ifndef GEN_STATICS
#define GEN_STATICS 1024
#endif
#ifndef GEN_LISTED
#define GEN_LISTED 100000
#endif

#define MIX_FORWARD 0     /* TCP to 443, sources from pools and static hosts, unlisted dst,
			   * SYNs and ACKs as gen_cfg says */
#define MIX_DROP 1        /* half TCP to 25 from pools, half to addresses on the CSAM list */

struct gen_cfg {
	u32 mix;
	u32 pool_base;        /* first address of the pools, host order */
	u32 pool_span;        /* addresses in the pools (pools x 1024) */
	u32 n_static;         /* entries used in gen_static */
	u32 n_listed;         /* entries used in gen_listed */
	u32 syn_per_1024;     /* forward mix: frames in 1,024 that are SYNs (the rest ACKs) */
};

/* The generator paces itself: a test_run call costs tens of ms to set up, so calls are long
 * and a frame is sent only when its time has come (a frame whose time has not come is
 * dropped unsent: cheap, and counted in skipped). At most PACE_BURST frames catch up. */
#define PACE_BURST 64     /* one batch of the live test run */
struct gen_pace {
	u64 gap_ns;           /* 1e9 / rate; 0: unpaced (every frame is sent) */
	u64 next_ns;          /* when the next frame is due */
	u64 sent;             /* frames sent (XDP_TX) */
	u64 skipped;          /* iterations that sent nothing */
};

/* One entry, written by bench_fwd.py before each ladder. */
BPF_ARRAY(gen_cfg, struct gen_cfg, 1);
/* The first 56 bytes of the frame (Eth + IPv4 + TCP SYN and 2 of padding), written by
 * bench_fwd.py; gen copies them into every frame before it sets addresses, ports and (in
 * the forward mix) the TCP flags. */
#define TMPL_WORDS 7
struct gen_tmpl {
	u64 w[TMPL_WORDS];
};
BPF_ARRAY(gen_tmpl, struct gen_tmpl, 1);
/* One entry: written by bench_fwd.py (gap_ns, next_ns) and gen (next_ns and the counts);
 * gen runs on one CPU only (the test run's), so plain updates are enough. */
BPF_ARRAY(gen_pace, struct gen_pace, 1);
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
	struct gen_pace *p = gen_pace.lookup(&zero);
	struct gen_tmpl *tm = gen_tmpl.lookup(&zero);
	u64 *pw = data;
	u32 sum = 0;
	u64 now;

	if (!c || !p || !tm || data + sizeof(*tm) > end || !c->pool_span)
		return XDP_ABORTED;
	if (p->gap_ns) {
		now = bpf_ktime_get_ns();
		if (now < p->next_ns) {
			p->skipped++;
			return XDP_DROP;
		}
		p->next_ns += p->gap_ns;
		if (p->next_ns + PACE_BURST * p->gap_ns < now)
			p->next_ns = now - PACE_BURST * p->gap_ns;
	}
	p->sent++;
#pragma unroll
	for (int i = 0; i < TMPL_WORDS; i++)
		pw[i] = tm->w[i];
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
		/* A SYN opens a conversation (the scan sketch counts it), an ACK is a segment
		 * of an established one. */
		((u8 *)tcp)[13] = (bpf_get_prandom_u32() & 1023) < c->syn_per_1024 ?
				  TCP_FLAG_SYN : TCP_FLAG_ACK;
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
