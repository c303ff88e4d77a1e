"""Two questions to nf_tables over a netfilter netlink socket, without nft: the ruleset
generation, and whether a table exists. One request each, where nft would list far more
(`list tables` next to a 10,000-pool table costs seconds).

The constants are the kernel's (linux/netlink.h, linux/netfilter/nfnetlink.h,
linux/netfilter/nf_tables.h), by their names there.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

from nftlb.errors import KernelError

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NFPROTO_UNSPEC, NFPROTO_INET = 0, 1
NFT_MSG_NEWTABLE, NFT_MSG_GETTABLE, NFT_MSG_GETGEN = 0, 1, 16
NFTA_TABLE_NAME = 1
NFTA_GEN_ID = 1
NLA_TYPE_MASK = 0x7FFF  # an attribute's type, without the nested and byte-order flags
NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
NFGENMSG = struct.Struct("=BBH")  # family, version, resource id
NLATTR = struct.Struct("=HH")  # length, type


def _request(msg_type: int, flags: int, family: int, attrs: bytes, what: str) -> tuple[int, bytes]:
    """One nftables request: (the answer's message type, the answer). An NLMSG_ERROR answer is
    returned as it is: its errno is the caller's to judge."""
    body = NFGENMSG.pack(family, 0, 0) + attrs
    kind = (NFNL_SUBSYS_NFTABLES << 8) | msg_type
    message = NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | flags, 1, 0) + body
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    except OSError as e:
        raise KernelError(f"cannot open a netfilter netlink socket: {e.strerror}") from None
    with sock:
        try:
            sock.settimeout(5)
            sock.bind((0, 0))
            sock.send(message)
            data = sock.recv(65536)
        except OSError as e:
            raise KernelError(f"{what} failed: {e.strerror or e}") from None
    return struct.unpack_from("=H", data, 4)[0], data


def _errno(data: bytes) -> int:
    """An NLMSG_ERROR answer's error: 0 is an acknowledgement, else the errno."""
    return -struct.unpack_from("=i", data, NLMSGHDR.size)[0]


def _failed(what: str, err: int) -> KernelError:
    from nftlb.kernel.nft import kernel_error  # the CAP_NET_ADMIN hint lives there

    return kernel_error(f"{what} failed", os.strerror(err))


def generation() -> int:
    """NFT_MSG_GETGEN: the ruleset generation of this network namespace (+1 per commit)."""
    what = "asking the kernel for the nftables generation"
    kind, data = _request(NFT_MSG_GETGEN, 0, NFPROTO_UNSPEC, b"", what)
    if kind == NLMSG_ERROR:
        raise _failed(what, _errno(data))
    length = struct.unpack_from("=I", data, 0)[0]
    offset = NLMSGHDR.size + NFGENMSG.size
    while offset + NLATTR.size <= min(length, len(data)):
        size, attr = NLATTR.unpack_from(data, offset)
        if attr & NLA_TYPE_MASK == NFTA_GEN_ID and size >= 8:
            return struct.unpack_from(">I", data, offset + NLATTR.size)[0]  # u32, network byte order
        offset += max(NLATTR.size, (size + 3) & ~3)
    raise KernelError("the kernel's answer carried no nftables generation")


def has_table(name: str) -> bool:
    """NFT_MSG_GETTABLE for `inet NAME`: does it exist?"""
    raw = name.encode() + b"\0"
    attr = NLATTR.pack(NLATTR.size + len(raw), NFTA_TABLE_NAME) + raw + b"\0" * (-len(raw) % 4)
    what = f"asking the kernel for table inet {name}"
    kind, data = _request(NFT_MSG_GETTABLE, NLM_F_ACK, NFPROTO_INET, attr, what)
    if kind == NLMSG_ERROR:
        err = _errno(data)
        if err == errno.ENOENT:
            return False
        if err:
            raise _failed(what, err)
    return kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE  # the table's description: it exists
