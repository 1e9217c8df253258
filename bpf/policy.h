/* SPDX-License-Identifier: GPL-2.0 */
/*
 * policy.h - the one policy pipeline. It does not know which hook runs it:
 * entry points in xdpzoot.c adapt the context and turn the verdict into a
 * return code. Every verdict leaves through one exit that counts it.
 *
 *  upstream   (access ingress): classify source -> suspended? -> OP25B -> CSAM
 *                               (-> the scan sketch, for a new conversation)
 *  downstream (core ingress):   classify destination -> suspended? -> IP53B
 *                               (-> CSAM source, when switched on)
 */
#ifndef XDPZOOT_POLICY_H
#define XDPZOOT_POLICY_H

#include "xdpzoot.h"
#include "maps.h"
#include "parse.h"
#include "reply.h"
#include "trace.h"
#include "scan.h"

/* The /24 number of IPv4 address ``a`` (its top 24 bits). */
static __always_inline __u32 xz_slash24(struct xz_addr *a)
{
	__u32 i = ((__u32)a->addr[12] << 16) | ((__u32)a->addr[13] << 8) | a->addr[14];

	/* Verifier workaround: 6.1's verifier loses the bounds of an OR of two known ranges
	 * (the index becomes "scalar()", an unbounded access into the 4 MiB value), so
	 * bound it with an AND it tracks. The empty asm keeps clang from dropping the AND,
	 * which it knows changes nothing. */
	asm volatile("" : "+r"(i));
	return i & 0xFFFFFF;
}

/*
 * The 2-bit state of the /24 of IPv4 address ``a`` in directory ``d`` (XZ_DIR_BYTES
 * says how it is laid out); 0, "look everything up", without a directory.
 */
static __always_inline __u32 xz_dir_state(struct xz_dir *d, struct xz_addr *a)
{
	__u32 i = xz_slash24(a);

	return d ? (d->b[i >> 2] >> ((i & 3) << 1)) & 3 : 0;
}

/* The class index's answer for IPv4 address ``a`` (struct xz_sub_idx): 0, "look it up",
 * or the index in xz_uniform of the class that answers for it: its /24's lane, or for a
 * /24 with a few host entries (XZ_IDX_HOSTED), the class of its addresses that are not. */
static __always_inline __u32 xz_uniform_index(struct xz_addr *a)
{
	__u32 i = xz_slash24(a), row = i / XZ_IDX_LANES, n, b = a->addr[15];
	struct xz_sub_idx *x = xz_sub_idx.lookup(&row);
	struct xz_sub_hosted *h;

	n = x ? x->e[i & (XZ_IDX_LANES - 1)] : 0;
	if (!(n & XZ_IDX_HOSTED))
		return n;
	/* The row's key slot again: a new slot made 6.18's verifier walk twice the paths of
	 * xz_tc_access, past its limit. */
	row = n & (XZ_IDX_HOSTED - 1);
	h = xz_sub_hosted.lookup(&row);
	if (!h || h->slash != i || (h->bits[(b >> 6) & 3] >> (b & 63)) & 1)
		return 0;
	return h->idx;
}

/* Whether filter ``f`` (struct xz_filter) has key ``w`` looked up: 1 where its bit is set,
 * or the filter is off or absent; 0 where nothing lies. Without a branch. */
static __always_inline __u32 xz_filter_passes(struct xz_filter *f, __u64 w)
{
	__u64 h;

	if (!f)
		return 1;
	h = ((w & f->mask) * XZ_FILTER_MUL) >> (64 - XZ_FILTER_BITS);
	return (__u32)(((f->bits[h >> 6] >> (h & 63)) & 1) | ((f->on & 1) ^ 1));
}

/* The same for an IPv6 filter and address ``a`` (its first 8 bytes, the key). */
static __always_inline __u32 xz_v6_filter_passes(struct xz_filter *f, struct xz_addr *a)
{
	__u64 w;

	__builtin_memcpy(&w, a->addr, 8);
	return xz_filter_passes(f, w);
}

/* 1 when ``a`` is an IPv4 address mapped into ::ffff:0:0/96 (in an IPv6 header too), else
 * 0. Without a branch: one where it is used doubles the paths the verifier walks. */
static __always_inline __u64 xz_v4mapped(struct xz_addr *a)
{
	__u64 w, x;
	__u32 m;

	__builtin_memcpy(&w, a->addr, 8);
	__builtin_memcpy(&m, a->addr + 8, 4);
	x = w | (__u64)(m ^ bpf_htonl(0xffff));    /* 0: IPv4-mapped */
	return ((x | -x) >> 63) ^ 1;
}

/* The class of IPv6 address ``a``'s longest prefix in xz_prefixes6, probing the lengths of
 * ``l`` (struct xz_v6_lens) longest first; NULL: none. */
