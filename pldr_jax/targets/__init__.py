"""The accelerators `pldr-jax compile` compiles for: each chip's published figures, and its devices
described without the hardware.

* TPUs (``v5e:2x2``, ``v5p:2x2x1``, ``v6e:2x2``): the libtpu wheel describes a topology by name
  (``pip install "jax[tpu]==<jax version>"``, or ``pip install -e ".[tpu]"``).
* NVIDIA GPUs (``h100:1x8``, ``a100:1x8``: hosts x GPUs per host): the CUDA plugin
  (``pip install "jax-cuda12-plugin[with-cuda]==<jax version>"``, or ``pip install -e ".[cuda]"``)
  describes GPUs from an XLA GPU target config (a ``GpuTargetConfigProto`` text proto: the device's
  compute capability, memory, bandwidth, cores, cuDNN version), shipped here next to this file with
  the commit of openxla/xla it was copied from in its header (`h100_sxm.txtpb`, `a100_sxm_80.txtpb`).

`CHIPS` holds, for both, the figures the roofline uses: peak dense bf16 FLOP/s, memory bytes, memory
bandwidth and the chip-to-chip bandwidth (TPU ICI / GPU NVLink, bidirectional, all links), with
their source.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import importlib.util

from ..settings import allow_cuda_without_driver

__all__ = ["ChipSpec", "CHIPS", "LIBTPU_INSTALL", "CUDA_INSTALL", "chip_of", "chip_of_device", "topology_devices",
           "target_config", "gpu_topology"]

LIBTPU_INSTALL = 'pip install "jax[tpu]==<your jax version>"  (or: pip install -e ".[tpu]")'
CUDA_INSTALL = 'pip install "jax-cuda12-plugin[with-cuda]==<your jax version>"  (or: pip install -e ".[cuda]")'


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """Published per-chip figures: peak dense bf16 FLOP/s, memory (HBM) bytes, memory bytes/s,
    chip-to-chip bytes/s (TPU ICI, GPU NVLink; bidirectional, all links), where they come from; the
    platform ("tpu" | "gpu") and, for a GPU, its XLA target config file (in this package)."""
    name: str
    peak_bf16_flops: float
    hbm_bytes: int
    hbm_bw: float
    ici_bw: float
    source: str
    platform: str = "tpu"
    target_config: str | None = None


CHIPS: dict[str, ChipSpec] = {
    "v5e": ChipSpec("v5e", 197e12, 16 * 10 ** 9, 819e9, 400e9, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": ChipSpec("v5p", 459e12, 95 * 2 ** 30, 2765e9, 1200e9, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": ChipSpec("v6e", 918e12, 32 * 10 ** 9, 1638e9, 800e9, "https://cloud.google.com/tpu/docs/v6e"),
    # TPU v4: 6 ICI links of 50 GB/s each way (Jouppi et al. 2023, arXiv 2304.01433)
    "v4": ChipSpec("v4", 275e12, 32 * 2 ** 30, 1200e9, 600e9, "https://cloud.google.com/tpu/docs/v4"),
    # memory: the target config's device_memory_size (what XLA sees of the 80 GB); FLOP/s dense (no sparsity)
    "h100": ChipSpec("h100", 989e12, 84942979072, 3.35e12, 900e9,
                     "https://www.nvidia.com/en-us/data-center/h100/ (H100 SXM: 989 TFLOP/s bf16 dense, "
                     "3.35 TB/s HBM3, NVLink 900 GB/s)", "gpu", "h100_sxm.txtpb"),
    "a100": ChipSpec("a100", 312e12, 85100068864, 2.039e12, 600e9,
                     "https://www.nvidia.com/en-us/data-center/a100/ (A100 80GB SXM: 312 TFLOP/s bf16 dense, "
                     "2,039 GB/s HBM2e, NVLink 600 GB/s)", "gpu", "a100_sxm_80.txtpb"),
    # no target config shipped: peak figures for MFU (`train.throughput`), not a compile target
    "h200": ChipSpec("h200", 989e12, 141 * 10 ** 9, 4.8e12, 900e9,
                     "https://www.nvidia.com/en-us/data-center/h200/ (989 TFLOP/s bf16 dense, 4.8 TB/s HBM3e)",
                     "gpu"),
}


def chip_of(topology: str) -> ChipSpec:
    """The `CHIPS` entry of a topology name ("v5e:2x2", "h100:1x8", ...); ValueError naming the
    known ones otherwise."""
    gen = topology.split(":")[0].lower().replace("litepod", "").replace("-", "")
    if gen not in CHIPS:
        raise ValueError(f"no chip figures for topology {topology!r}; known generations: {sorted(CHIPS)} "
                         f"(e.g. v5e:2x2, v5p:2x2x1, v6e:2x2, h100:1x8, a100:1x8)")
    return CHIPS[gen]


#: substrings of a device's ``device_kind`` -> its `CHIPS` entry (first match)
_DEVICE_KINDS = (("v6 lite", "v6e"), ("v6e", "v6e"), ("v5 lite", "v5e"), ("v5e", "v5e"), ("v5p", "v5p"),
                 ("tpu v5", "v5p"), ("tpu v4", "v4"), ("h200", "h200"), ("h100", "h100"), ("a100", "a100"))


def chip_of_device(device) -> ChipSpec | None:
    """The `CHIPS` entry of a (real or described) device, by its ``device_kind`` ("NVIDIA H100 80GB
    HBM3", "TPU v5 lite", ...); None for a chip without figures here (a CPU)."""
    kind = str(getattr(device, "device_kind", "")).lower()
    return next((CHIPS[name] for sub, name in _DEVICE_KINDS if sub in kind), None)


def target_config(chip: ChipSpec) -> str:
    """The text of a GPU chip's XLA target config (shipped in this package)."""
    if not chip.target_config:
        raise ValueError(f"{chip.name} is not a GPU: it has no XLA GPU target config")
    return importlib.resources.files(__name__).joinpath(chip.target_config).read_text()


def gpu_topology(topology: str) -> tuple[int, int]:
    """(hosts, GPUs per host) of a GPU topology name "h100:HxG" (e.g. h100:1x8); ValueError otherwise."""
    shape = topology.split(":", 1)[1] if ":" in topology else ""
    parts = shape.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"GPU topology {topology!r}: expected <gpu>:<hosts>x<gpus per host>, e.g. h100:1x8")
    return int(parts[0]), int(parts[1])


