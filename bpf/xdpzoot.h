/* SPDX-License-Identifier: GPL-2.0 */
/*
 * xdpzoot.h - the one truth shared by the BPF programs and the control plane:
 * every struct used as a map key or value, every flag, the verdict and reason
 * lists and the size constants. Python takes its ctypes types from bcc's
 * Key/Leaf of the compiled tables and the reason names from XZ_REASONS below;
 * nothing here is re-declared elsewhere.
 */
#ifndef XDPZOOT_H
#define XDPZOOT_H

/* Sizes: defaults here, overridden with -D from the config ([limits]). */
#ifndef XZ_MAX_HOSTS
#define XZ_MAX_HOSTS 262144     /* exact subscriber addresses (hash) */
#endif
#ifndef XZ_MAX_PREFIXES
#define XZ_MAX_PREFIXES 65536   /* pools and static blocks (LPM trie) */
#endif
#ifndef XZ_MAX_ALLOW
#define XZ_MAX_ALLOW 4096       /* OP25B relay + support allow-list prefixes */
#endif
#ifndef XZ_MAX_CSAM_HOSTS
#define XZ_MAX_CSAM_HOSTS 1048576 /* CSAM list exact addresses, per generation */
#endif
#ifndef XZ_MAX_CSAM_PREFIXES
#define XZ_MAX_CSAM_PREFIXES 262144 /* CSAM list prefixes, per generation */
#endif
#ifndef XZ_MAX_SUBSCRIBERS
#define XZ_MAX_SUBSCRIBERS 1048576 /* per-subscriber state slots (rates, volume) */
#endif
#ifndef XZ_MAX_POOL_ADDRS
#define XZ_MAX_POOL_ADDRS 262144   /* state of IPv4 pool addresses, indexed (array) */
#endif
#ifndef XZ_MAX_POOL_LRU
#define XZ_MAX_POOL_LRU 65536      /* state of other pool addresses (IPv6; overflow): LRU */
#endif
#define XZ_POOL_MAX_BITS 16        /* indexed pools: /16 (IPv4) or longer */
#ifndef XZ_MAX_FLOWS
#define XZ_MAX_FLOWS 262144        /* flows watched for bulk transfers (LRU) */
#endif
#ifndef XZ_MAX_VLAN
#define XZ_MAX_VLAN 2           /* 802.1Q / 802.1ad tags walked (QinQ) */
#endif
#ifndef XZ_MAX_EXTHDR
#define XZ_MAX_EXTHDR 6         /* IPv6 extension headers walked */
#endif

/*
 * Addresses are 16 bytes everywhere: IPv6 as is, IPv4 mapped into
 * ::ffff:a.b.c.d, so one hash and one trie serve both families.
 * LPM key: prefixlen counts bits of the 16-byte address (IPv4 /n is 96+n).
 */
struct xz_lpm_key {
	__u32 prefixlen;
	__u8 addr[16];
};

struct xz_addr {
	__u8 addr[16];
};

/*
 * The subscribers' IPv4 directory: 2 bits for each of the 2^24 IPv4 /24s, in one array
 * entry, that say which lookups can find anything for an address of that /24, so that
 * a packet to a random destination costs one load of a byte instead of a walk
 * of a hash and a trie that miss the cache at every step. A directory of zeros
 * says "look everything up": a fresh or stale one is never wrong, only slower.
 * Byte i >> 2, bits (i & 3) * 2 hold the state of /24 number i (addr >> 8).
 */
#define XZ_DIR_BYTES (1 << 22)     /* 2^24 /24s x 2 bits */
struct xz_dir {
	__u8 b[XZ_DIR_BYTES];
};
/*
 * The subscribers' class index: for each IPv4 /24 a lane, 0 ("look it up"), or the index
 * in xz_uniform of the class of the IPv4 prefix of /8../24 that covers the /24 whole with
 * no host entry and no longer prefix in it. A pool address's class is then two loads of
 * small, hot arrays instead of a walk of the trie. Eight lanes to an array entry (16
 * bytes: an array's value is a multiple of 8 bytes), 2^21 entries, 32 MiB. Index 0 names
 * no class: the control plane keeps its counts there (dirs.py says how it is kept true).
 */