static __always_inline struct xz_class *xz_prefix6(struct xz_addr *a, struct xz_v6_lens *l)
{
	struct xz_lpm_key key = {};
	struct xz_class *cls = NULL;
	__u64 hi, lo, n, mh, ml;

	__builtin_memcpy(&hi, a->addr, 8);
	__builtin_memcpy(&lo, a->addr + 8, 8);
#pragma unroll
	for (int i = 0; i < XZ_V6_LENS; i++) {
		n = l->len[i];
		if (!n || n > 128)
			break;
		/* the first n bits of the address, in network order */
		mh = n >= 64 ? ~0ULL : ~0ULL << ((64 - n) & 63);
		ml = n <= 64 ? 0 : ~0ULL << ((128 - n) & 63);
		hi &= __builtin_bswap64(mh);
		lo &= __builtin_bswap64(ml);
		key.prefixlen = n;
		__builtin_memcpy(key.addr, &hi, 8);
		__builtin_memcpy(key.addr + 8, &lo, 8);
		cls = xz_prefixes6.lookup(&key);
		if (cls)
			break;
	}
	return cls;
}

/*
 * Most specific entry wins: a host entry, else the longest prefix. For IPv4, first the
 * class index: a /24 that one pool or block covers whole (no host entry, no longer
 * prefix in it) has its class in two small arrays that stay in the cache, where the
 * trie's walk misses it at every level. Else the directory says which of the two maps
 * can hold anything for the address's /24: a pool address costs no miss in the host
 * hash, a static host no trie walk. The class is copied to ``out`` (returned; NULL:
 * none): one kind of pointer after three maps' lookups keeps the verifier's paths few.
 * (So does the shape below: the same steps written as conditional expressions made
 * 6.18's verifier give up on xz_xdp_access, E2BIG.)
 */
static __always_inline struct xz_class *xz_classify(struct xz_addr *a, __u8 family,
						    struct xz_class *out)
{
	struct xz_lpm_key key = { .prefixlen = 128 };
	__u32 zero = 0, skip = 0;
	struct xz_class *cls = NULL;
	struct xz_v6_lens *lens = NULL;

	if (family == 4) {
		__u32 idx = xz_uniform_index(a);

		if (idx)
			cls = xz_uniform.lookup(&idx);
		if (!cls)
			skip = xz_dir_state(xz_sub_dir.lookup(&zero), a);
	} else if (!xz_v4mapped(a)) {
		skip = XZ_SUB_DIR_NO_HOST * (xz_v6_filter_passes(xz_sub_v6.lookup(&zero), a) ^ 1);
		lens = xz_sub_v6_lens.lookup(&zero);
		if (lens && !lens->len[0])
			lens = NULL;   /* the trie answers */
	}   /* (an IPv4-mapped address in an IPv6 header: the host hash and the trie) */
	if (!cls && !(skip & XZ_SUB_DIR_NO_HOST))
		cls = xz_hosts.lookup(a);
	if (!cls && lens) {
		cls = xz_prefix6(a, lens);
		skip |= XZ_SUB_DIR_NO_PREFIX;
	}
	if (!cls && !(skip & XZ_SUB_DIR_NO_PREFIX)) {
		__builtin_memcpy(key.addr, a->addr, 16);
		cls = xz_prefixes.lookup(&key);
	}
	if (!cls)
		return NULL;
	__builtin_memcpy(out, cls, sizeof(*out));
	return out;
}

static __always_inline __u32 xz_allowed(struct xz_addr *a, __u32 bit)
{
	struct xz_lpm_key key = { .prefixlen = 128 };
	__u32 *bits;

	__builtin_memcpy(key.addr, a->addr, 16);
	bits = xz_allow.lookup(&key);
	return bits ? *bits & bit : 0;
}

/* IPv6 neighbour discovery always passes: the router needs it to reach anyone. */
static __always_inline int xz_is_nd(struct xz_pkt *p)
{
	return p->family == 6 && p->proto == IPPROTO_ICMPV6 && p->l4ok &&
	       p->icmp_type >= 133 && p->icmp_type <= 137;
}

/*
 * A port rule (OP25B, IP53B) for a dynamic subscriber: matches the
 * destination port, or a first fragment too short to show it.
 * Returns the reason; *hit says whether the packet is to be stopped.
 */
static __always_inline int xz_port_rule(struct xz_pkt *p, struct xz_class *cls, __u16 port,
					__u8 exempt, struct xz_addr *relay, int reason, int *hit)
{
	int is_short = p->frag == XZ_FRAG_FIRST && p->l4_len < xz_l4_need(p->proto);

	if (!is_short) {
		if (!p->l4ok)
			return XZ_R_UNPARSED;
		if (p->dport != port)
			return XZ_R_OK;
	}
	if (cls->flags & exempt)
		return XZ_R_EXEMPT;
	if (relay && xz_allowed(relay, XZ_ALLOW_OP25B))
		return XZ_R_ALLOWLIST;
	*hit = 1;
	return is_short ? XZ_R_FRAG_SHORT : reason;
}

static __always_inline void xz_count(int role, int verdict, int reason, __u32 len)
{
	__u32 key = XZ_COUNTER(role, verdict, reason);
	struct xz_counter *c = xz_counters.lookup(&key);

	if (c) {
		c->packets++;
		c->bytes += len;
	}
}

