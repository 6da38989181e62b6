"""The kernel modules of the guest image: which it carries, in what form, and the index
its modprobe reads.

Two kinds of modules go in:

- the agent's own (``builder.GUEST_MODULES``): stored as they are (finit_module(2)
  reads the file) and listed in load order, for the start or for an on-demand group
  (``carapace.guest.module_list``);
- the modules workloads need (``WORKLOAD_MODULES``: netfilter for iptables and nft,
  bridge, veth, tun, vxlan, IPVS, ipset, overlay, fuse...) and what they depend on.
  Nothing loads these at start: the guest kernel asks for one when a workload first
  needs it (request_module runs the image's modprobe, ``carapace.guest.modprobe``). They are
  stored gzip-compressed (``.ko.gz``; about a quarter of the size), since every byte
  of the initramfs is unpacked at every boot and stays in the guest's memory;
  modprobe inflates the one it loads.

The index is the host's ``modules.dep``, ``modules.alias`` and ``modules.softdep``
(from Debian's linux-image package, made by depmod) cut down to the modules the
image carries, with their paths as the image stores them.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path

from carapace.errors import ImageError
from carapace.guest import module_list
from carapace.guest.modprobe import ModuleIndex, module_name
from carapace.image.sources import (
    module_closure,
    module_lists,
    parse_modules_dep,
    strip_module_signature,
)

#: Modules loaded only when a workload needs them (the kernel's request_module), by
#: what they are for; their dependencies come from modules.dep.
WORKLOAD_MODULES: dict[str, tuple[str, ...]] = {
    # iptables-nft and nft: the tables, NAT and conntrack, and nft_compat, through which
    # iptables-nft uses the x_tables matches and targets below
    "nftables": (
        "nfnetlink",
        "nf_tables",
        "nft_chain_nat",
        "nft_nat",
        "nft_masq",
        "nft_redir",
        "nft_ct",
        "nft_compat",
        "nft_reject_inet",
        "nft_reject_ipv4",
        "nft_reject_ipv6",
        "nft_fib_inet",
        "nft_fib_ipv4",
        "nft_fib_ipv6",
        "nft_limit",
        "nft_log",
        "nft_hash",
        "nft_numgen",
        "nft_quota",
        "nft_socket",
        "nft_tproxy",
        "nft_objref",
        "nft_connlimit",
        "nf_conntrack_netlink",
    ),
    # x_tables matches and targets that service meshes, kube-proxy and CNI plugins use
    "xtables": (
        "xt_tcpudp",
        "xt_REDIRECT",
        "xt_MASQUERADE",
        "xt_nat",
        "xt_conntrack",
        "xt_state",
        "xt_comment",
        "xt_mark",
        "xt_connmark",
        "xt_multiport",
        "xt_addrtype",
        "xt_owner",
        "xt_TPROXY",
        "xt_socket",
        "xt_CT",
        "xt_statistic",
        "xt_recent",
        "xt_limit",
        "xt_physdev",
        "xt_LOG",
        "nf_log_syslog",
        "xt_NFLOG",
        "nfnetlink_log",
        "xt_mac",
        "xt_iprange",
        "xt_ipvs",
        "xt_pkttype",
        "xt_length",
        "xt_bpf",
        "xt_u32",
        "xt_hl",
        "xt_HL",
        "xt_TCPMSS",
        "xt_tcpmss",
        "xt_NFQUEUE",
        "nfnetlink_queue",
        "xt_set",
        "xt_CHECKSUM",
        "xt_string",
        "xt_cgroup",
        "xt_policy",
        "xt_esp",
        "xt_sctp",
        "xt_dscp",
        "xt_DSCP",
        "xt_ecn",
        "xt_quota",
        "xt_time",
        "xt_connlimit",
        "xt_hashlimit",
        "xt_helper",
        "xt_devgroup",
    ),
    # iptables-legacy's tables (it loads ip_tables itself with the container's modprobe)
    "iptables-legacy": (
        "ip_tables",
        "iptable_filter",
        "iptable_nat",
        "iptable_mangle",
        "iptable_raw",
        "iptable_security",
        "ipt_REJECT",
        "ipt_rpfilter",
        "ip6_tables",
        "ip6table_filter",
        "ip6table_nat",
        "ip6table_mangle",
        "ip6table_raw",
        "ip6table_security",
        "ip6t_REJECT",
        "ip6t_rpfilter",
    ),
    "ipset": (
        "ip_set",
        "ip_set_hash_ip",
        "ip_set_hash_net",
        "ip_set_hash_ipport",
        "ip_set_hash_ipportip",
        "ip_set_hash_ipportnet",
        "ip_set_hash_netport",
        "ip_set_hash_netiface",
        "ip_set_bitmap_port",
        "ip_set_list_set",
    ),
    "ipvs": (
        "ip_vs",
        "ip_vs_rr",
        "ip_vs_wrr",
        "ip_vs_lc",
        "ip_vs_wlc",
        "ip_vs_sh",
        "ip_vs_mh",
        "ip_vs_sed",
        "ip_vs_nq",
    ),
    "links": (
        "bridge",
        "br_netfilter",
        "veth",
        "tun",
        "vxlan",
        "geneve",
        "macvlan",
        "ipvlan",
        "dummy",
        "8021q",
    ),
    "filesystems": ("overlay", "fuse"),
}

#: The index files modprobe reads, cut down to the image's modules.
INDEX_FILES = ("modules.dep", "modules.alias", "modules.softdep")
COMPRESSED = ".gz"


def workload_modules(groups: Mapping[str, Iterable[str]] = WORKLOAD_MODULES) -> list[str]:
    """Every module of ``groups``, each once, in order."""
    out: list[str] = []
    for names in groups.values():
        out += [n for n in names if n not in out]
    return out


def with_soft_dependencies(index: ModuleIndex, names: Iterable[str]) -> list[str]:
    """``names``, then the modules their modules.softdep lines name (``pre:`` and
    ``post:``, an alias standing for every module it matches), for them and for what
    they depend on, until nothing is added: modprobe loads them along (libcrc32c, which
    nf_tables needs, fails without its ``pre: crc32c``)."""
    out = list(dict.fromkeys(n.replace("-", "_") for n in names))
    todo = list(out)
    while todo:
        name = todo.pop(0)
        if name not in index.paths:
            raise ImageError(f"kernel module {name!r} not found in modules.dep")
        for m in [name, *sorted(index.dependencies(name))]:
            for soft in index.pre.get(m, []) + index.post.get(m, []):
                for found in index.resolve(soft):
                    if found not in out:
                        out.append(found)
                        todo.append(found)
    return out


def image_module_paths(
    modules_dep: str, agent_lists: Mapping[str, Iterable[str]], workload: Iterable[str]
) -> dict[str, str]:
    """Where the image stores each module it carries: {host path: image path}, both
    relative to /lib/modules/<release>. The agent's modules (``agent_lists``, from
    ``sources.module_lists``) keep their path; the ``workload`` modules and their
    dependencies that are not among them get ``.gz`` appended (stored compressed)."""
    paths = {p: p for order in agent_lists.values() for p in order}
    for p in module_closure(modules_dep, workload):
        paths.setdefault(p, p + COMPRESSED)
    return paths


def module_index(
    paths: Mapping[str, str], modules_dep: str, modules_alias: str, modules_softdep: str
) -> dict[str, str]:
    """The text of modules.dep, modules.alias and modules.softdep for the modules of
    ``paths`` ({host path: image path}): their lines of the host's files, in its order,
    with the image's paths. A dependency the image lacks is an ImageError (modprobe
    could not load the module)."""
    deps = parse_modules_dep(modules_dep)
    names = {module_name(p) for p in paths}
    dep_lines: list[str] = []
    for path, needs in deps.items():
        if path not in paths:
            continue
        missing = [d for d in needs if d not in paths]
        if missing:
            raise ImageError(f"module {path} needs {', '.join(missing)}, which the image lacks")
        dep_lines.append(f"{paths[path]}: {' '.join(paths[d] for d in needs)}".rstrip())
    absent = sorted(set(paths) - set(deps))
    if absent:
        raise ImageError(f"modules not in modules.dep: {', '.join(absent)}")
    alias_lines = ["# Aliases of the modules of the carapace guest image."]
    for line in modules_alias.splitlines():
        words = line.split()
        if len(words) == 3 and words[0] == "alias" and module_name(words[2]) in names:
            alias_lines.append(" ".join(words))
    soft_lines = ["# Soft dependencies of the modules of the carapace guest image."]
    for line in modules_softdep.splitlines():
        words = line.split()
        if len(words) > 2 and words[0] == "softdep" and module_name(words[1]) in names:
            soft_lines.append(" ".join(words))
    return {
        "modules.dep": "\n".join(dep_lines) + "\n",
        "modules.alias": "\n".join(alias_lines) + "\n",
        "modules.softdep": "\n".join(soft_lines) + "\n",
    }


def gzip_module(data: bytes) -> bytes:
    """``data`` as gzip (what kmod reads from a .ko.gz and modprobe inflates), the same
    bytes for the same input: zlib's gzip header carries no name and time stamp 0."""
    c = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


