"""What the simulator runs: a deployment's instances (role, tp, pp, devices, nodes, KV blocks),
its engine limits, and the placement YAML the server loads (`configs/placements/*.yaml`,
`engine/placement.py`).

A deployment is `disaggregated` (prefill and decode instances), `colocated` or `chunked`
(replicas running both phases, pp = 1 as the engine builds them). Devices are numbered over the
cluster; device d is on node d // gpus_per_node. Instances without explicit devices get the next
free ones, in order, as `Placement.assign` does.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import yaml

MODES = ("disaggregated", "colocated", "chunked")


class DeploymentError(ValueError):
    """A deployment that cannot be built (bad roles, overlapping or missing devices, ...)."""


@dataclasses.dataclass(frozen=True)
class SimInstance:
    name: str
    role: str  # "prefill", "decode" or "colocated"
    tp: int
    pp: int
    devices: tuple[int, ...]
    num_blocks: int | None = None  # KV blocks (null page included); None: from the profile

    @property
    def num_devices(self) -> int:
        return self.tp * self.pp

    def stage_nodes(self, gpus_per_node: int) -> tuple[int, ...]:
        """The node of each pipeline stage (its first device's)."""
        return tuple(self.devices[s * self.tp] // gpus_per_node for s in range(self.pp))


@dataclasses.dataclass(frozen=True)
class Deployment:
    """Instances plus the engine limits they run under (the server's flags of the same names)."""

    mode: str
    instances: tuple[SimInstance, ...]
    gpus_per_node: int = 8
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    async_scheduling: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise DeploymentError(f"unknown mode {self.mode!r}; expected one of {MODES}")
        roles = {i.role for i in self.instances}
        want = {"prefill", "decode"} if self.mode == "disaggregated" else {"colocated"}
        if roles != want:
            raise DeploymentError(f"a {self.mode} deployment needs instances of roles {sorted(want)}, got "
                                  f"{sorted(roles)}")
        seen: dict[int, str] = {}
        for i in self.instances:
            if len(i.devices) != i.num_devices:
                raise DeploymentError(f"{i.name}: tp={i.tp} x pp={i.pp} needs {i.num_devices} devices, got {i.devices}")
            for d in i.devices:
                if d in seen:
                    raise DeploymentError(f"device {d} is in both {seen[d]} and {i.name}")
                seen[d] = i.name

    @property
    def num_devices(self) -> int:
        return sum(i.num_devices for i in self.instances)

    def describe(self) -> str:
        def part(tag: str, insts: list[SimInstance]) -> str:
            groups: list[list[Any]] = []
            for i in insts:
                d = f"tp{i.tp}" + (f",pp{i.pp}" if i.pp > 1 else "")
                if groups and groups[-1][0] == d:
                    groups[-1][1] += 1
                else:
                    groups.append([d, 1])
            return "+".join(f"{n}x{tag}({d})" if n > 1 else f"{tag}({d})" for d, n in groups)
        if self.mode != "disaggregated":
            return part(self.mode, list(self.instances))
        return (part("P", [i for i in self.instances if i.role == "prefill"]) + "+"
                + part("D", [i for i in self.instances if i.role == "decode"]))

    def with_limits(self, **kw: Any) -> "Deployment":
        return dataclasses.replace(self, **kw)

    # ------------------------------------------------------------------ placements
    def to_placement_dict(self) -> dict[str, list[dict[str, Any]]]:
        """The placement YAML's content (explicit device ids; `Placement.from_dict` reads it)."""
        if self.mode != "disaggregated":
            raise DeploymentError(f"a placement file describes a disaggregated deployment, not {self.mode!r}")
        out: dict[str, list[dict[str, Any]]] = {"prefill": [], "decode": []}
        for i in self.instances:
            item: dict[str, Any] = {"tp": i.tp}
            if i.pp > 1:
                item["pp"] = i.pp
            item["devices"] = list(i.devices)
            out[i.role].append(item)
        return out

    def write_placement(self, path: str | Path, header: str = "") -> None:
        text = yaml.safe_dump(self.to_placement_dict(), default_flow_style=None, sort_keys=False)
        lines = "".join(f"# {h}\n" for h in header.splitlines()) if header else ""
        Path(path).write_text(lines + text)


def build(mode: str, specs: Sequence[tuple[str, int, int]], **limits: Any) -> Deployment:
    """A deployment of `(role, tp, pp)` instances on consecutive devices, named as the engine names them."""
    counts: dict[str, int] = {}
    insts, nxt = [], 0
    for role, tp, pp in specs:
        k = counts.get(role, 0)
        counts[role] = k + 1
        name = f"{role}-{k}" if mode == "disaggregated" else f"{mode}-{k}"
        insts.append(SimInstance(name, role, tp, pp, tuple(range(nxt, nxt + tp * pp))))
        nxt += tp * pp
    return Deployment(mode, tuple(insts), **limits)


def from_placement(placement: Any, **limits: Any) -> Deployment:
    """A disaggregated deployment from a placement (`engine.placement.Placement`, a YAML path or its dict)."""
    from distserve_jax.engine.placement import Placement  # pure Python (yaml); no runtime

    if isinstance(placement, (str, Path)):
        placement = Placement.from_yaml(placement)
    elif isinstance(placement, dict):
        placement = Placement.from_dict(placement)
    named = [(f"{role}-{i}", role, inst) for role, insts in (("prefill", placement.prefill), ("decode", placement.decode))
             for i, inst in enumerate(insts)]
    used = {d for _, _, inst in named if inst.devices for d in inst.devices}
    free = iter(d for d in range(placement.num_devices + len(used) + 1_000_000) if d not in used)
    insts = []
    for name, role, inst in named:
        devs = tuple(inst.devices) if inst.devices is not None else tuple(next(free) for _ in range(inst.num_devices))
        insts.append(SimInstance(name, role, inst.tp, inst.pp, devs))
    return Deployment("disaggregated", tuple(insts), **limits)
