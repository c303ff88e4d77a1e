"""Random but reproducible pools files and statuses, for update-engine tests (unit and kernel)."""

import random

from nftlb import plan, pools_file, schema


def random_config(rng: random.Random, max_pools: int = 6) -> str:
    lines = ["seed: 0x5eed"]
    if rng.random() < 0.4:  # path probes: the table's SNAT rules for them come and go
        source = rng.choice(['[203.0.113.250, "2001:db8:ffff::250"]', '[203.0.113.251, "2001:db8:ffff::251"]'])
        lines.append(f"health: {{path: true, path_source: {source}}}")
    lines.append("pools:")
    names = rng.sample(["web", "api", "dns", "mail", "db", "cache", "ssh", "ntp"], rng.randint(0, max_pools))
    for i, name in enumerate(names):
        v6 = rng.random() < 0.3
        protocol = rng.choice(["tcp", "udp"])
        vip = f'"2001:db8::{i + 1}"' if v6 else f"198.51.100.{i + 1}"
        mode = rng.choice(["dnat", "masquerade"])
        lines += [f"  - name: {name}", f"    vip: {vip}", f"    port: {rng.choice([53, 80, 443])}",
                  f"    protocol: {protocol}", f"    mode: {mode}",
                  f"    scheduler: {rng.choice(['hash', 'source-hash', 'round-robin', 'random'])}",
                  f"    when_all_down: {rng.choice(['reject', 'keep-last'])}", "    backends:"]
        for n in rng.sample(range(11, 20), rng.randint(1, 4)):
            addr = f'"fd00:b::{n}"' if v6 else f"10.0.{i}.{n}"
            state = "drain" if rng.random() < 0.15 else "active"
            lines.append(f"      - {{address: {addr}, port: {8000 + i}, weight: {rng.randint(1, 4)}, "
                         f"state: {state}, backup: {str(rng.random() < 0.2).lower()}}}")
    if not names:
        lines[-1] = "pools: []"
    return "\n".join(lines) + "\n"


def random_conditions(rng: random.Random, config: schema.Config) -> plan.Conditions:
    down, drained = set(), set()
    for p in config.pools:
        for b in p.backends:
            key = (p.name, plan.Endpoint(b.address, b.port).display)
            if rng.random() < 0.3:
                down.add(key)
            if rng.random() < 0.1:
                drained.add(key)
    return plan.Conditions(frozenset(down), frozenset(drained), {})


def random_plans(seed: int, steps: int):
    """A walk of plans: sometimes the file changes, sometimes only the status."""
    rng = random.Random(seed)
    config = pools_file.parse(random_config(rng))
    for _ in range(steps):
        if rng.random() < 0.5:
            config = pools_file.parse(random_config(rng))
        yield plan.build(config, random_conditions(rng, config))
