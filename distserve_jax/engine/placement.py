"""`Placement`: how many prefill and decode instances run, each one's tp/pp, and on which devices.

Building a placement on a device list gives every instance `pp` disjoint sub-meshes of `tp`
devices each (one per pipeline stage); no device belongs to two instances. Bad placements
(overlapping or missing devices, too few devices, tp not dividing the heads, pp not dividing the
layers) are refused with a message that says why.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import yaml

from distserve_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class InstanceSpec:
    """One instance: `tp` x `pp` devices; `devices` (indices into the device list) or the next free ones."""

    tp: int = 1
    pp: int = 1
    devices: tuple[int, ...] | None = None

    def __post_init__(self):
        for name in ("tp", "pp"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"instance {name} must be a positive integer, got {v!r}")
        if self.devices is not None:
            object.__setattr__(self, "devices", tuple(int(d) for d in self.devices))
            if len(self.devices) != self.tp * self.pp:
                raise ValueError(f"instance with tp={self.tp}, pp={self.pp} needs {self.tp * self.pp} devices, "
                                 f"got {len(self.devices)} ids {list(self.devices)}")
            if len(set(self.devices)) != len(self.devices):
                raise ValueError(f"instance device ids repeat: {list(self.devices)}")

    @property
    def num_devices(self) -> int:
        return self.tp * self.pp

    def describe(self) -> str:
        return f"tp{self.tp}" + (f",pp{self.pp}" if self.pp > 1 else "")


@dataclasses.dataclass(frozen=True)
class AssignedInstance:
    role: str  # "prefill" or "decode"
    name: str
    spec: InstanceSpec
    stages: tuple[tuple[Any, ...], ...]  # pp tuples of tp devices


@dataclasses.dataclass(frozen=True)
class Placement:
    prefill: tuple[InstanceSpec, ...]
    decode: tuple[InstanceSpec, ...]

    def __post_init__(self):
        object.__setattr__(self, "prefill", tuple(self.prefill))
        object.__setattr__(self, "decode", tuple(self.decode))
        if not self.prefill or not self.decode:
            raise ValueError("a placement needs at least one prefill and one decode instance")

    @property
    def num_devices(self) -> int:
        return sum(i.num_devices for i in self.prefill + self.decode)

    def describe(self) -> str:
        def part(tag, insts):
            groups: list[list] = []  # runs of identical instances: [description, count]
            for i in insts:
                if groups and groups[-1][0] == i.describe():
                    groups[-1][1] += 1
                else:
                    groups.append([i.describe(), 1])
            return "+".join(f"{n}x{tag}({d})" if n > 1 else f"{tag}({d})" for d, n in groups)
        return f"{part('P', self.prefill)}+{part('D', self.decode)}"

    # ------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Placement":
        if not isinstance(d, dict) or set(d) - {"prefill", "decode"}:
            raise ValueError(f"a placement has keys 'prefill' and 'decode', got {sorted(d) if isinstance(d, dict) else d!r}")

        def insts(key):
            items = d.get(key) or []
            out = []
            for item in items:
                if not isinstance(item, dict) or set(item) - {"tp", "pp", "devices", "count"}:
                    raise ValueError(f"{key} instance must be a mapping of tp/pp/devices/count, got {item!r}")
                count = item.get("count", 1)
                kw = {k: v for k, v in item.items() if k != "count"}
                if count != 1 and "devices" in kw:
                    raise ValueError(f"{key} instance: 'count' and explicit 'devices' cannot be combined")
                out += [InstanceSpec(**kw) for _ in range(count)]
            return tuple(out)

        return cls(insts("prefill"), insts("decode"))

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Placement":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no placement file at {path}")
        return cls.from_dict(yaml.safe_load(path.read_text()))

    @classmethod
    def auto(cls, num_devices: int, cfg: ModelConfig | None = None) -> "Placement":
        """Half the devices prefill, half decode, one instance each, the largest tp that fits."""
        if num_devices < 2:
            raise ValueError(f"disaggregated serving needs at least 2 devices, found {num_devices}")
        tp = 1
        while tp * 2 <= num_devices // 2 and (cfg is None or _tp_ok(cfg, tp * 2)):
            tp *= 2
        return cls((InstanceSpec(tp=tp),), (InstanceSpec(tp=tp),))

    # ------------------------------------------------------------ validation + assignment
    def validate(self, cfg: ModelConfig) -> None:
        for role, insts in (("prefill", self.prefill), ("decode", self.decode)):
            for i, inst in enumerate(insts):
                try:
                    cfg.validate_tp(inst.tp)
                except ValueError as e:
                    raise ValueError(f"{role} instance {i}: {e}") from None
                if cfg.num_layers % inst.pp:
                    raise ValueError(f"{role} instance {i}: pp={inst.pp} does not divide the number of "
                                     f"layers ({cfg.num_layers})")

    def assign(self, devices: Sequence[Any], cfg: ModelConfig) -> list[AssignedInstance]:
        """Gives every instance its devices (explicit ids first, then the next free ones)."""
        self.validate(cfg)
        if self.num_devices > len(devices):
            raise ValueError(f"placement {self.describe()} needs {self.num_devices} devices, "
                             f"only {len(devices)} available")
        used: dict[int, str] = {}
        named = [(f"{role}-{i}", role, inst) for role, insts in (("prefill", self.prefill), ("decode", self.decode))
                 for i, inst in enumerate(insts)]
        ids: dict[str, list[int]] = {}
        for name, _, inst in named:
            if inst.devices is None:
                continue
            for d in inst.devices:
                if not 0 <= d < len(devices):
                    raise ValueError(f"{name}: device id {d} does not exist (devices 0..{len(devices) - 1})")
                if d in used:
                    raise ValueError(f"device sets overlap: device {d} is in both {used[d]} and {name}")
                used[d] = name
            ids[name] = list(inst.devices)
        free = [d for d in range(len(devices)) if d not in used]
        for name, _, inst in named:
            if inst.devices is None:
                if len(free) < inst.num_devices:
                    raise ValueError(f"{name} needs {inst.num_devices} devices but only {len(free)} are left")
                ids[name], free = free[:inst.num_devices], free[inst.num_devices:]
        out = []
        for name, role, inst in named:
            devs = [devices[d] for d in ids[name]]
            stages = tuple(tuple(devs[s * inst.tp:(s + 1) * inst.tp]) for s in range(inst.pp))
            out.append(AssignedInstance(role, name, inst, stages))
        return out


def _tp_ok(cfg: ModelConfig, tp: int) -> bool:
    try:
        cfg.validate_tp(tp)
        return True
    except ValueError:
        return False