#define XZ_IDX_LANES 8
struct xz_sub_idx {
	__u16 e[XZ_IDX_LANES];
};
#ifndef XZ_MAX_UNIFORM
#define XZ_MAX_UNIFORM 16384       /* classes a /24 can point at (index 0: the counts) */
#endif
/*
 * A /24 that its prefix covers whole but for a few host entries (static hosts in a pool,
 * RADIUS sessions): its lane is XZ_IDX_HOSTED | n, and entry n of xz_sub_hosted, one
 * cache line, says which /24 it is for, the class's index in xz_uniform, and which of its
 * addresses have a host entry (those are looked up; the others have the class). Index 0
 * names no /24: the control plane keeps its counts there.
 */
#define XZ_IDX_HOSTED 0x8000
#ifndef XZ_MAX_HOSTED
#define XZ_MAX_HOSTED 32768        /* /24s with hosts the index answers for (2 MiB) */
#endif
struct xz_sub_hosted {
	__u64 bits[4];     /* bit b of word w: address w * 64 + b of the /24 is a host entry */
	__u32 slash;       /* the /24 (an address's top 24 bits) */
	__u32 idx;         /* the class of the others, in xz_uniform */
	__u64 _pad[3];     /* one cache line */
};
/*
 * A filter: bit h of ``bits`` is set where an entry may lie whose key hashes to h; a clear
 * bit says that nothing lies there: no lookup. The hash: the key as a native word, AND
 * ``mask``, times XZ_FILTER_MUL, the top XZ_FILTER_BITS bits. on = 0: not exact (never
 * written, or a change it could not follow): look everything up. Three kinds:
 * - IPv6 (the key: an address's first 8 bytes; ``mask``: its first ``plen`` bits, plen at
 *   most 64, in memory order; an entry covering an address has the same first ``plen``
 *   bits): the CSAM list's, per generation (plen: its shortest IPv6 entry), and the
 *   subscribers' host entries' (plen 64; a bit set before its entry is written);
 * - the CSAM list's IPv4 /24s: struct xz_filter4, below.
 */
#define XZ_FILTER_BITS 20          /* 2^20 bits, 128 KiB */
#define XZ_FILTER_MUL 0x9e3779b97f4a7c15ULL
struct xz_filter {
	__u32 on;
	__u32 plen;
	__u64 mask;
	__u64 bits[1 << (XZ_FILTER_BITS - 6)];
};
/*
 * The CSAM list's IPv4 filter, per generation: a bit for every /24 that an entry lies in
 * or covers, in front of its lines; the key, the /24 number (an address's top 24 bits).
 * Bit ((key * mul) mod 2^64 >> shift) mod 2^24, in one of two ways by the list's size:
 * - hashed (mul XZ_FILTER_MUL, shift 64 - XZ_FILTER_BITS): the first 2^20 bits, 128 KiB
 *   that stay in the CPU's cache where a random destination's line misses it (and its
 *   page's TLB entry); while the list touches at most 2^20 /24s;
 * - exact (mul 1, shift 0): a bit per /24, 2 MiB, for a list that touches more: hashed,
 *   its bits would be mostly ones (the lines read for most destinations: 1.97x the time
 *   of a small list's per unlisted destination in bench_lists, 2026-12-05).
 * on = 0: look everything up (never written). The bits lie apart (xz_csam_b4, a word an
 * entry): bcc writes a map's value type out as a format of every element, and a 2 MiB
 * value took its compile from 6 s to 22.
 */
#define XZ_CSAM_V4_BITS 24
#define XZ_CSAM_V4_WORDS (1 << (XZ_CSAM_V4_BITS - 6))
struct xz_filter4 {
	__u32 on;
	__u32 shift;
	__u64 mul;
};
/*
 * IPv6 subscriber prefixes, also in a hash by length (xz_prefixes6, the trie's keys and
 * values): a source is looked up at each length present, longest first, one probe each,
 * where the trie's walk misses the cache at every level. len[]: the lengths (1..128)
 * present, longest first, 0 after the last; all 0 (none, or more than XZ_V6_LENS): the
 * trie answers. A length may stay after its last prefix goes (a probe that finds
 * nothing), until a sync (kernel.Maps.sync_uniform: every load) writes them exact.
 */