/* After a map lookup: keeps its call apart. Clang merges like calls of sibling branches
 * (a generation's map or the other's, one state array or the other) into one, whose map
 * the verifier then cannot know, and a lookup of an unknown map is not inlined: it is the
 * generic helper, an indirect call through the map's operations (a retpoline on this CPU,
 * which also stops the state's early load from running under the list's lookups) that
 * reads the map's header too. With every lookup its own call, the cold upstream pass at 1M
 * went from ~1,050 to ~740 ns and the CSAM drop from ~1,700 to ~930 (bench_cold), and
 * xz_xdp_access's verification from 557k to 689k instructions of its million. The CSAM
 * list's arrays hold both generations in one map each (indexed by generation); its hash
 * and trie are a map per generation (a load empties the idle one whole), and their pairs'
 * if/else blocks are written out: bcc refuses a map's lookup inside a macro, and a
 * function cannot take a map. */
#define XZ_OWN_SITE(p) asm volatile("" : "+r"(p))

/* The index of the line of hash ``x`` in the lines of generation ``csam`` (the control
 * word: its generation, and at ``shift`` the log2 of how many of its ``max_bits`` lines it
 * uses; 0: all of them, as before the word said so). Without a branch. */
static __always_inline __u32 xz_csam_line_at(__u32 x, __u32 csam, int shift, int max_bits)
{
	__u32 bits = (csam >> shift) & XZ_CSAM_BITS_MASK;

	bits += ((bits - 1) >> 31) * max_bits;   /* 0: max_bits */
	return (csam & XZ_CSAM_GEN) << max_bits |
	       ((x >> ((32 - bits) & 31)) & ((1U << max_bits) - 1));
}

/* The index in xz_csam_l of IPv4 address ``ip``'s line (network order, as in the packet)
 * in generation ``csam``. */
static __always_inline __u32 xz_csam_line_of(__u32 ip, __u32 csam)
{
	return xz_csam_line_at(ip * XZ_CSAM_HASH, csam, XZ_CSAM_LINES_SHIFT, XZ_CSAM_LINE_BITS);
}

/* The index in xz_csam_n of the net line of IPv4 address ``ip``'s /24 (as for
 * xz_csam_line_of) in generation ``csam``. */
static __always_inline __u32 xz_csam_net_of(__u32 ip, __u32 csam)
{
	return xz_csam_line_at((bpf_ntohl(ip) >> 8) * XZ_CSAM_HASH, csam, XZ_CSAM_NETS_SHIFT,
			       XZ_CSAM_NET_BITS);
}

/* Whether IPv4 address ``a`` is in generation ``csam`` of the list, from one line (struct
 * xz_csam_line): ``nets`` 0, one of its exact addresses, from the address's line (-1: ask
 * the hash); ``nets`` 1, in one of its prefixes, from its /24's net line (-1: ask the
 * trie). 1 yes, 0 no. ``i``: the caller's key slot for the lookup, given back as it
 * was (holding 0): a new slot, or one left holding something else, doubled the paths
 * 6.18's verifier walks through the rest of the pipeline, past its limit. */
static __always_inline int xz_csam_in_line(struct xz_addr *a, __u32 csam, __u32 *i,
					   const int nets)
{
	__u32 ip = *(__u32 *)&a->addr[12], h = bpf_ntohl(ip);
	struct xz_csam_line *l;
	__u64 hit = 0, more;

	if (nets) {
		*i = xz_csam_net_of(ip, csam);
		l = xz_csam_n.lookup(i);
	} else {
		*i = xz_csam_line_of(ip, csam);
		l = xz_csam_l.lookup(i);
	}
	XZ_OWN_SITE(l);
	*(volatile __u32 *)i = 0;
	if (!l)
		return -1;
	/* Without a branch (a compare is one in BPF, and each multiplied the paths the
	 * verifier walks through the rest of the pipeline): x - 1 borrows into bit 63 only
	 * when x is 0. An address: x is the slot's word xor it; 0.0.0.0 matches a free slot,
	 * never a hit (the control plane counts it in ``more``). A prefix: the slot's lowest
	 * set bit m marks its length, x is (h ^ n) & -(2m), and the 1 is taken only where the
	 * slot is not free (0). */
#pragma unroll
	for (int k = 0; k < XZ_CSAM_LINE_KEYS; k++) {
		__u32 n = l->a[k];
		__u64 x = nets ? (__u64)((h ^ n) & -((n & -n) << 1)) -
				 (((__u64)n + 0xFFFFFFFFULL) >> 32) : (__u64)(n ^ ip) - 1;

		asm volatile("" : "+r"(x));   /* else clang makes it a compare again */
		hit |= x >> 63;
	}
	if (!nets)
		hit &= ((__u64)ip + 0xFFFFFFFFULL) >> 32;  /* ip != 0 */
	more = ((__u64)l->more + 0xFFFFFFFFULL) >> 32;     /* more != 0 */
	asm volatile("" : "+r"(hit), "+r"(more));
	return (int)hit - (int)(more & (hit ^ 1));        /* 1, 0, or -1: ask further */
}

/* Load the first word of a line (struct xz_csam_line), and nothing more. */
static __always_inline void xz_csam_touch(struct xz_csam_line *l)
{
	__u32 v;

	if (l) {
		v = *(volatile __u32 *)&l->a[0];
		asm volatile("" : : "r"(v));
	}
}

