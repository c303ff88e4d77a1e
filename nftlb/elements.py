"""Pure: the elements each pool puts into the table's shared maps and sets.

The templates spell objects and rules; elements are data, spelled here once, so that the
whole-table script and the small update transactions cannot disagree (and because a
10,000-pool table has 300,000 of them: Python formats them in a fraction of a second,
template macros would take many seconds).

Every element is keyed by what `delete element` takes. Names pass the same identifier
check as in the templates; addresses are ipaddress objects.
"""

from __future__ import annotations

from nftlb import names
from nftlb.allowlist import ident
from nftlb.plan import Plan, PoolPlan


def _service(p: PoolPlan) -> str:
    return f"{p.vip} . {p.protocol} . {p.port}"


def of_pool(p: PoolPlan) -> dict[str, dict[str, str]]:
    """Object name -> {key: element} for one pool."""
    name = ident(p.name)
    service, vip = _service(p), f"{p.vip} . {p.port}"
    out: dict[str, dict[str, str]] = {names.pools(p.fam): {service: service}}  # what the accounting counts
    # a pool without a backend for new connections goes to the `refuse` chain: answered at once
    out[names.services(p.fam)] = {service: f'{service} comment "{name}" : goto {ident(p.chain or names.REFUSE)}'}
    if p.kind == "direct":
        out[names.direct(p.fam, p.protocol)] = {vip: f'{vip} comment "{name}" : {p.slots[0].nft}'}
    elif p.slots:
        out[names.slots(p.fam, p.protocol)] = {f"{vip} . {i}": f"{vip} . {i} : {b.nft}" for i, b in enumerate(p.slots)}
    if p.mode == "masquerade":
        out[names.masquerade(p.fam, p.protocol)] = {vip: f'{vip} comment "{name}"'}
    if p.persistence:
        out[names.persist(p.fam, p.protocol, p.persistence)] = {vip: f'{vip} comment "{name}"'}
    return out


def of_plan(plan: Plan) -> dict[str, list[str]]:
    """Object name -> its elements, pools in file order."""
    out: dict[str, list[str]] = {}
    for p in plan.pools:
        for obj, items in of_pool(p).items():
            out.setdefault(obj, []).extend(items.values())
    return out


def sticky_key(client: str, p: PoolPlan) -> str:
    """A remembered client of pool `p` in its persistence map."""
    return f"{client} . {p.vip} . {p.port}"
