"""Payload coercion and validation: what put() accepts as blocks, checked before anything is written.

The BlockStore facade (engine.store) hands every argument that describes
data -- the identity object, the blocks (numpy arrays or torch tensors, one
``[n, *block_shape]`` array or a sequence of per-block ones), a start block
index, the identity's lossy scheme -- to the functions here first, so a bad
call raises its typed error (engine.errors) before any tier is touched.  They
hold no state; torch is imported only when a torch object is seen.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from quiver.engine import quant
from quiver.engine.errors import (
    DTypeMismatchError,
    InvalidIdentityError,
    InvalidPayloadError,
    InvalidTokensError,
    LossyCodecError,
    QuiverError,
    ShapeMismatchError,
)
from quiver.engine.guard import CARRIERS
from quiver.engine.identity import CacheIdentity


def check_identity(ident: Any) -> None:
    if not isinstance(ident, CacheIdentity):
        raise InvalidIdentityError(f"expected a CacheIdentity, got {type(ident).__name__}")


def check_quant(ident: CacheIdentity) -> None:
    """Refuse an identity whose ``kv_quant`` names a scheme this store cannot hold."""
    if ident.kv_quant is not None and ident.kv_quant != quant.KV_QUANT_INT8:
        raise LossyCodecError(f"identity kv_quant {ident.kv_quant!r} is not {quant.KV_QUANT_INT8!r}, "
                              "the only lossy scheme (codec int8)")


def check_start_block(start_block: Any) -> int:
    """A block index to start from: a non-negative int (a bool is not one)."""
    if isinstance(start_block, bool) or not isinstance(start_block, (int, np.integer)):
        raise InvalidTokensError(f"start_block must be an int, got {type(start_block).__name__}")
    if start_block < 0:
        raise InvalidTokensError(f"start_block must be >= 0, got {start_block}")
    return int(start_block)


def block_arrays(ident: CacheIdentity, blocks: Any) -> list[np.ndarray]:
    """Each block as a C-contiguous numpy array of the identity's carrier dtype.

    Accepts one array/tensor ``[n, *block_shape]`` or a sequence of per-block
    ones; everything is checked here, before anything is written."""
    if is_torch(blocks):
        check_tensor_kind(ident, blocks)
    if isinstance(blocks, np.ndarray) or is_torch(blocks):
        if len(blocks.shape) != 1 + len(ident.block_shape):
            raise ShapeMismatchError(
                f"blocks must be [n, *{ident.block_shape}], got shape {tuple(blocks.shape)}"
            )
        items = [blocks[i] for i in range(blocks.shape[0])]
    elif isinstance(blocks, (list, tuple)):
        items = list(blocks)
    else:
        raise ShapeMismatchError(f"blocks must be an array, a tensor or a sequence of them, got {type(blocks).__name__}")
    return [one_block(ident, b) for b in items]


def is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def check_tensor_kind(ident: CacheIdentity, b: Any) -> None:
    """InvalidPayloadError for a torch object that is not a dense tensor with data."""
    import torch

    if not isinstance(b, torch.Tensor):
        raise DTypeMismatchError(f"blocks must be numpy arrays or torch tensors, got {type(b).__name__}")
    if b.is_quantized:
        raise InvalidPayloadError(f"a quantized tensor ({b.dtype}) is not KV of kv_dtype {ident.kv_dtype}; "
                                  "store the dequantized tensor, or use kv_quant for lossy blocks")
    if b.layout != torch.strided or getattr(b, "is_nested", False):
        raise InvalidPayloadError(f"a block must be a dense (strided) tensor, got layout {b.layout}")
    if b.device.type == "meta":
        raise InvalidPayloadError("a meta tensor has no data to store")


def torch_block(ident: CacheIdentity, b: Any) -> np.ndarray:
    """A torch tensor's bytes as a numpy array; typed errors for what has no bytes
    to read (meta), is not a dense array (sparse, nested), or is quantized."""
    import torch

    check_tensor_kind(ident, b)
    if b.is_complex():
        raise DTypeMismatchError(f"block dtype {b.dtype} does not match kv_dtype {ident.kv_dtype}")
    try:
        b = b.detach()
        if b.device.type != "cpu":
            b = b.cpu()
        b = b.resolve_conj().resolve_neg()
        if b.dtype == torch.bfloat16:
            if ident.kv_dtype != "bfloat16":
                raise DTypeMismatchError(f"block is bfloat16, identity kv_dtype is {ident.kv_dtype}")
            b = b.contiguous().view(torch.int16)
        return b.contiguous().numpy()
    except QuiverError:
        raise
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
        raise InvalidPayloadError(f"cannot read the tensor's bytes ({b.dtype} on {b.device}): {exc}") from exc


def one_block(ident: CacheIdentity, b: Any) -> np.ndarray:
    """One block as a C-contiguous numpy array: carrier dtype, block shape, finite if lossy."""
    if is_torch(b):
        b = torch_block(ident, b)
    elif not isinstance(b, np.ndarray):
        raise DTypeMismatchError(f"a block must be a numpy array or torch tensor, got {type(b).__name__}")
    if b.dtype not in CARRIERS[ident.kv_dtype]:
        raise DTypeMismatchError(f"block dtype {b.dtype} does not match kv_dtype {ident.kv_dtype}")
    if tuple(b.shape) != ident.block_shape:
        raise ShapeMismatchError(f"block shape {tuple(b.shape)} != identity block shape {ident.block_shape}")
    b = np.ascontiguousarray(b)
    if ident.kv_quant is not None:  # int8 has no code for NaN/Inf: refused before anything is written
        quant.check_finite(b, ident.kv_dtype)
    return b