/* Load the lines that may hold IPv4 address ``a`` in generation ``csam``: its own (where
 * the generation has addresses in lines) and its /24's net line (where it has prefixes in
 * them), both before either is read, so that their misses run at once. ``i``: as for
 * xz_csam_in_line. */
static __always_inline void xz_csam_lines_touch(struct xz_addr *a, __u32 csam, __u32 *i)
{
	__u32 ip = *(__u32 *)&a->addr[12];
	struct xz_csam_line *l;

	if ((csam & XZ_CSAM_LINED) && (csam & XZ_CSAM_HOSTS)) {
		*i = xz_csam_line_of(ip, csam);
		l = xz_csam_l.lookup(i);
		XZ_OWN_SITE(l);
		*(volatile __u32 *)i = 0;
		xz_csam_touch(l);
	}
	if ((csam & XZ_CSAM_NETS) && (csam & XZ_CSAM_PREFIXES)) {
		*i = xz_csam_net_of(ip, csam);
		l = xz_csam_n.lookup(i);
		XZ_OWN_SITE(l);
		*(volatile __u32 *)i = 0;
		xz_csam_touch(l);
	}
}

/* What xz_filter_passes is for generation ``gen``'s IPv4 filter (struct xz_filter4) and /24
 * number ``w``. */
static __always_inline __u32 xz_filter4_passes(__u32 gen, __u32 w)
{
	struct xz_filter4 *f = xz_csam_f4.lookup(&gen);
	__u64 h, *bits;
	__u32 i;

	XZ_OWN_SITE(f);
	if (!f)
		return 1;
	h = (((__u64)w * f->mul) >> (f->shift & 63)) & ((1U << XZ_CSAM_V4_BITS) - 1);
	i = (gen & 1) * XZ_CSAM_V4_WORDS + (__u32)(h >> 6);
	bits = xz_csam_b4.lookup(&i);
	XZ_OWN_SITE(bits);
	if (!bits)
		return 1;
	return (__u32)(((*bits >> (h & 63)) & 1) | ((f->on & 1) ^ 1));
}

/* Is the address on the CSAM list in force? The generation's filter (IPv4: its /24's bit;
 * IPv6: its /64's or shorter) answers for most addresses on its own: nothing listed there.
 * Else the exact host (for IPv4 its line, and the hash only where the line says so), then
 * the prefix (for IPv4 its /24's net line, which holds every prefix that covers the
 * address, and the trie only where that line says so). A kind of entry the list does not
 * have is not looked up. (A directory of the /24s, 4 MiB, read between the filter and the
 * lines, cost a drop a miss of its own: the lab's drop mix 1,817-1,959 kpps at 225-244 ns
 * of program with it, 1,981-2,024 at 195-203 without, 2026-12-05.) */
static __always_inline int xz_csam_listed(struct xz_addr *a, __u8 family, __u32 csam)
{
	struct xz_lpm_key key = { .prefixlen = 128 };
	int gen = csam & XZ_CSAM_GEN;
	__u32 zero = 0, g = gen;   /* g: the generation, as a key of the by-generation arrays */
	struct xz_filter *f;
	__u8 *hit;

	if (!(csam & (XZ_CSAM_HOSTS | XZ_CSAM_PREFIXES)))
		return 0;   /* no list in force (or an empty one): nothing to look up */
	if (family == 4) {   /* the /24's bit */
		if (!xz_filter4_passes(g, xz_slash24(a)))
			return 0;
		xz_csam_lines_touch(a, csam, &zero);
	} else {
		f = xz_csam_f.lookup(&g);
		XZ_OWN_SITE(f);
		if (!xz_v6_filter_passes(f, a))
			return 0;
	}
	if (csam & XZ_CSAM_HOSTS) {
		int has = -1;

		if (family == 4 && (csam & XZ_CSAM_LINED))
			has = xz_csam_in_line(a, csam, &zero, 0);
		if (has < 0) {
			if (gen) {
				hit = xz_csam_h1.lookup(a);
				XZ_OWN_SITE(hit);
			} else {
				hit = xz_csam_h0.lookup(a);
				XZ_OWN_SITE(hit);
			}
			has = !!hit;
		}
		if (has)
			return 1;
	}
	if (!(csam & XZ_CSAM_PREFIXES))
		return 0;
	if (family == 4 && (csam & XZ_CSAM_NETS)) {   /* its /24's net line, else the trie */
		int net = xz_csam_in_line(a, csam, &zero, 1);

		if (net >= 0)
			return net;
	}
	__builtin_memcpy(key.addr, a->addr, 16);
	if (gen) {
		hit = xz_csam_p1.lookup(&key);
		XZ_OWN_SITE(hit);
	} else {
		hit = xz_csam_p0.lookup(&key);
		XZ_OWN_SITE(hit);
	}
	return !!hit;
}

/* Hits per generation and family only: nothing says who hit which entry. */
static __always_inline void xz_csam_count(__u32 csam, __u8 family)
{
	__u32 key = (csam & XZ_CSAM_GEN) * 2 + (family == 6);
	__u64 *n = xz_csam_hits.lookup(&key);

	if (n)
		*n += 1;
}

