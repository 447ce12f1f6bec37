"""The weight files of a model folder, read and written one tensor at a time.

safetensors headers are read without the data (``weight_index``), each tensor straight into its own memory
(``read_tensor``), and shards written tensor by tensor in transformers' file names (``write_weights``): the
merge holds one tensor at a time, never the whole model.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """Where one stored tensor lives and what it is, read from the file header only."""

    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int = -1  # where its bytes start in a safetensors file

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _header(path: Path) -> dict:
    """The JSON header of a safetensors file, each entry's data_offsets made absolute (from the file start)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    for key, entry in header.items():
        if key != "__metadata__":
            entry["data_offsets"] = [8 + size + offset for offset in entry["data_offsets"]]
    return header


def weight_index(model_dir: Path) -> dict[str, TensorSpec]:
    """Every tensor of a directory's safetensors weights (name -> spec); empty when it has none."""
    model_dir = Path(model_dir)
    for stem, ext in (("model", "safetensors"), ("pytorch_model", "bin")):
        index = model_dir / f"{stem}.{ext}.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            break
        if (model_dir / f"{stem}.{ext}").is_file():
            files = [f"{stem}.{ext}"]
            break
    else:
        return {}
    specs = {}
    for name in files:
        path = model_dir / name
        if ext == "bin":  # mmap: shapes and dtypes without reading the data
            stored = {
                k: (tuple(t.shape), t.dtype, -1) for k, t in torch.load(path, mmap=True, weights_only=True).items()
            }
        else:
            stored = {
                k: (tuple(v["shape"]), TORCH_DTYPES[v["dtype"]], v["data_offsets"][0])
                for k, v in _header(path).items()
                if k != "__metadata__"
            }
        specs.update({k: TensorSpec(k, path, *entry) for k, entry in stored.items()})
    return specs


def read_tensor(spec: TensorSpec) -> torch.Tensor:
    """One tensor, read straight into its own memory: no file mapping (whose pages would count as the
    process's memory beside the copy), so reading a 600 MB embedding costs 600 MB, not 1.2 GB."""
    if spec.offset < 0:
        return torch.load(spec.file, mmap=True, weights_only=True)[spec.name].clone()
    tensor = torch.empty(spec.shape, dtype=spec.dtype)
    buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
    with open(spec.file, "rb") as f:
        f.seek(spec.offset)
        if f.readinto(buffer) != spec.nbytes:
            raise OSError(f"{spec.file}: {spec.name} is cut short")
    return tensor


def return_freed_memory() -> None:
    """Make freed tensors leave the process at once (glibc only; elsewhere a no-op).

    glibc serves big allocations with mmap and gives them back on free, but after the first big free it
    raises that threshold (up to 32 MB), so the next layer-sized tensors come from the heap and stay
    resident after they are freed: merging or checking layer after layer, memory then creeps up by
    hundreds of MB. A fixed 1 MB threshold keeps every tensor-sized block returnable.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


# --- writing ---------------------------------------------------------------------------------------


def _write_safetensors(path: Path, entries: list[TensorSpec], produce: Callable[[str], torch.Tensor]) -> None:
    """A safetensors file written tensor by tensor (the library's writer wants them all in memory at once)."""
    header, offset = {}, 0
    for entry in entries:
        header[entry.name] = {
            "dtype": SAFETENSORS_DTYPES[entry.dtype],
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data must start 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for entry in entries:
            tensor = produce(entry.name).to(entry.dtype).contiguous().cpu()
            if tuple(tensor.shape) != entry.shape:
                raise ValueError(f"{entry.name}: produced shape {tuple(tensor.shape)}, planned {entry.shape}")
            f.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
            del tensor  # before the next one is read


def write_weights(
    out_dir: Path,
    entries: list[TensorSpec],
    produce: Callable[[str], torch.Tensor],
    *,
    shard_bytes: int,
    legacy: bool = False,
    progress: Callable[[Iterator], Iterator] = iter,
) -> list[str]:
    """Shards of at most ``shard_bytes`` (a bigger single tensor gets a shard of its own), in transformers'
    file names, with an index file when there is more than one. Returns the shard file names."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    stem, ext = ("pytorch_model", "bin") if legacy else ("model", "safetensors")
    names = (
        [f"{stem}.{ext}"]
        if len(shards) == 1
        else [f"{stem}-{i:05d}-of-{len(shards):05d}.{ext}" for i in range(1, len(shards) + 1)]
    )
    for name, shard in progress(list(zip(names, shards))):
        if legacy:  # torch.save needs the shard's tensors together
            torch.save({e.name: produce(e.name).to(e.dtype).contiguous().cpu() for e in shard}, out_dir / name)
        else:
            _write_safetensors(out_dir / name, shard, produce)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(e.nbytes for e in entries)},
            "weight_map": {e.name: name for name, shard in zip(names, shards) for e in shard},
        }
        (out_dir / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names