#define XZ_V6_LENS 8
struct xz_v6_lens {
	__u8 len[XZ_V6_LENS];
};
/*
 * The CSAM list's IPv4 exact addresses, per generation, also in lines of one cache line:
 * address a (its four bytes as a native word, network order in memory) lies in line
 * (a * XZ_CSAM_HASH) mod 2^32 >> (32 - b) of the generation's first 2^b lines (b, at most
 * XZ_CSAM_LINE_BITS, in the control word, by the list's size): one miss where the hash takes
 * two (its bucket, then its element). The hash stays whole: a line's ``more`` counts the
 * addresses that belong to it but did not fit (and 0.0.0.0, which a free slot would
 * match), so that only that line's lookups go on to the hash. The control word says
 * whether the generation in force has its lines (XZ_CSAM_LINED).
 */
#ifndef XZ_CSAM_LINE_BITS
#define XZ_CSAM_LINE_BITS 17       /* 2^17 lines (8 MiB) per generation: XZ_MAX_CSAM_HOSTS / 8 */
#endif
#define XZ_CSAM_LINE_KEYS 15
#define XZ_CSAM_HASH 2654435761U  /* Knuth's multiplicative hash, 2^32 / the golden ratio */
struct xz_csam_line {
	__u32 a[XZ_CSAM_LINE_KEYS];  /* addresses; 0: a free slot */
	__u32 more;                   /* addresses of this line only in the hash */
};
/*
 * Its IPv4 prefixes in lines of the same shape, by their /24: prefix n/len of /24../31 in
 * host order with the bit under the prefix set (n | 1 << (31 - len): its lowest set bit
 * says the length) lies in line ((n >> 8) * XZ_CSAM_HASH) mod 2^32 >> (32 - b) (b as for
 * the lines, at most XZ_CSAM_NET_BITS); a shorter prefix as a /24 of each /24 it covers
 * (a /16: 256 of them). So one line answers for every prefix that covers an address,
 * where the trie walks some twenty nodes, and no directory of the /24s is read. ``more``
 * counts the prefixes of the line that did not fit: they send its lookups to the trie.
 * The control word says whether the generation in force has them (XZ_CSAM_NETS).
 */
#ifndef XZ_CSAM_NET_BITS
#define XZ_CSAM_NET_BITS 17        /* 2^17 lines (8 MiB) per generation: 4 x XZ_MAX_CSAM_PREFIXES / 8 */
#endif
/* Subscriber directory bits: what is certainly absent from the /24. */
#define XZ_SUB_DIR_NO_PREFIX 1     /* no pool or block covers any address of it */
#define XZ_SUB_DIR_NO_HOST 2       /* no host entry lies in it */

/* Subscriber types (xz_class.type). */
#define XZ_TYPE_DYNAMIC 1
#define XZ_TYPE_STATIC 2

/* Subscriber flags (xz_class.flags). */
#define XZ_F_SUSPENDED (1 << 0)     /* drop all but the support allow-list */
#define XZ_F_OP25B_EXEMPT (1 << 1)  /* dynamic, but may send to port 25 */
#define XZ_F_IP53B_EXEMPT (1 << 2)  /* dynamic, but may receive UDP/53 */
#define XZ_F_SESSION (1 << 3)       /* a RADIUS session's entry (the control plane's
				     * mark; the programs ignore it) */

/* What an address (host entry) or prefix (pool, static block) belongs to. */
struct xz_class {
	__u32 sub_id;      /* subscriber (customer) id; for a pool, the pool id */
	__u8 type;         /* XZ_TYPE_* */
	__u8 flags;        /* XZ_F_* */
	__u8 pool_bits;    /* an IPv4 pool whose 2^pool_bits addresses have state in
			    * xz_pool_addrs from index slot on (host bits of the address) */
	__u8 _pad;
	__u32 up_kbps;     /* contracted rate upstream, 0 = unlimited */
	__u32 down_kbps;   /* contracted rate downstream, 0 = unlimited */
	__u32 slot;        /* index in xz_state/xz_throttle, or (pool_bits) in xz_pool_addrs;
			    * 0 and no pool_bits: per-address state in the LRU (pool) */
};