/* The rules that depend on who the subscriber is; returns XZ_V_*, sets *reason. */
static __always_inline int xz_subscriber_rules(struct xz_pkt *p, const int role, __u32 flags,
					       int *reason, struct xz_class **clsp,
					       struct xz_class *buf)
{
	struct xz_class *cls;
	struct xz_addr *peer;
	int hit = 0;

	if (role == XZ_ROLE_ACCESS) {
		cls = xz_classify(&p->src, p->family, buf);
		peer = &p->dst;
	} else {
		cls = xz_classify(&p->dst, p->family, buf);
		peer = &p->src;
	}
	if (!cls) {
		*reason = XZ_R_UNKNOWN;
		return XZ_V_PASS;
	}
	*clsp = cls;
	if (xz_is_nd(p))
		return XZ_V_PASS;
	if (cls->flags & XZ_F_SUSPENDED) {
		if (xz_allowed(peer, XZ_ALLOW_SUSPEND)) {
			*reason = XZ_R_ALLOWLIST;
			return XZ_V_PASS;
		}
		*reason = XZ_R_SUSPENDED;
		return XZ_V_DROP;
	}
	if (p->frag == XZ_FRAG_LATER) {
		*reason = XZ_R_FRAGMENT;
		return XZ_V_PASS;
	}
	if (cls->type != XZ_TYPE_DYNAMIC)
		return XZ_V_PASS;
	if (role == XZ_ROLE_ACCESS) {
		if (!(flags & XZ_C_OP25B) || (p->family == 6 && !(flags & XZ_C_OP25B_V6)) ||
		    p->proto != IPPROTO_TCP)
			return XZ_V_PASS;
		*reason = xz_port_rule(p, cls, 25, XZ_F_OP25B_EXEMPT, peer, XZ_R_OP25B, &hit);
		if (!hit)
			return XZ_V_PASS;
		return (flags & XZ_C_OP25B_REJECT) && *reason == XZ_R_OP25B && xz_can_reply(p) ?
		       XZ_V_REJECT : XZ_V_DROP;
	}
	if (!(flags & XZ_C_IP53B) || (p->family == 6 && !(flags & XZ_C_IP53B_V6)) ||
	    !(p->proto == IPPROTO_UDP || (p->proto == IPPROTO_TCP && (flags & XZ_C_IP53B_TCP))))
		return XZ_V_PASS;
	*reason = xz_port_rule(p, cls, 53, XZ_F_IP53B_EXEMPT, NULL, XZ_R_IP53B, &hit);
	return hit ? XZ_V_DROP : XZ_V_PASS;
}

/* The index in xz_pool_addrs of the subscriber's address, for a class with pool_bits: its
 * pool's first index plus the address's host bits. */
static __always_inline __u32 xz_pool_index(struct xz_pkt *p, struct xz_class *cls,
					   const int role)
{
	struct xz_addr *a = role == XZ_ROLE_ACCESS ? &p->src : &p->dst;

	return cls->slot + (bpf_ntohl(*(__be32 *)&a->addr[12]) &
			    ((1U << (cls->pool_bits & 31)) - 1));
}

/* ``a`` made its /64, unless it is IPv4-mapped. */
static __always_inline void xz_key64(struct xz_addr *a)
{
	__u64 lo;

	__builtin_memcpy(&lo, a->addr + 8, 8);
	lo &= -xz_v4mapped(a);                     /* all ones when mapped, else 0 */
	__builtin_memcpy(a->addr + 8, &lo, 8);
}

/* The subscriber's state: its slot, or (pool address without owner) its address's:
 * indexed for IPv4 pools that have a block of xz_pool_addrs, else in the LRU, where an
 * IPv6 address counts by its /64 (one customer's: its devices' and privacy addresses
 * share one budget, one volume and one scan sketch). */
static __always_inline struct xz_state *xz_state_of(struct xz_pkt *p, struct xz_class *cls,
						    const int role)
{
	struct xz_addr *a = role == XZ_ROLE_ACCESS ? &p->src : &p->dst, key;
	__u32 slot = cls->slot;
	struct xz_state *st;

	__builtin_memcpy(&key, a, sizeof(key));   /* on every path: fewer for the verifier */
	xz_key64(&key);
	if (cls->pool_bits) {
		slot = xz_pool_index(p, cls, role);
		st = xz_pool_addrs.lookup(&slot);
		XZ_OWN_SITE(st);
		return st;
	}
	if (slot) {
		st = xz_state.lookup(&slot);
		XZ_OWN_SITE(st);
		return st;
	}
	st = xz_pool_state.lookup(&key);
	if (!st) {
		struct xz_state zero = {};

		xz_pool_state.update(&key, &zero);
		st = xz_pool_state.lookup(&key);
	}
	return st;
}

/* Bulk detection: how long a flow's rate is measured at a time. */
#define XZ_BULK_WINDOW_NS 100000000ULL   /* 100 ms */
#define XZ_GCRA_TRIES 4                  /* compare-and-swap retries under contention */
#define XZ_COARSE_BURST_NS 50000000ULL   /* 50 ms: many ticks of the coarse clock (1-10 ms) */
#define XZ_STALE_NS (1ULL << 40)          /* ~18 min: more than any burst + one packet's cost */

