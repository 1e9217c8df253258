"""The ``xdpzoot`` command line: every operation an operator needs, ``--json`` on all
that reports. Exit codes: 0 ok, 1 operational error, 2 usage error."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import sys
import time
from collections.abc import Callable

import click

from xdpzoot import __version__, sync, tables
from xdpzoot.dataplane import kernel, layout, schema
from xdpzoot.dataplane.instance import Instance
from xdpzoot.sources.files import SourceError

ENV_PIN_DIR = "XDPZOOT_PIN_DIR"


class Ctx:
    """Global options, resolved lazily so that --help needs no root and no config."""

    def __init__(self, config_path: str | None, pin_dir: str):
        self.config_path = config_path
        self.pin_dir = pin_dir
        self._cfg = None
        self._inst: Instance | None = None

    @property
    def cfg(self):
        if self._cfg is None:
            from xdpzoot.config import load_config  # here: most commands never read the config

            self._cfg = load_config(self.config_path)
        return self._cfg

    def instance(self, config: bool = False) -> Instance:
        """The instance at --pin-dir (its maps opened from their pins when used); with
        ``config``, the config is read first (a bad one is the error a command reports)."""
        if self._inst is None:
            self._inst = Instance(self.pin_dir, self.cfg.defines() if config else None)
        elif config and self._inst.maps.defines is None:
            self._inst.maps.defines = self.cfg.defines()
        return self._inst


def _audit(o: Ctx, subscriber: int | str, action: str, rate_kbps: int | None = None,
           **values) -> None:
    """An operator's policy action, into the audit log that the daemon writes too.
    If it cannot be written: a warning, the action stands."""
    from xdpzoot.bandwidth import accounting, store

    b = o.cfg.bandwidth
    try:
        os.makedirs(os.path.dirname(b.audit) or ".", mode=0o700, exist_ok=True)
        log = store.AuditLog(b.audit, b.audit_retention_days * 86400)
        log.write([accounting.Action(time.time(), subscriber, "operator", action, rate_kbps,
                                     values)])
    except OSError as e:
        click.echo(f"xdpzoot: warning: audit log {b.audit}: {e.strerror}", err=True)


def _fail(msg: str) -> None:
    click.echo(f"xdpzoot: error: {msg}", err=True)
    sys.exit(1)


def _run(fn: Callable[[], None]) -> None:
    """Operational errors become one line on stderr and exit code 1."""
    try:
        fn()
    except (kernel.KernelError, SourceError, OSError) as e:
        _fail(str(e))


def _emit(as_json: bool, data, text: Callable[[], None]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=None, sort_keys=True, default=str))
    else:
        text()


EXAMPLES = """\b
Examples:
  xdpzoot attach --access eth1 --core eth0
  xdpzoot --pin-dir /run/xdpzoot/r1 attach --hook tc --access v1 --core v0
  xdpzoot subscribers load /etc/xdpzoot/subscribers.csv
  xdpzoot explain --in access --src 100.64.1.10 --dst 203.0.113.10 \\
      --proto tcp --dport 25
  xdpzoot stats 1 5
  xdpzoot status --json
"""


@click.group(epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", metavar="FILE", default=None,
              help="Config file (default /etc/xdpzoot/xdpzoot.toml).")
@click.option("--pin-dir", metavar="DIR", envvar=ENV_PIN_DIR,
              default=kernel.DEFAULT_PIN_DIR, show_default=True,
              help=f"BPF pin directory of this instance (or ${ENV_PIN_DIR}).")
@click.version_option(__version__, prog_name="xdpzoot", message="%(prog)s %(version)s")
@click.pass_context
def main(ctx: click.Context, config_path: str | None, pin_dir: str) -> None:
    """xdpzoot: an ISP edge router's rules at XDP/TC: OP25B, IP53B, the CSAM list,
    bandwidth control (rates, volume throttling, congestion), suspension, and RADIUS
    contracts."""
    ctx.obj = Ctx(config_path, os.path.abspath(pin_dir))


json_opt = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def _address(value: str) -> bytes:
    try:
        return tables.addr16(ipaddress.ip_address(value))
    except ValueError as e:
        raise click.BadParameter(f"not an IP address: {value}") from e


def _target(value: str) -> int | bytes:
    """A SUBSCRIBER argument: a subscriber id (an entry's 32-bit sub_id) or an address."""
    try:
        sid = int(value)
    except ValueError:
        return _address(value)
    if not 0 <= sid <= 0xFFFFFFFF:
        raise click.BadParameter(f"subscriber id {value} is out of range (0-4294967295)")
    return sid

def _entry_json(e: layout.Entry) -> dict:
    t = {v: k for k, v in schema.TYPES.items()}.get(e.type, str(e.type))
    return {"subscriber": e.sub_id, "type": t, "flags": schema.flag_names(e.flags),
            "up_kbps": e.up_kbps, "down_kbps": e.down_kbps,
            "session": bool(e.flags & schema.C["XZ_F_SESSION"])}

def _change_text(c: sync.Change) -> str:
    return f"{c.added} added, {c.changed} changed, {c.removed} removed"

def _progress(total: int, label: str):
    """A progress bar on stderr for loads that take more than a moment."""
    if total < 20000 or not sys.stderr.isatty():
        return None, None
    bar = click.progressbar(length=total, label=label, file=sys.stderr)
    return bar, bar.update


@contextlib.contextmanager
def _writing(o: Ctx, label: str):
    """For a command that loads a source into the maps: the instance, locked (and created
    if it was not yet: attach finds the maps), and a progress callback for the write, whose
    bar is finished however the write ends."""
    kernel.check_layout(o.pin_dir, o.cfg.defines())   # limits too: it writes
    inst = o.instance()
    bars = []

    def progress(total: int):
        bar, step = _progress(total, label)
        bars.extend([bar] if bar else [])
        return step

    with inst.locked():
        if not inst.loaded():
            inst.create(o.cfg.defines())
        try:
            yield inst, progress
        finally:
            for bar in bars:
                bar.render_finish()


# Each command group registers itself on ``main``.
from . import bandwidth, blocklist, dataplane, explain, lab, radius, subscribers  # noqa: E402, F401, I001

if __name__ == "__main__":
    main()