/* Directions, index of per-direction state. */
#define XZ_UP 0
#define XZ_DOWN 1

/*
 * Per subscriber and direction: the rate limiter (GCRA: theoretical arrival
 * time, one word, updated with compare-and-swap so CPUs share it exactly),
 * the bulk-flow share limiter, and the volume admitted.
 */
struct xz_dir_state {
	__u64 tat;         /* ns (fine clock, or jiffies x tick_ns): when the bucket is empty again */
	__u64 bulk_tat;    /* the same for its bulk flows in congestion mode */
	__u64 bytes;
	__u64 packets;
};

/*
 * The scan signal (scan.h): how many distinct destinations (address, port,
 * protocol) a subscriber opens conversations to in the current window, as a
 * HyperLogLog sketch of 4-bit registers read with the martingale estimator:
 * every change of a register adds 1 / (the chance that a new destination
 * changes one). No destination is kept; a sketch of another window is stale
 * and starts afresh at its next update.
 */
#define XZ_SCAN_WORDS 6                       /* 64-bit words of registers */
#define XZ_SCAN_REGS (XZ_SCAN_WORDS * 16)     /* 4-bit registers: 96 */
#define XZ_SCAN_RMAX 15                       /* the highest rank a register holds */
#define XZ_SCAN_FRAC 6                        /* the estimate counts 1/64ths of a destination */

#define XZ_SCAN_EST_SHIFT 32                  /* where xz_scan.count holds the estimate */

/* One word for the window and its count: a new window zeroes the count with the same
 * compare-and-swap (and the programs have 64-bit atomics only). */
struct xz_scan {
	__u64 count;       /* bits 0-31: the window counted (xz_control.scan_epoch), another
			    * is stale; bits 32-63: distinct destinations in it, in 1/64ths */
	__u64 reg[XZ_SCAN_WORDS];   /* register i: bits 4*(i%16).. of word i/16 */
};

struct xz_state {
	struct xz_dir_state dir[2];
	__u64 op25b;       /* SMTP attempts blocked: the classic sign of a spam bot */
	struct xz_scan scan;   /* destinations of new conversations, this window (upstream) */
};

/* SMTP attempts OP25B blocked, of XZ_OP25B_PER consecutive IPv4 pool addresses (by
 * xz_pool_addrs' index i: value i / XZ_OP25B_PER, counter i % XZ_OP25B_PER). An array
 * stores each value in a multiple of 8 bytes: one 4-byte counter a value took 8, and twice
 * the memory that a drop's random slot lies in. */
#define XZ_OP25B_PER 16
struct xz_op25b {
	__u32 n[XZ_OP25B_PER];
};

/*
 * SMTP attempts OP25B blocked and not added to their counters yet, per CPU, noted in turn:
 * an IPv4 pool address's (its xz_pool_addrs index: xz_pool_op25b) or a subscriber's (its
 * slot | XZ_OP25B_SLOT: xz_state's op25b; an address a RADIUS session holds counts so).
 * The 16th of a batch adds them all: first a load of each counter, so that their misses
 * (random addresses: nearly each one a miss) overlap, then the adds, on lines now in the
 * cache. A locked add on a line that misses stalls the CPU for the whole miss: at a drop
 * each, it was half the cost of an OP25B drop in the forwarding lab. What a reader counts:
 * the counters, then the noted attempts idx[0 .. n % XZ_OP25B_BATCH) of every CPU.
 */
#define XZ_OP25B_BATCH 16
#define XZ_OP25B_SLOT 0x80000000U   /* a noted attempt of a slot, not a pool index */
_Static_assert(XZ_MAX_SUBSCRIBERS <= XZ_OP25B_SLOT && XZ_MAX_POOL_ADDRS <= XZ_OP25B_SLOT,
	       "xz_op25b_batch: slots and pool indexes below the slot bit");
struct xz_op25b_batch {
	__u32 n;           /* attempts noted on this CPU, ever (wraps) */
	__u32 idx[XZ_OP25B_BATCH];
	__u32 _pad;        /* bcc's per-CPU values: a multiple of 8 bytes */
};