/*
 * Generic cell rate algorithm on one word: admit ``len`` bytes at ``kbps`` if
 * the bucket is not over its burst tolerance. Lock-free: a compare-and-swap
 * makes concurrent CPUs share one budget exactly; after XZ_GCRA_TRIES lost
 * races the packet is admitted (fail open, bounded over-admission).
 */
static __always_inline int xz_gcra(__u64 *tat, __u64 now, __u32 len, __u32 kbps, __u64 burst)
{
	__u64 cost = (__u64)len * 8000000ULL / kbps;   /* ns the bytes take at the rate */

#pragma unroll
	for (int i = 0; i < XZ_GCRA_TRIES; i++) {
		__u64 old = *(volatile __u64 *)tat;
		/* Later than any burst and packet can make it: set on the other clock (the
		 * burst crossed XZ_COARSE_BURST_NS), so start afresh. */
		__u64 base = old > now && old - now < XZ_STALE_NS ? old : now;

		if (base - now > burst)
			return 0;
		if (__sync_val_compare_and_swap(tat, old, base + cost) == old)
			return 1;
	}
	return 1;
}

/*
 * Is this flow a bulk transfer? It becomes one after staying above the bulk
 * rate for the bulk time, and stays one for as long as it goes on: a flow held
 * to its share sends less, but it is the same long transfer. A flow idle for
 * the bulk time starts afresh.
 */
static __always_inline int xz_is_bulk(struct xz_pkt *p, struct xz_control *ctl, __u64 now,
				      __u32 bytes)
{
	__u64 hold = (__u64)ctl->bulk_ms * 1000000ULL, elapsed;
	struct xz_flow_key k = {};
	struct xz_flow *f;

	__builtin_memcpy(&k.src, &p->src, sizeof(k.src));
	__builtin_memcpy(&k.dst, &p->dst, sizeof(k.dst));
	k.sport = p->sport;
	k.dport = p->dport;
	k.proto = p->proto;
	f = xz_flows.lookup(&k);
	if (!f) {
		struct xz_flow n = { .win_start = now, .win_bytes = bytes };

		xz_flows.update(&k, &n);
		return 0;
	}
	elapsed = now - f->win_start;
	if (elapsed >= XZ_BULK_WINDOW_NS) {
		if (elapsed >= hold + 2 * XZ_BULK_WINDOW_NS) {
			f->bulk = 0;   /* idle for the bulk time: a new start */
			f->fast_since = 0;
		} else if (f->win_bytes * 8000000ULL >= (__u64)ctl->bulk_kbps * elapsed) {
			/* The window that ended was above the rate (bytes*8/s > kbps*1000). */
			if (!f->fast_since)
				f->fast_since = f->win_start;
		} else if (!f->bulk) {
			f->fast_since = 0;
		}
		f->win_start = now;
		f->win_bytes = 0;
	}
	f->win_bytes += bytes;
	if (!f->bulk && f->fast_since && now - f->fast_since >= hold)
		f->bulk = 1;
	return f->bulk;
}

/*
 * What volumes count: IP bytes, so that the access network's framing (Ethernet,
 * VLAN tags, PPPoE) costs the subscriber nothing; a GSO/GRO aggregate (TC) counts
 * the headers of each of the packets it stands for, as they are on the wire, so
 * that both hooks count the same. (The rate limiter charges an aggregate its IP
 * length, one set of headers: charging them all made TCP through TC collapse to a
 * fifth of its rate in the lab, for a reason not found. At TC a subscriber may so
 * get up to ~3% above the rate; XDP sees no aggregates.)
 */
static __always_inline __u32 xz_ip_bytes(struct xz_pkt *p)
{
	__u32 bytes = p->ip_len;

	if (p->segs > 1)   /* L3 headers (ip_len - l4_len) and L4 header, per packet */
		bytes += (p->segs - 1) * (p->ip_len - p->l4_len + p->l4_hlen);
	return bytes;
}

/* Whether the rate limiter works on the state of this subscriber or pool address: a
 * pool address without an owner and without a rate has nothing to enforce (no throttle,
 * no volume rule: those bind subscribers, by slot) unless congestion mode may hold its
 * bulk flows to a floor. */
static __always_inline int xz_rated(struct xz_class *cls, const int role, struct xz_control *ctl)
{
	__u32 kbps = role == XZ_ROLE_ACCESS ? cls->up_kbps : cls->down_kbps;

	return (cls->slot && !cls->pool_bits) || kbps ||
	       ((ctl->flags & XZ_C_CONGESTION) && ctl->bulk_floor_kbps);
}

/* Load a word of each cache line of the state that the packet will use, and nothing
 * more: with many subscribers the state misses the cache, and the miss then runs while
 * the packet's other lookups do. */
static __always_inline void xz_state_prefetch(struct xz_state *st, const int role, int scan)
{
	__u64 v;

	if (!st)
		return;
	v = *(volatile __u64 *)&st->dir[role == XZ_ROLE_ACCESS ? XZ_UP : XZ_DOWN].tat;
	asm volatile("" : : "r"(v));
	if (scan) {
		v = *(volatile __u64 *)&st->scan.count;
		asm volatile("" : : "r"(v));
	}
}