def cuda_plugin_installed() -> bool:
    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except (ImportError, ValueError):
        return False


def topology_devices(topology: str) -> list:
    """The devices of `topology` (e.g. "v5e:2x2", "h100:1x8"), for compiling on any host, no
    accelerator needed.  ValueError with the install command when libtpu / the CUDA plugin is absent."""
    chip = chip_of(topology)
    from jax.experimental import topologies
    if chip.platform == "gpu":
        hosts, per_host = gpu_topology(topology)
        if not cuda_plugin_installed():
            raise ValueError(f"compiling for a GPU topology needs the CUDA plugin: {CUDA_INSTALL}")
        allow_cuda_without_driver()         # no GPU driver is needed to compile
        try:
            return list(topologies.get_topology_desc(platform="cuda", target_config=target_config(chip),
                                                     topology=f"1x{hosts}x{per_host}").devices)
        except Exception as e:       # the plugin's errors are XlaRuntimeError with long traces
            raise ValueError(f"cannot describe GPU topology {topology!r}: {str(e).splitlines()[0]}") from None
    if importlib.util.find_spec("libtpu") is None:
        raise ValueError(f"compiling for a TPU topology needs the libtpu wheel: {LIBTPU_INSTALL}")
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
    except Exception as e:  # libtpu's errors are RuntimeError / XlaRuntimeError with long traces
        msg = str(e).splitlines()[0]
        if "lockfile" in msg:
            msg += (" (another process has libtpu loaded; compiling for a topology uses no TPU, so "
                    "ALLOW_MULTIPLE_LIBTPU_LOAD=1 lets both run)")
        raise ValueError(f"cannot describe TPU topology {topology!r}: {msg}") from None
