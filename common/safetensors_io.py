"""Minimal reader/writer for the `.safetensors` format, so we need not depend on the `safetensors` package.

File layout (https://github.com/huggingface/safetensors, "Format" section of the README):
    8 bytes      N, little-endian unsigned 64-bit length of the header
    N bytes      UTF-8 JSON: {name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...}
                 plus an optional "__metadata__": {str: str}; may be right-padded with spaces
    rest         the byte buffer; offsets are relative to its start, tensors are little-endian and C-contiguous
"""
import json
import os
import struct
import sys

import torch

#################################################################################
#                                  Data types                                   #
#################################################################################

# Format dtype string <-> torch dtype (names as in the safetensors Rust crate's `Dtype` enum).
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

HEADER_ALIGNMENT = 8  # the reference writer pads the JSON header with spaces to a multiple of 8 bytes
MAX_HEADER_BYTES = 100_000_000  # same sanity bound as the reference reader


def _check_little_endian_host():
    # We reinterpret the raw bytes in place; on a big-endian host every multi-byte value would need a byte swap.
    if sys.byteorder != "little":
        raise RuntimeError("safetensors_io only supports little-endian machines; use the `safetensors` package instead")


#################################################################################
#                                    Reading                                    #
#################################################################################

def load_safetensors(path):
    """Read a `.safetensors` file into a dict {name: CPU tensor} (the `__metadata__` entry is skipped)."""
    _check_little_endian_host()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no safetensors file at {path!r}; check the path")
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise ValueError(f"{path!r} is too short to be a safetensors file (needs an 8-byte header length)")
    (header_len,) = struct.unpack("<Q", raw[:8])
    if header_len > min(MAX_HEADER_BYTES, len(raw) - 8):
        raise ValueError(f"{path!r}: header length {header_len} exceeds the file size; "
                         "the file is not safetensors or is truncated")
    try:
        header = json.loads(raw[8:8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path!r}: the safetensors JSON header cannot be parsed ({e})") from None
    # One writable copy of the byte buffer; every tensor is a view into it (no per-tensor copies).
    buffer = bytearray(raw[8 + header_len:])
    del raw

    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _tensor_from_buffer(buffer, name, info, path)
    return tensors


def _tensor_from_buffer(buffer, name, info, path):
    """Build one tensor from its header entry, checking that the offsets agree with dtype and shape."""
    dtype_name, shape, (begin, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
    if dtype_name not in DTYPES:
        raise ValueError(f"{path!r}: tensor {name!r} has unsupported dtype {dtype_name!r} "
                         f"(supported: {', '.join(DTYPES)})")
    dtype = DTYPES[dtype_name]
    numel = 1
    for size in shape:
        numel *= size
    itemsize = torch.empty((), dtype=dtype).element_size()
    if not 0 <= begin <= end <= len(buffer) or end - begin != numel * itemsize:
        raise ValueError(f"{path!r}: tensor {name!r} has data_offsets {[begin, end]} inconsistent with "
                         f"{dtype_name}{shape} or the buffer size {len(buffer)}; the file is corrupt")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype, count=numel, offset=begin).reshape(shape)


#################################################################################
#                                    Writing                                    #
#################################################################################

def save_safetensors(tensors, path, metadata=None):
    """Write a dict {name: tensor} to `path` in the safetensors format; `metadata` is an optional {str: str}."""
    _check_little_endian_host()
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("safetensors metadata must map str to str; convert the values with str() or json.dumps()")
    header, chunks, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = dict(metadata)
    for name in sorted(tensors):
        tensor = tensors[name]
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"value for {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        if tensor.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}, not storable; cast it to one of "
                             f"{sorted(str(d) for d in DTYPE_NAMES)}")
        # Flatten to bytes: the view to uint8 also covers bfloat16/bool, which numpy cannot represent.
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % HEADER_ALIGNMENT)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for data in chunks:
            f.write(data)