/*
 * Bandwidth control of a passing packet: the subscriber's rate in force
 * (contract, or a lower throttle), then in congestion mode the share of its
 * bulk flows; what passes is counted as the subscriber's volume.
 */
static __always_inline int xz_bandwidth(struct xz_pkt *p, struct xz_class *cls, const int role,
					struct xz_control *ctl, int *reason)
{
	int d = role == XZ_ROLE_ACCESS ? XZ_UP : XZ_DOWN;
	struct xz_throttle *th = NULL;
	struct xz_dir_state *ds;
	struct xz_state *st;
	__u32 slot = cls->slot, kbps, share, why = XZ_R_RATE, bytes = xz_ip_bytes(p);
	__u64 now, burst = (__u64)ctl->burst_us * 1000;

	kbps = d == XZ_UP ? cls->up_kbps : cls->down_kbps;
	if (!xz_rated(cls, role, ctl))
		return XZ_V_PASS;   /* its state is not touched: no cold load, no LRU insert */
	st = xz_state_of(p, cls, role);
	if (slot && !cls->pool_bits && (ctl->flags & XZ_C_THROTTLES))   /* mostly none */
		th = xz_throttle.lookup(&slot);
	if (!st)
		return XZ_V_PASS;   /* no state slot: fail open */
	ds = &st->dir[d & 1];
	if (th && th->kbps[d & 1] && (!kbps || th->kbps[d & 1] < kbps)) {
		kbps = th->kbps[d & 1];
		why = XZ_R_THROTTLE;
	}
	if (kbps || (ctl->flags & XZ_C_CONGESTION)) {
		/* Only when a limit applies: the clock costs. Against a burst of many ticks,
		 * the jiffies counter (a load the verifier inlines; a tick's resolution) is
		 * exact enough; short bursts need the fine clock. The two differ in origin:
		 * xz_gcra starts afresh on a word from the other one. */
		now = burst >= XZ_COARSE_BURST_NS && ctl->tick_ns ?
		      bpf_jiffies64() * ctl->tick_ns : bpf_ktime_get_ns();
		/* Bulk share first, so that what it drops costs the subscriber nothing. */
		share = kbps ? kbps / 100 * ctl->bulk_share : ctl->bulk_floor_kbps;
		if ((ctl->flags & XZ_C_CONGESTION) && share && xz_is_bulk(p, ctl, now, bytes) &&
		    !xz_gcra(&ds->bulk_tat, now, p->ip_len, share, burst)) {
			*reason = XZ_R_BULK;
			return XZ_V_DROP;
		}
		if (kbps && !xz_gcra(&ds->tat, now, p->ip_len, kbps, burst)) {
			*reason = why;
			return XZ_V_DROP;
		}
	}
	__sync_fetch_and_add(&ds->bytes, bytes);
	__sync_fetch_and_add(&ds->packets, p->segs);
	return XZ_V_PASS;
}

/* The counter of noted attempt ``e`` (struct xz_op25b_batch): a pool address's (*c32, in
 * xz_pool_op25b) or a subscriber's (*c64, its state's op25b); the other NULL. */
static __always_inline void xz_op25b_counter(__u32 e, __u32 **c32, __u64 **c64)
{
	__u32 i = e & ~XZ_OP25B_SLOT, v = i / XZ_OP25B_PER;
	struct xz_state *st;
	struct xz_op25b *n;

	*c32 = NULL;
	*c64 = NULL;
	if (e & XZ_OP25B_SLOT) {
		st = xz_state.lookup(&i);
		if (st)
			*c64 = &st->op25b;
	} else {
		n = xz_pool_op25b.lookup(&v);
		if (n)
			*c32 = &n->n[i % XZ_OP25B_PER];
	}
}

/* An SMTP attempt, ``e`` as struct xz_op25b_batch has it: noted in this CPU's batch, which
 * the 16th adds to the counters (the struct says why). Programs do not nest on a CPU (the
 * hooks are ingress, in softirq), so the batch is this run's alone. */
static __always_inline void xz_op25b_note(__u32 e)
{
	struct xz_op25b_batch *b;
	__u32 zero = 0, k, *c32;
	__u64 *c64, x;

	b = xz_op25b_noted.lookup(&zero);
	if (!b)
		return;
	k = b->n % XZ_OP25B_BATCH;
	b->idx[k] = e;
	b->n++;
	if (k != XZ_OP25B_BATCH - 1)
		return;
#pragma unroll
	for (k = 0; k < XZ_OP25B_BATCH; k++) {   /* every miss under way at once */
		xz_op25b_counter(b->idx[k], &c32, &c64);
		x = c32 ? *(volatile __u32 *)c32 : c64 ? *(volatile __u64 *)c64 : 0;
		asm volatile("" : : "r"(x));
	}
#pragma unroll
	for (k = 0; k < XZ_OP25B_BATCH; k++) {
		xz_op25b_counter(b->idx[k], &c32, &c64);
		if (c32)
			__sync_fetch_and_add(c32, 1);
		else if (c64)
			__sync_fetch_and_add(c64, 1);
	}
}

