/* SPDX-License-Identifier: GPL-2.0 */
/*
 * maps.h - every map of xdpzoot, pinned under XZ_PIN_DIR so that programs can
 * be replaced and the controller restarted without losing state.
 * Writers: "cp" is the control plane (xdpzoot CLI / daemon), "dp" the programs.
 */
#ifndef XDPZOOT_MAPS_H
#define XDPZOOT_MAPS_H

#include "xdpzoot.h"

#ifndef XZ_PIN_DIR
#define XZ_PIN_DIR "/sys/fs/bpf/xdpzoot"
#endif

#define XZ_MAP(type, key, value, name, max, flags) \
	BPF_TABLE_PINNED(type, key, value, name, max, XZ_PIN_DIR "/" #name, flags)

/* Subscriber host addresses -> class. cp writes, dp reads. */
XZ_MAP("hash", struct xz_addr, struct xz_class, xz_hosts, XZ_MAX_HOSTS, 0);
/* Subscriber prefixes (dynamic pools, static blocks) -> class. cp writes. */
XZ_MAP("lpm_trie", struct xz_lpm_key, struct xz_class, xz_prefixes, XZ_MAX_PREFIXES,
       BPF_F_NO_PREALLOC);
/* RADIUS contracts: subscriber id -> the class their session entries get (slot, sticky
 * suspension, rates). cp writes and reads; no program uses it. Key 0 (no subscriber)
 * counts exact writes of xz_sub_dir in its sub_id. */
XZ_MAP("hash", __u32, struct xz_class, xz_contracts, XZ_MAX_SUBSCRIBERS, BPF_F_NO_PREALLOC);
/* Which /24s have host entries or prefixes (XZ_SUB_DIR_* bits). cp writes. */
XZ_MAP("array", __u32, struct xz_dir, xz_sub_dir, 1, 0);
/* IPv4 /24 -> index of its prefix's class in xz_uniform (struct xz_sub_idx). cp writes
 * (and reads and marks hosts through a mapping of its memory: no system call a session). */
XZ_MAP("array", __u32, struct xz_sub_idx, xz_sub_idx, (1 << 24) / XZ_IDX_LANES, BPF_F_MMAPABLE);
/* Classes of the prefixes xz_sub_idx points at, the same values as the trie's. cp writes. */
XZ_MAP("array", __u32, struct xz_class, xz_uniform, XZ_MAX_UNIFORM, 0);
/* /24s with a few host entries that xz_sub_idx points at (struct xz_sub_hosted). cp writes. */
XZ_MAP("array", __u32, struct xz_sub_hosted, xz_sub_hosted, XZ_MAX_HOSTED, BPF_F_MMAPABLE);
/* IPv6 host entries by /64 (struct xz_filter). cp writes, through a mapping of its memory. */
XZ_MAP("array", __u32, struct xz_filter, xz_sub_v6, 1, BPF_F_MMAPABLE);
/* The IPv6 entries of xz_prefixes again, by exact key (struct xz_lpm_key, masked). cp
 * writes (with every write of the trie). */
XZ_MAP("hash", struct xz_lpm_key, struct xz_class, xz_prefixes6, XZ_MAX_PREFIXES,
       BPF_F_NO_PREALLOC);
/* Which lengths xz_prefixes6 holds (struct xz_v6_lens), one entry. cp writes. */
XZ_MAP("array", __u32, struct xz_v6_lens, xz_sub_v6_lens, 1, 0);
/* Allow-lists (XZ_ALLOW_* bits, OR-ed down from covering prefixes). cp writes. */
XZ_MAP("lpm_trie", struct xz_lpm_key, __u32, xz_allow, XZ_MAX_ALLOW, BPF_F_NO_PREALLOC);
/*
 * CSAM list in two generations, exact addresses and prefixes (value: 1). cp
 * writes the idle generation, then flips xz_control.csam_gen: every packet
 * sees the whole old list or the whole new one. dp reads.
 */
/* Preallocated: inserts are twice as fast, and at 1M entries the memory is the same. */
XZ_MAP("hash", struct xz_addr, __u8, xz_csam_h0, XZ_MAX_CSAM_HOSTS, 0);
XZ_MAP("hash", struct xz_addr, __u8, xz_csam_h1, XZ_MAX_CSAM_HOSTS, 0);
XZ_MAP("lpm_trie", struct xz_lpm_key, __u8, xz_csam_p0, XZ_MAX_CSAM_PREFIXES,
       BPF_F_NO_PREALLOC);
XZ_MAP("lpm_trie", struct xz_lpm_key, __u8, xz_csam_p1, XZ_MAX_CSAM_PREFIXES,
       BPF_F_NO_PREALLOC);
/* The IPv4 exact addresses again, in lines (struct xz_csam_line), generation 0's then
 * generation 1's (index gen << XZ_CSAM_LINE_BITS | line). cp writes (through a mapping of
 * its memory), dp reads. */
XZ_MAP("array", __u32, struct xz_csam_line, xz_csam_l, 2 << XZ_CSAM_LINE_BITS, BPF_F_MMAPABLE);
/* The IPv4 prefixes again, in lines by their /24 (struct xz_csam_line), by
 * generation the same way (gen << XZ_CSAM_NET_BITS | line). cp writes (through a mapping),
 * dp reads. */
XZ_MAP("array", __u32, struct xz_csam_line, xz_csam_n, 2 << XZ_CSAM_NET_BITS, BPF_F_MMAPABLE);
/* By generation (index gen): its IPv6 filter (struct xz_filter) and its IPv4 /24 filter
 * (struct xz_filter4; its bits, words gen << XZ_CSAM_V4_BITS - 6 on, in xz_csam_b4), written
 * with it. cp writes (the bits through a mapping). */
XZ_MAP("array", __u32, struct xz_filter, xz_csam_f, 2, 0);
XZ_MAP("array", __u32, struct xz_filter4, xz_csam_f4, 2, 0);
XZ_MAP("array", __u32, __u64, xz_csam_b4, 2 * XZ_CSAM_V4_WORDS, BPF_F_MMAPABLE);
/* Per generation: digest, time and counts of the list (for status). cp writes. */
XZ_MAP("array", __u32, struct xz_csam_meta, xz_csam_meta, 2, 0);
/* CSAM hits by generation and family. dp writes. */
XZ_MAP("percpu_array", __u32, __u64, xz_csam_hits, XZ_NR_CSAM_HITS, 0);
/* Programs an entry point tail-calls, per hook: the reply (XZ_TAIL_REPLY) for a rejected
 * packet, the fast path (XZ_TAIL_FAST) for a passed one while it is on. cp writes. */
XZ_MAP("prog", __u32, __u32, xz_tail_xdp, 2, 0);
XZ_MAP("prog", __u32, __u32, xz_tail_tc, 2, 0);
/*
 * Per-subscriber rate limiter and volume, by xz_class.slot. dp writes, cp reads.
 * BPF_F_MMAPABLE for where the values lie, not to be mapped: such an array's values
 * start on a page, so that entry i is bytes 128 i.. of it, two whole cache lines (an
 * upstream packet reads the first for its direction and the second for the scan sketch).
 * A plain array's values start 312 bytes into its header's page (6.x): each entry then
 * straddles three lines, and an upstream SYN read all three.
 */
XZ_MAP("array", __u32, struct xz_state, xz_state, XZ_MAX_SUBSCRIBERS, BPF_F_MMAPABLE);
/* Throttles in force, by slot. cp writes. */
XZ_MAP("array", __u32, struct xz_throttle, xz_throttle, XZ_MAX_SUBSCRIBERS, 0);
/* Throttles set by hand, by slot: cp writes, the daemon reads. */
XZ_MAP("hash", __u32, struct xz_manual, xz_manual, 65536, BPF_F_NO_PREALLOC);
/* State of pool addresses without an owner, by address. dp writes, cp reads. */
XZ_MAP("lru_hash", struct xz_addr, struct xz_state, xz_pool_state, XZ_MAX_POOL_LRU, 0);
/* State of IPv4 pool addresses, by pool (xz_class.slot) and host bits: no hash, no insert.
 * dp writes, cp reads and clears a block before giving it to another pool. */
XZ_MAP("array", __u32, struct xz_state, xz_pool_addrs, XZ_MAX_POOL_ADDRS, BPF_F_MMAPABLE);
/* SMTP attempts OP25B blocked, per IPv4 pool address (struct xz_op25b), apart from the
 * state: 4 bytes, where the state takes 128, so that a spam bot's drop touches an array the
 * cache can hold (4 MiB for 1M addresses). dp adds, cp reads, and clears a block with the
 * state's (in place, mapped: a counter at a time, never its neighbours' value). */
XZ_MAP("array", __u32, struct xz_op25b, xz_pool_op25b,
       (XZ_MAX_POOL_ADDRS + XZ_OP25B_PER - 1) / XZ_OP25B_PER, BPF_F_MMAPABLE);
/* The SMTP attempts noted for it and not added yet (struct xz_op25b_batch), per CPU. dp
 * writes, cp reads. */
XZ_MAP("percpu_array", __u32, struct xz_op25b_batch, xz_op25b_noted, 1, 0);
/* Flows watched for bulk transfers while congestion mode is on. dp writes. */
XZ_MAP("lru_hash", struct xz_flow_key, struct xz_flow, xz_flows, XZ_MAX_FLOWS, 0);
/* Global switches, one entry. cp writes. */
XZ_MAP("array", __u32, struct xz_control, xz_control, 1, 0);
/* Per-CPU packet/byte counters by role, verdict and reason. dp writes. */
XZ_MAP("percpu_array", __u32, struct xz_counter, xz_counters, XZ_NR_COUNTERS, 0);

/*
 * Fast path egress interfaces: ifindex -> ifindex, the devmap bpf_redirect_map
 * sends into. cp writes at attach (the access and core interfaces). Spelled out
 * because bcc 0.26 has neither a hash devmap nor a pinned BPF_DEVMAP.
 */
struct xz_fast_ifs_table_t {
	__u32 key;
	__u32 leaf;
	__u32 *(*lookup)(__u32 *);
	__u64 (*redirect_map)(int, int);
	__u32 max_entries;
};
__attribute__((section("maps/devmap:" XZ_PIN_DIR "/xz_fast_ifs")))
struct xz_fast_ifs_table_t xz_fast_ifs = { .max_entries = XZ_MAX_IFINDEX };
/* The MAC addresses of each of the router's interfaces (struct xz_fast_mac), by ifindex: a
 * frame the fast path forwards is addressed to one of its ingress interface's. cp writes at
 * attach, with the devmap. */
XZ_MAP("array", __u32, struct xz_fast_mac, xz_fast_macs, XZ_MAX_IFINDEX, 0);
/* Fast path outcomes, per CPU, by XZ_FAST_REASONS. dp writes. */
XZ_MAP("percpu_array", __u32, struct xz_counter, xz_fast, XZ_NR_FAST, 0);

/*
 * Drop events (trace.h), read by `xdpzoot trace`. Spelled out like the devmap: bcc
 * has no pinned ring buffer; ``leaf`` gives bcc (and the layout tests) the event type.
 */
struct xz_trace_ring_table_t {
	int key;
	struct xz_trace_event leaf;
	void *(*ringbuf_reserve)(__u64);
	void (*ringbuf_submit)(void *, __u64);
	void (*ringbuf_discard)(void *, __u64);
	__u32 max_entries;
};
__attribute__((section("maps/ringbuf:" XZ_PIN_DIR "/xz_trace_ring")))
struct xz_trace_ring_table_t xz_trace_ring = { .max_entries = XZ_TRACE_RING_BYTES };
/* The events' rate limiter and lost count, one entry. dp writes, cp reads. */
XZ_MAP("array", __u32, struct xz_trace_state, xz_trace_state, 1, 0);

#endif /* XDPZOOT_MAPS_H */