def module_files(
    moddir: Path,
    release: str,
    agent_modules: Iterable[str],
    on_demand: dict[str, tuple[str, ...]],
    workload: Iterable[str],
) -> dict[str, bytes]:
    """The initramfs files of the modules (path in the image -> contents): each module
    without its signature (the guest kernel then skips checking it at every load,
    which guards nothing: the host that supplies the modules supplies the kernel too),
    the agent's load lists, and the index for the image's modprobe."""
    texts: dict[str, str] = {}
    for name in INDEX_FILES:
        try:
            texts[name] = (moddir / name).read_text()
        except FileNotFoundError:
            if name == "modules.dep":
                raise ImageError(
                    f"cannot read {moddir}/modules.dep; is linux-image-{release} installed?"
                ) from None
            texts[name] = ""
        except OSError as e:
            raise ImageError(f"cannot read {moddir}/{name}: {e.strerror}") from e
    lists = module_lists(texts["modules.dep"], agent_modules, on_demand)
    host_index = ModuleIndex.parse(
        texts["modules.dep"], texts["modules.alias"], texts["modules.softdep"]
    )
    paths = image_module_paths(
        texts["modules.dep"], lists, with_soft_dependencies(host_index, workload)
    )
    root = f"lib/modules/{release}"
    out: dict[str, bytes] = {}
    for host, image in paths.items():
        data = strip_module_signature((moddir / host).read_bytes())
        out[f"{root}/{image}"] = gzip_module(data) if image != host else data
    for group, order in lists.items():
        listing = "".join(f"/{root}/{p}\n" for p in order)
        out[module_list(group).lstrip("/")] = listing.encode()
    index = module_index(
        paths, texts["modules.dep"], texts["modules.alias"], texts["modules.softdep"]
    )
    for name, text in index.items():
        out[f"{root}/{name}"] = text.encode()
    return out


def modprobe_script(python: str, lib: str) -> str:
    """The image's modprobe (``carapace.guest.modprobe.PROGRAM``, which the agent names
    in /proc/sys/kernel/modprobe): CPython, isolated and without site, running
    ``carapace.guest.modprobe`` straight from its directory, last on sys.path (not
    through the carapace package, whose imports it does not need: the kernel waits
    while it starts)."""
    return (
        f"#!{python} -IS\n"
        "import sys\n"
        f'sys.path.append("{lib}/carapace/guest")\n'
        "from modprobe import main\n"
        "sys.exit(main())\n"
    )