/* Returns XZ_V_*: PASS, DROP, REJECT (the entry point answers via reply.h). */
static __always_inline int xz_pipeline(struct xz_pkt *p, const int role)
{
	int verdict = XZ_V_PASS, reason = XZ_R_OK;
	struct xz_class *cls = NULL, buf;
	struct xz_control *ctl;
	__u32 key = 0, flags, csam;
	__u64 ts;

	/* No control entry means no rule is on: fail open. */
	ctl = xz_control.lookup(&key);
	flags = ctl ? ctl->flags : 0;
	csam = ctl ? ctl->csam : 0;   /* read once: one packet, one list */
	if (flags & XZ_C_BYPASS) {
		reason = XZ_R_BYPASS;
		goto out;
	}
	/* Not Ethernet/VLAN/PPPoE + IPv4/IPv6 as we know it: fail open. */
	if (parse_frame(p) < 0) {
		reason = XZ_R_UNPARSED;
		goto out;
	}
	verdict = xz_subscriber_rules(p, role, flags, &reason, &cls, &buf);
	/* The state the rates will use (and the scan sketch, for a new conversation), loaded
	 * now so that its miss (with many subscribers) overlaps the CSAM lookups instead of
	 * following them. Only where the rates need it whatever the list says: a conversation
	 * of an unrated subscriber is left to the sketch, after the list (in the forwarding
	 * lab, loading it here for every SYN cost the CSAM drops 150-200 ns each and the SYNs
	 * that pass nothing measurable). Indexed state only: no LRU entry is inserted before
	 * the list has been checked. (Whether the packet opens a conversation is asked again
	 * below: a flag kept across the CSAM lookups doubles the paths the verifier walks.) */
	if (verdict == XZ_V_PASS && cls && ctl && (cls->pool_bits || cls->slot) &&
	    (flags & XZ_C_RATES) && xz_rated(cls, role, ctl))
		xz_state_prefetch(xz_state_of(p, cls, role), role,
				  role == XZ_ROLE_ACCESS && (flags & XZ_C_SCANS) && xz_scan_opens(p));
	/* The CSAM list applies to every packet from the access side, subscriber or not;
	 * one stopped already needs no lookup. */
	if (verdict == XZ_V_PASS && (role == XZ_ROLE_ACCESS || (flags & XZ_C_CSAM_CORE)) &&
	    xz_csam_listed(role == XZ_ROLE_ACCESS ? &p->dst : &p->src, p->family, csam)) {
		xz_csam_count(csam, p->family);
		reason = XZ_R_CSAM;
		verdict = role == XZ_ROLE_ACCESS && (flags & XZ_C_CSAM_REJECT) && xz_can_reply(p) &&
			  p->frag != XZ_FRAG_LATER ? XZ_V_REJECT : XZ_V_DROP;
	}
	/* A conversation the rules let the subscriber open: its destination into the scan
	 * sketch (before the rate limiter: an attempt held back by it is an attempt). */
	if (verdict == XZ_V_PASS && role == XZ_ROLE_ACCESS && cls && ctl && (flags & XZ_C_SCANS) &&
	    xz_scan_opens(p)) {
		struct xz_state *st = xz_state_of(p, cls, role);

		if (st)
			xz_scan_count(p, &st->scan, ctl->scan_epoch);
	}
	if (verdict == XZ_V_PASS && cls && ctl && (flags & XZ_C_RATES))
		verdict = xz_bandwidth(p, cls, role, ctl, &reason);
	/* The attempt, counted for the abuse rules and `top`, 16 at a time: a subscriber's in
	 * its state, an indexed pool address's in an array of its own (4 bytes an address, not
	 * its state's cold line); another pool address's (IPv6, LRU) at once. */
	if (reason == XZ_R_OP25B && cls) {
		if (cls->pool_bits) {
			xz_op25b_note(xz_pool_index(p, cls, role));
		} else if (cls->slot) {
			xz_op25b_note(cls->slot | XZ_OP25B_SLOT);
		} else {
			struct xz_state *st = xz_state_of(p, cls, role);

			if (st)
				__sync_fetch_and_add(&st->op25b, 1);
		}
	}
out:
	if (verdict != XZ_V_PASS && (flags & XZ_C_MONITOR))
		verdict = XZ_V_MONITOR;
	xz_count(role, verdict, reason, p->len);
	/* A sample of the drops for `xdpzoot trace` (trace.h). Never one that says who tried
	 * to reach the CSAM list: none for a CSAM drop, nor for a packet from or to a listed
	 * address that another rule stopped first. */
	if (verdict != XZ_V_PASS && (flags & XZ_C_TRACE) && ctl && reason != XZ_R_CSAM &&
	    (ts = xz_trace_take(ctl, reason)) && !xz_csam_listed(&p->src, p->family, csam) &&
	    !xz_csam_listed(&p->dst, p->family, csam))
		xz_trace_emit(p, ts, flags, role, verdict, reason, cls);
	return verdict;
}

#endif /* XDPZOOT_POLICY_H */
