"""Probe programs for the benchmark's cost breakdown.

Extra XDP entry points appended to the data plane's own source (bpf/ is not
touched): each runs a prefix of the pipeline built from the same inline
functions, so the differences between them price one step each. Compiled into
the same pin directory, they share the maps (and their 1M entries) with the
data plane under test.
"""

from __future__ import annotations

from xdpzoot.dataplane import kernel

PROBES_C = r"""
static __always_inline int xzb_start(struct xdp_md *ctx, struct xz_pkt *p)
{
	p->data = (void *)(long)ctx->data;
	p->end = (void *)(long)ctx->data_end;
	p->len = p->end - p->data;
	return parse_frame(p);
}

/* Parse only: Ethernet .. TCP, the result used so that it is not optimised away. */
int xzb_parse(struct xdp_md *ctx)
{
	struct xz_pkt p = {};

	if (xzb_start(ctx, &p) < 0)
		return XDP_ABORTED;
	return p.dport == 443 && p.src.addr[15] != 0xee ? XDP_PASS : XDP_DROP;
}

/* Parse + the host hash lookup of the source. */
int xzb_parse_hash(struct xdp_md *ctx)
{
	struct xz_pkt p = {};

	if (xzb_start(ctx, &p) < 0)
		return XDP_ABORTED;
	return xz_hosts.lookup(&p.src) ? XDP_PASS : XDP_DROP;
}

/* Parse + the prefix trie lookup of the source, no hash lookup. */
int xzb_parse_lpm(struct xdp_md *ctx)
{
	struct xz_pkt p = {};
	struct xz_lpm_key key = { .prefixlen = 128 };

	if (xzb_start(ctx, &p) < 0)
		return XDP_ABORTED;
	__builtin_memcpy(key.addr, p.src.addr, 16);
	return xz_prefixes.lookup(&key) ? XDP_PASS : XDP_DROP;
}

/* Parse + the subscriber directory's state of the source. */
int xzb_parse_dir(struct xdp_md *ctx)
{
	struct xz_pkt p = {};
	__u32 zero = 0;

	if (xzb_start(ctx, &p) < 0)
		return XDP_ABORTED;
	return xz_dir_state(xz_sub_dir.lookup(&zero), &p.src) == 1 ? XDP_PASS : XDP_DROP;
}

/* Parse + the source's class as the pipeline finds it (directory, hash or trie). */
int xzb_parse_class(struct xdp_md *ctx)
{
	struct xz_pkt p = {};
	struct xz_class buf;

	if (xzb_start(ctx, &p) < 0)
		return XDP_ABORTED;
	return xz_classify(&p.src, p.family, &buf) ? XDP_PASS : XDP_DROP;
}

/*
 * The machine's memory, for scale: parse + one load at a random index (a hash of the
 * source address) of an array of its own, within its first 2^14 entries of 128 bytes (2
 * MiB: the rate state that the 10k scale touches) or all 2^20 (128 MiB: the 1M scale's).
 */
struct xzb_entry {
	__u64 w[16];
};
BPF_ARRAY(xzb_mem, struct xzb_entry, 1 << 20);

static __always_inline int xzb_mem_load(struct xdp_md *ctx, int bits)
{
	struct xz_pkt p = {};
	struct xzb_entry *e;
	__u32 i;

	if (xzb_start(ctx, &p) < 0)
		return XDP_ABORTED;
	i = (*(__u32 *)&p.src.addr[12] * XZ_CSAM_HASH) >> (32 - bits);
	e = xzb_mem.lookup(&i);
	return e && *(volatile __u64 *)&e->w[0] == 1 ? XDP_DROP : XDP_PASS;
}

int xzb_mem_2m(struct xdp_md *ctx)
{
	return xzb_mem_load(ctx, 14);
}

int xzb_mem_128m(struct xdp_md *ctx)
{
	return xzb_mem_load(ctx, 20);
}

/* Parse + control lookup + counter update: the pipeline without classification. */
int xzb_parse_count(struct xdp_md *ctx)
{
	struct xz_pkt p = {};
	struct xz_control *ctl;
	__u32 key = 0;

	ctl = xz_control.lookup(&key);
	if (ctl && (ctl->flags & XZ_C_BYPASS))
		return XDP_ABORTED;
	if (xzb_start(ctx, &p) < 0)
		return XDP_ABORTED;
	xz_count(XZ_ROLE_ACCESS, XZ_V_PASS, XZ_R_OK, p.len);
	return XDP_PASS;
}
"""

# name -> what it adds, in pipeline order
PROBES = {
    "xzb_parse": "parse only (Ethernet .. TCP)",
    "xzb_parse_count": "parse + control + counter",
    "xzb_parse_hash": "parse + host hash lookup",
    "xzb_parse_lpm": "parse + prefix trie lookup",
    "xzb_parse_dir": "parse + subscriber directory",
    "xzb_parse_class": "parse + source class",
    "xzb_mem_2m": "parse + a random load, 2 MiB array",
    "xzb_mem_128m": "parse + a random load, 128 MiB array",
}


def compile_probes(pin_dir: str, defines: list[str]):
    """The data plane source plus the probes, compiled against the maps pinned in
    ``pin_dir`` (created by the data plane under test, so shared with it)."""
    from bcc import BPF

    text = kernel.program_source() + "\n" + PROBES_C
    try:
        return BPF(text=text.encode(), cflags=kernel.cflags(pin_dir, defines))
    except Exception as e:  # bcc raises bare Exception
        raise kernel.KernelError(f"probe compile failed: {e}") from e


def load_probes(bpf) -> dict[str, int]:
    """Probe name -> program fd."""
    return {name: kernel.load_named(bpf, name) for name in PROBES}
