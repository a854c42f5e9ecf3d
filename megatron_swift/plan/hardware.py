"""The devices a plan is for: memory, peak FLOP/s and link bandwidths, with the assumptions stated.

Figures are vendor data sheets (dense bf16 / fp8 tensor-core peaks without sparsity, HBM capacity and
bandwidth, NVLink bandwidth per direction, one NIC per GPU). `memory_gib` is what
`torch.cuda.get_device_properties().total_memory` reports, a little under the marketing size.
Efficiencies are assumptions, not measurements: matrix multiplies of a training step at half the
peak, collectives at 80% of the link's bandwidth (both overridable from the command line).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

GIB = 1 << 30


@dataclass(frozen=True)
class Device:
    name: str
    memory_gib: float
    bf16_flops: float  # dense peak FLOP/s
    fp8_flops: float | None
    hbm_bytes_s: float  # memory bandwidth (optimizer step, memory-bound)
    intra_node_bytes_s: float  # NVLink (or PCIe) per GPU per direction
    inter_node_bytes_s: float  # network per GPU per direction


DEVICES = {
    "h100": Device("H100 SXM 80GB", 79.1, 989e12, 1979e12, 3.35e12, 450e9, 50e9),
    "h800": Device("H800 SXM 80GB", 79.1, 989e12, 1979e12, 3.35e12, 200e9, 50e9),
    "h200": Device("H200 SXM 141GB", 139.8, 989e12, 1979e12, 4.8e12, 450e9, 50e9),
    "h20": Device("H20 96GB", 95.0, 148e12, 296e12, 4.0e12, 450e9, 50e9),
    "b200": Device("B200 180GB", 178.0, 2250e12, 4500e12, 8.0e12, 900e9, 50e9),
    "a100": Device("A100 SXM 80GB", 79.2, 312e12, None, 2.04e12, 300e9, 25e9),
    "a100-40gb": Device("A100 SXM 40GB", 39.4, 312e12, None, 1.56e12, 300e9, 25e9),
    "a800": Device("A800 SXM 80GB", 79.2, 312e12, None, 2.04e12, 200e9, 25e9),
    "l40s": Device("L40S 48GB", 44.4, 362e12, 733e12, 0.86e12, 32e9, 25e9),
}


@dataclass(frozen=True)
class Cluster:
    """`nodes` x `gpus_per_node` devices of one kind, and how efficiently a step uses them."""

    device: Device
    gpus_per_node: int = 8
    nodes: int = 1
    compute_efficiency: float = 0.5  # achieved / peak FLOP/s of the step's matrix multiplies
    comm_efficiency: float = 0.8  # achieved / nominal bandwidth of collectives
    # Memory the estimate does not see but the device must hold: CUDA context, NCCL buffers, allocator
    # fragmentation. A layout fits when its estimated total plus this stays within the device's memory.
    reserve_gib: float = 4.0

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def memory_bytes(self) -> int:
        return int(self.device.memory_gib * GIB)

    @property
    def usable_bytes(self) -> int:
        return int((self.device.memory_gib - self.reserve_gib) * GIB)

    def link_bytes_s(self, span: int) -> float:
        """Bandwidth of a collective over `span` consecutive ranks: NVLink within a node, else the network."""
        link = self.device.intra_node_bytes_s if span <= self.gpus_per_node else self.device.inter_node_bytes_s
        return link * self.comm_efficiency


def device_named(name: str, memory_gib: float | None = None) -> Device:
    """A device of the table by its short name (h100, a800, ...), optionally with another memory size."""
    key = name.lower().replace("_", "-")
    if key not in DEVICES:
        raise KeyError(f"unknown GPU {name!r}; known: {', '.join(DEVICES)}")
    device = DEVICES[key]
    return replace(device, memory_gib=memory_gib) if memory_gib else device