/* A throttle set by hand (`xdpzoot throttle`), by slot; the daemon merges it. */
struct xz_manual {
	__u32 kbps;        /* both directions */
	__u32 _pad;
	__u64 until;       /* unix seconds; 0 = until `unthrottle` */
};

/* A rate in force that is not the contract's (a throttle), per direction; 0 = none. */
struct xz_throttle {
	__u32 kbps[2];
};

/* A flow watched for "continuously occupying bandwidth": headers and bytes only. */
struct xz_flow_key {
	struct xz_addr src;
	struct xz_addr dst;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 _pad[3];
};

struct xz_flow {
	__u64 win_start;   /* ns: start of the current measuring window */
	__u64 win_bytes;   /* offered in it, dropped packets included */
	__u64 fast_since;  /* ns: since when every window was above the bulk rate; 0 = not */
	__u32 bulk;        /* it is a bulk transfer (until it is idle for the bulk time) */
	__u32 _pad;
};
/* Allow-list bits (value of the allow trie). */
#define XZ_ALLOW_OP25B (1 << 0)     /* the ISP's own mail relays */
#define XZ_ALLOW_SUSPEND (1 << 1)   /* reachable while suspended */

/* Global switches (xz_control.flags). */
#define XZ_C_BYPASS (1 << 0)        /* pass everything, still count */
#define XZ_C_MONITOR (1 << 1)       /* decide and count, but pass */
#define XZ_C_OP25B (1 << 2)
#define XZ_C_OP25B_V6 (1 << 3)
#define XZ_C_OP25B_REJECT (1 << 4)  /* answer with TCP RST instead of drop */
#define XZ_C_IP53B (1 << 5)
#define XZ_C_IP53B_TCP (1 << 6)
#define XZ_C_IP53B_V6 (1 << 7)
#define XZ_C_CSAM_REJECT (1 << 8)   /* answer CSAM hits (RST / ICMP prohibited) */
#define XZ_C_CSAM_CORE (1 << 9)     /* also drop packets from listed addresses */
#define XZ_C_RATES (1 << 10)        /* enforce rates and count volume per subscriber */
#define XZ_C_CONGESTION (1 << 11)   /* congestion mode: bulk flows get a share only */
#define XZ_C_THROTTLES (1 << 12)    /* some throttle may be in force: look them up */
#define XZ_C_SCANS (1 << 14)        /* count new conversations' destinations (scan.h) */
#define XZ_C_LOADED (1 << 31)       /* written by the control plane */

/* xz_control.csam: the CSAM generation in force and what it holds, in one word
 * so that a single write switches lists. */
#define XZ_CSAM_GEN (1 << 0)        /* generation 0 or 1 */
#define XZ_CSAM_HOSTS (1 << 1)      /* it has exact addresses: look in the hash */
#define XZ_CSAM_PREFIXES (1 << 2)   /* it has prefixes: look in the trie */
#define XZ_CSAM_LINED (1 << 3)      /* its IPv4 addresses are in its lines (xz_csam_line) */
#define XZ_CSAM_NETS (1 << 4)       /* its IPv4 prefixes are in its net lines too */
/* log2 of how many of its lines (XZ_CSAM_LINE_BITS at most) and net lines the generation
 * uses, by the size of its list (a small list's lines stay in few pages); 0: all. */
#define XZ_CSAM_LINES_SHIFT 8
#define XZ_CSAM_NETS_SHIFT 16
#define XZ_CSAM_BITS_MASK 31

struct xz_control {
	__u32 flags;
	__u32 csam;        /* XZ_CSAM_* */
	__u32 burst_us;    /* rate limiter burst tolerance */
	__u32 bulk_kbps;   /* a flow above this rate ... */
	__u32 bulk_ms;     /* ... for longer than this is a bulk transfer */
	__u32 bulk_share;  /* percent of its subscriber's rate bulk flows share (congestion) */
	__u32 bulk_floor_kbps; /* bulk share of subscribers without a rate; 0 = unlimited */
	__u32 congestion;  /* cp only: congestion mode, XZ_CONGESTION_* */
	__u32 tick_ns;     /* ns per jiffy (timed by the cp); 0: unknown, the fine clock only */
	__u32 trace_until; /* XZ_C_TRACE's lease: seconds of bpf_ktime_get_ns(), renewed by
			    * the running trace; past it no event is made */
	__u32 trace_rate;  /* drop events a second at most (trace.h) */
	__u32 trace_reasons; /* bit (1 << XZ_R_*) of each reason whose drops are traced */
	__u32 scan_epoch;  /* the scan window in force: unix time of its start (cp) */
};

