/* SPDX-License-Identifier: GPL-2.0 */
/*
 * trace.h - sampled drop events for `xdpzoot trace`, made at the pipeline's one
 * exit (policy.h), for both hooks.
 *
 * Off unless a trace runs: the control plane sets XZ_C_TRACE with a lease
 * (xz_control.trace_until) that the running trace renews every second, so one
 * that died stops making events within seconds. The events' rate is held by a
 * GCRA on one global word: a drop that finds the bucket empty only reads it, and
 * it is written at most trace_rate times a second, so a flood of drops on every
 * CPU shares one cache line without bouncing it. A full ring buffer loses the
 * event (counted in xz_trace_state.lost), never the packet.
 */
#ifndef XDPZOOT_TRACE_H
#define XDPZOOT_TRACE_H

#include "xdpzoot.h"
#include "maps.h"
#include "parse.h"

#define XZ_TRACE_BURST_NS 100000000ULL   /* 100 ms of the rate at once */
#define XZ_SEC_NS 1000000000ULL

/*
 * May this drop become an event? Its reason is asked for, the bucket has a token and
 * the lease runs. Returns the time (bpf_ktime_get_ns) for the event, 0 for none. The
 * clock of the bucket is the jiffies counter where attach timed its tick (an inlined
 * load: a flood of drops pays no clock read); the lease, on the fine clock, is read
 * only by a drop that got a token.
 */
static __always_inline __u64 xz_trace_take(struct xz_control *ctl, int reason)
{
	__u32 zero = 0, rate = ctl->trace_rate;
	struct xz_trace_state *s;
	__u64 now, old, base, ts;

	if (!((ctl->trace_reasons >> (reason & 31)) & 1) || !rate)
		return 0;
	s = xz_trace_state.lookup(&zero);
	if (!s)
		return 0;
	now = ctl->tick_ns ? bpf_jiffies64() * ctl->tick_ns : bpf_ktime_get_ns();
	old = *(volatile __u64 *)&s->tat;
	/* Further ahead than a burst and the slowest event can put it: set on the other
	 * clock (tick_ns was 0 then), so start afresh. */
	base = old > now && old - now <= XZ_TRACE_BURST_NS + XZ_SEC_NS ? old : now;
	if (base - now > XZ_TRACE_BURST_NS)
		return 0;
	/* One try: a CPU that loses the race to another makes no event (one less, never
	 * one more than the rate). */
	if (__sync_val_compare_and_swap(&s->tat, old, base + XZ_SEC_NS / rate) != old)
		return 0;
	ts = bpf_ktime_get_ns();
	return ts / XZ_SEC_NS < ctl->trace_until ? ts : 0;
}

/* The event of a drop that xz_trace_take let through, into the ring buffer. */
static __always_inline void xz_trace_emit(struct xz_pkt *p, __u64 ts, __u32 flags,
					  const int role, int verdict, int reason,
					  struct xz_class *cls)
{
	struct xz_trace_event *e = xz_trace_ring.ringbuf_reserve(sizeof(*e));
	struct xz_trace_state *s;
	__u32 zero = 0;

	if (!e) {   /* full: nobody reads, or not fast enough */
		s = xz_trace_state.lookup(&zero);
		if (s)
			__sync_fetch_and_add(&s->lost, 1);
		return;
	}
	e->ts = ts;
	e->sub_id = cls ? cls->sub_id : 0;
	e->reason = reason;
	e->verdict = verdict;
	e->role = role;
	e->hook = p->hook;
	e->family = p->family;
	e->proto = p->proto;
	e->sport = p->l4ok ? p->sport : 0;
	e->dport = p->l4ok ? p->dport : 0;
	e->_pad[0] = e->_pad[1] = 0;
	if (flags & XZ_C_TRACE_ADDRS) {
		__builtin_memcpy(&e->src, &p->src, sizeof(e->src));
		__builtin_memcpy(&e->dst, &p->dst, sizeof(e->dst));
	} else {
		__builtin_memset(&e->src, 0, sizeof(e->src));
		__builtin_memset(&e->dst, 0, sizeof(e->dst));
	}
	xz_trace_ring.ringbuf_submit(e, 0);
}

#endif /* XDPZOOT_TRACE_H */
