// SPDX-License-Identifier: GPL-2.0
/*
 * xdpzoot.c - thin entry points: one per hook (XDP, TC clsact ingress) and
 * interface role (access, core). Each adapts its context to struct xz_pkt,
 * runs the one pipeline and maps the verdict to the hook's return code; a
 * passed packet then takes the fast path (forward.h) when it is on.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include "xdpzoot.h"
#include "maps.h"
#include "parse.h"
#include "policy.h"
#include "reply.h"
#include "forward.h"

/* Headers a TC program must see in the linear area (QinQ+PPPoE+IPv6+ext+TCP). */
#define XZ_TC_PULL 256

static __always_inline int xz_xdp(struct xdp_md *ctx, const int role)
{
	struct xz_pkt p = {};

	p.data = (void *)(long)ctx->data;
	p.end = (void *)(long)ctx->data_end;
	p.len = p.end - p.data;
	p.segs = 1;
	p.hook = XZ_HOOK_XDP;
	switch (xz_pipeline(&p, role)) {
	case XZ_V_DROP:
		return XDP_DROP;
	case XZ_V_REJECT:
		xz_tail_xdp.call(ctx, XZ_TAIL_REPLY);
		return XDP_DROP;   /* no reply program: drop */
	}
	/* XDP_PASS unless the fast path is on and can forward */
	if (xz_fast_on())
		xz_tail_xdp.call(ctx, XZ_TAIL_FAST);
	return XDP_PASS;
}

static __always_inline int xz_tc(struct __sk_buff *skb, const int role)
{
	struct xz_pkt p = {};

	/* GRO packets may keep headers outside the linear area: pull them in. */
	if ((void *)(long)skb->data + XZ_TC_PULL > (void *)(long)skb->data_end)
		bpf_skb_pull_data(skb, skb->len < XZ_TC_PULL ? skb->len : XZ_TC_PULL);
	p.data = (void *)(long)skb->data;
	p.end = (void *)(long)skb->data_end;
	p.len = skb->len;
	p.segs = skb->gso_segs > 1 && skb->gso_segs < 0xffff ? skb->gso_segs : 1;
	p.hook = XZ_HOOK_TC;
	switch (xz_pipeline(&p, role)) {
	case XZ_V_DROP:
		return TC_ACT_SHOT;
	case XZ_V_REJECT:
		xz_tail_tc.call(skb, XZ_TAIL_REPLY);
		return TC_ACT_SHOT;   /* no reply program: drop */
	}
	/* TC_ACT_OK unless the fast path is on and can forward; it is told (cb[0]) the IP
	 * length of a GRO aggregate's segments, for one of TCP or UDP (its L3 and L4 headers
	 * and gso_size) */
	if (xz_fast_on()) {
		skb->cb[0] = p.segs == 1 ? 0 : p.l4ok && skb->gso_size &&
			     (p.proto == IPPROTO_TCP || p.proto == IPPROTO_UDP) ?
			     p.ip_len - p.l4_len + p.l4_hlen + skb->gso_size : XZ_SEG_UNKNOWN;
		xz_tail_tc.call(skb, XZ_TAIL_FAST);
	}
	return TC_ACT_OK;
}

int xz_xdp_access(struct xdp_md *ctx)
{
	return xz_xdp(ctx, XZ_ROLE_ACCESS);
}

int xz_xdp_core(struct xdp_md *ctx)
{
	return xz_xdp(ctx, XZ_ROLE_CORE);
}

int xz_tc_access(struct __sk_buff *skb)
{
	return xz_tc(skb, XZ_ROLE_ACCESS);
}

int xz_tc_core(struct __sk_buff *skb)
{
	return xz_tc(skb, XZ_ROLE_CORE);
}

/*
 * The fast path (forward.h), tail-called for a packet the pipeline passed while it is on: a
 * program of its own, so that the verifier walks it once, not once for each way through
 * the pipeline (inlined, it took xz_tc_access to 99% of the verifier's million).
 */
int xz_xdp_fast(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;

	return xz_fast_forward(ctx, data, end, end - data, ctx->ingress_ifindex, 0,
			       XZ_HOOK_XDP) ? XDP_REDIRECT : XDP_PASS;
}

int xz_tc_fast(struct __sk_buff *skb)
{
	return xz_fast_forward(skb, (void *)(long)skb->data, (void *)(long)skb->data_end,
			       skb->len, skb->ingress_ifindex, skb->cb[0], XZ_HOOK_TC) ?
	       TC_ACT_REDIRECT : TC_ACT_OK;
}

/*
 * Reply programs, tail-called for a rejected packet: parse it again, build the
 * answer (reply.h) and send it back. Apart from the pipeline, so that the
 * verifier checks the answer's construction once, not on every pipeline path.
 */
int xz_xdp_reply(struct xdp_md *ctx)
{
	struct xz_pkt p = {};
	struct xz_reply r = {};

	p.data = (void *)(long)ctx->data;
	p.end = (void *)(long)ctx->data_end;
	p.len = p.end - p.data;
	if (parse_frame(&p) < 0 || xz_reply_prepare(&p, &r) < 0)
		return XDP_DROP;
	/* Grow at the head (XDP keeps headroom; tailroom may be none), shrink at the tail. */
	if (r.len > p.len ? bpf_xdp_adjust_head(ctx, (int)p.len - (int)r.len) :
	    bpf_xdp_adjust_tail(ctx, (int)r.len - (int)p.len))
		return XDP_DROP;
	if (xz_reply_write((void *)(long)ctx->data, (void *)(long)ctx->data_end, &r) < 0)
		return XDP_DROP;
	return XDP_TX;
}

int xz_tc_reply(struct __sk_buff *skb)
{
	struct xz_pkt p = {};
	struct xz_reply r = {};

	p.data = (void *)(long)skb->data;
	p.end = (void *)(long)skb->data_end;
	p.len = skb->len;
	if (parse_frame(&p) < 0 || xz_reply_prepare(&p, &r) < 0 ||
	    bpf_skb_change_tail(skb, r.len, 0))
		return TC_ACT_SHOT;
	if (xz_reply_write((void *)(long)skb->data, (void *)(long)skb->data_end, &r) < 0)
		return TC_ACT_SHOT;
	return bpf_redirect(skb->ifindex, 0);
}

/* The benchmark's floor: an empty program compiled the same way. */
int xz_xdp_empty(struct xdp_md *ctx)
{
	return XDP_PASS;
}