#define XZ_CONGESTION_OFF 0
#define XZ_CONGESTION_ON 1
#define XZ_CONGESTION_AUTO 2

/* CSAM hit counters: generation x family (IPv4, IPv6), nothing finer. */
#define XZ_NR_CSAM_HITS 4

/* What a CSAM generation holds: counts and a digest, never an entry. */
struct xz_csam_meta {
	__u8 sha256[32];     /* of the list file */
	__u64 loaded;        /* unix time of the load, seconds */
	__u32 hosts4;
	__u32 hosts6;
	__u32 prefixes4;
	__u32 prefixes6;
	__u32 nets4;         /* its IPv4 prefixes' net words: what its net lines are sized by */
	__u32 _pad;
};

/* Interface roles: where a packet enters decides which pipeline runs. */
#define XZ_ROLE_ACCESS 0            /* from subscribers: upstream pipeline */
#define XZ_ROLE_CORE 1              /* from the Internet: downstream pipeline */
#define XZ_NR_ROLES 2

/* Verdicts: what happened to the packet. */
#define XZ_VERDICTS(X) \
	X(PASS, "pass") \
	X(DROP, "drop") \
	X(REJECT, "reject") \
	X(MONITOR, "monitor")

/*
 * Reasons: the closed list shared by C, the CLI, `explain` and the metrics.
 * Append only; the position is the counter index.
 */
#define XZ_REASONS(X) \
	X(OK, "ok") \
	X(UNKNOWN, "unknown") \
	X(UNPARSED, "unparsed") \
	X(BYPASS, "bypass") \
	X(FRAGMENT, "fragment") \
	X(ALLOWLIST, "allowlist") \
	X(EXEMPT, "exempt") \
	X(OP25B, "op25b") \
	X(IP53B, "ip53b") \
	X(SUSPENDED, "suspended") \
	X(FRAG_SHORT, "frag_short") \
	X(CSAM, "csam") \
	X(RATE, "rate") \
	X(THROTTLE, "throttle") \
	X(BULK, "bulk")

#define XZ_ENUM(name, label) XZ_V_##name,
enum xz_verdict { XZ_VERDICTS(XZ_ENUM) XZ_NR_VERDICTS };
#undef XZ_ENUM
#define XZ_ENUM(name, label) XZ_R_##name,
enum xz_reason { XZ_REASONS(XZ_ENUM) XZ_NR_REASONS };
#undef XZ_ENUM

/* Counter slots: role x verdict x reason, packets and bytes, per CPU. */
#define XZ_NR_REASON_SLOTS 32
#define XZ_NR_COUNTERS (XZ_NR_ROLES * XZ_NR_VERDICTS * XZ_NR_REASON_SLOTS)
#define XZ_COUNTER(role, verdict, reason) \
	(((role) * XZ_NR_VERDICTS + (verdict)) * XZ_NR_REASON_SLOTS + (reason))

struct xz_counter {
	__u64 packets;
	__u64 bytes;
};

/*
 * The fast path (forward.h): a packet the pipeline passed is forwarded by the
 * program itself (fib lookup, then from XDP a devmap redirect, from TC ingress
 * bpf_redirect_neigh), or handed to the kernel's stack for one of the reasons below.
 * Switched by XZ_C_FAST_PATH, at both hooks.
 */
#define XZ_C_FAST_PATH (1 << 13)    /* forward passed packets from the program */
#ifndef XZ_MAX_IFINDEX
#define XZ_MAX_IFINDEX 4096         /* egress devmap, indexed by ifindex */
#endif
/* The slots of the programs an entry point tail-calls (xz_tail_xdp, xz_tail_tc). */
#define XZ_TAIL_REPLY 0
#define XZ_TAIL_FAST 1
/* The MAC addresses a frame the fast path forwards may be addressed to, of each of the
 * router's interfaces (xz_fast_macs, by ifindex): its own, then those of VRRP virtual-MAC
 * interfaces on it ([interfaces] vmacs: macvlans, whose frames the kernel routes too); each
 * a native word of its six bytes as in a frame, then (a native __u16) the ifindex of the
 * interface the kernel routes its frames from (the macvlan: policy routing by `iif`, a VRF,
 * its forwarding switch; 0: the interface's own); 0: none. ``rpf``: the reverse path
 * filter of that interface for each address (bits 2i, 2i + 1 for mac[i]; XZ_RPF_*). */
#define XZ_FAST_MACS 4
#define XZ_RPF_OFF 0      /* rp_filter 0: no check */
#define XZ_RPF_STRICT 1   /* 1: the source routed back by that interface */
#define XZ_RPF_LOOSE 2    /* 2: the source routed back at all */
#define XZ_RPF_KERNEL 3   /* on, where the check cannot be made here (a VRF's member) */
struct xz_fast_mac {
	__u64 mac[XZ_FAST_MACS];
	__u64 rpf;
};

/*
 * Fast path outcomes: the closed list shared by C, `status`, `stats` and the
 * metrics. Append only; the position is the counter index.
 */
#define XZ_FAST_REASONS(X) \
	X(FORWARDED, "forwarded") \
	X(FRAME, "frame") \
	X(TTL, "ttl") \
	X(LOCAL, "local") \
	X(UNROUTABLE, "unroutable") \
	X(NO_NEIGH, "no_neigh") \
	X(MTU, "mtu") \
	X(EGRESS, "egress") \
	X(REDIRECT, "redirect") \
	X(OTHER, "other") \
	X(OTHER_HOST, "other_host") \
	X(RP_FILTER, "rp_filter")

#define XZ_ENUM(name, label) XZ_FP_##name,
enum xz_fast_reason { XZ_FAST_REASONS(XZ_ENUM) XZ_NR_FAST };
#undef XZ_ENUM

/*
 * Drop events for `xdpzoot trace` (trace.h): while XZ_C_TRACE is on and its lease
 * (xz_control.trace_until) runs, a sample of the drops, at most trace_rate a second,
 * goes into the xz_trace_ring ring buffer. Never one for a CSAM drop, nor for any
 * packet from or to an address on the list.
 */
#define XZ_C_TRACE (1 << 16)        /* a trace runs: drop events */
#define XZ_C_TRACE_ADDRS (1 << 17)  /* ... with the packet's addresses (else zeros) */
#ifndef XZ_TRACE_RING_BYTES
#define XZ_TRACE_RING_BYTES (256 * 1024)  /* a power of 2 pages: 4,095 events */
#endif

/* The hook that ran the pipeline (xz_pkt.hook, xz_trace_event.hook). */
#define XZ_HOOK_XDP 0
#define XZ_HOOK_TC 1

struct xz_trace_event {
	__u64 ts;          /* bpf_ktime_get_ns() */
	__u32 sub_id;      /* the subscriber's id (a pool address: the pool's); 0: none */
	__u8 reason;       /* XZ_R_* */
	__u8 verdict;      /* XZ_V_*: drop, reject or monitor */
	__u8 role;         /* XZ_ROLE_* */
	__u8 hook;         /* XZ_HOOK_* */
	__u8 family;       /* 4 or 6 */
	__u8 proto;        /* L4 protocol number */
	__u16 sport;       /* host order; 0 without a TCP/UDP header */
	__u16 dport;
	__u8 _pad[2];
	struct xz_addr src;   /* zeros unless XZ_C_TRACE_ADDRS */
	struct xz_addr dst;
};

/* The events' rate limiter and what a full ring buffer cost (one entry, every CPU). */
struct xz_trace_state {
	__u64 tat;         /* GCRA: ns when the bucket is empty again */
	__u64 lost;        /* events the ring buffer had no room for (the packet was dropped) */
};

#endif /* XDPZOOT_H */
