"""The base class of every block: argument and input validation once, in one place.

Every registered block derives from :class:`AttnBlock`. Its metaclass checks the constructor's
arguments against the constructor's type annotations before ``__init__`` runs (so a string where a
number belongs is one ValueError naming the block and the parameter, for ``create_attn`` and for
direct class use alike, as timm's ``attn_layer`` does), and ``AttnBlock.forward`` checks the input's
shape, dtype and device before the block computes anything.
"""

from __future__ import annotations

import inspect
import numbers
import typing
from typing import Any

import torch
import torch.nn as nn

from ..annotations import describe_hint, matches_hint

__all__ = [
    "AttnBlock",
    "UncheckedConstructionError",
    "check_feature_map",
    "check_input_matches",
    "check_int",
    "check_odd_kernel",
    "factory_kwargs",
]


def factory_kwargs(device: Any = None, dtype: Any = None) -> dict[str, Any]:
    """``dict(device=..., dtype=...)`` for layer constructors (timm's ``dd`` convention)."""
    return {"device": device, "dtype": dtype}


def check_odd_kernel(kernel_size: int, owner: str, name: str = "kernel_size") -> None:
    """ValueError ``"<owner>: <name> must be odd and >= 1"`` unless it is (a centred window needs it)."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"{owner}: {name} must be odd and >= 1, got {kernel_size}")


def check_int(value: Any, owner: str, name: str, *, min: int = 1, max: int | None = None) -> int:
    """``value`` as an int in [min, max]; ValueError naming ``owner`` and ``name`` otherwise.

    ``bool`` is not an int here: ``heads=True`` is a mistake, not one head.
    """
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if ok and value >= min and (max is None or value <= max):
        return int(value)
    bound = f">= {min}" if max is None else f"in [{min}, {max}]"
    raise ValueError(f"{owner}: {name} must be an int {bound}, got {value!r}")


def check_feature_map(x: torch.Tensor, channels: int, block: str) -> None:
    """Raise ValueError naming ``block``, the expected and the received shape unless ``x`` is a
    floating-point (B, channels, H, W) tensor with H, W >= 1."""
    ok = (
        isinstance(x, torch.Tensor)
        and x.dim() == 4
        and x.shape[1] == channels
        and x.shape[0] >= 1
        and x.shape[2] >= 1
        and x.shape[3] >= 1
        and x.is_floating_point()
    )
    if not ok:
        if not isinstance(x, torch.Tensor):
            got = f"a {type(x).__name__}"
        else:
            got = f"a {str(x.dtype).replace('torch.', '')} tensor of shape {tuple(x.shape)}"
        raise ValueError(
            f"{block}: expected a floating-point feature map of shape (B, {channels}, H, W) with B, H, W >= 1, "
            f"got {got}. Pass NCHW input (e.g. x.permute(0, 3, 1, 2) for NHWC) with {channels} channels, "
            "as a float tensor (x.float())."
        )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _reference_tensor(module: nn.Module) -> torch.Tensor | None:
    """The tensor whose dtype and device the input must share: the first floating parameter, else the
    first floating buffer; None for a block that holds neither (it takes any floating dtype)."""
    for t in module.parameters():
        if t.is_floating_point():
            return t
    for t in module.buffers():
        if t.is_floating_point():
            return t
    return None


def check_input_matches(module: nn.Module, x: torch.Tensor, block: str) -> None:
    """ValueError naming ``block`` unless ``x`` has the dtype and device of the block's weights.

    Under autocast the autocast dtype is accepted as well (autocast casts at each op). Any other
    mismatch would surface as a raw "expected scalar type" or "mixed dtype" error deep inside the
    block (float64 is never autocast; float16 under bfloat16 autocast and float32 into bfloat16
    weights fail inside several blocks' ops).
    """
    ref = _reference_tensor(module)
    if ref is None:
        return
    shape = f"(B, {x.shape[1]}, H, W)"
    if ref.device != x.device and ref.device.type != "meta":
        raise ValueError(
            f"{block}: the input of shape {tuple(x.shape)} is on {x.device} but the block's weights are on "
            f"{ref.device}; move one of them: x.to({str(ref.device)!r}) or block.to({str(x.device)!r})"
        )
    if x.dtype == ref.dtype:
        return
    if torch.is_autocast_enabled(x.device.type) and x.dtype == torch.get_autocast_dtype(x.device.type):
        return
    want, got = _dtype_name(ref.dtype), _dtype_name(x.dtype)
    raise ValueError(
        f"{block}: expected a {want} feature map of shape {shape} (the dtype of its weights), got a {got} "
        f"tensor of shape {tuple(x.shape)}; convert the input with x.to(torch.{want}) or the block with "
        f"block.to(torch.{got}) (or run under torch.autocast for mixed precision)"
    )


# torch's own messages for a normalisation layer that sees a single value per channel in training
# (F.batch_norm's and F.instance_norm's _verify_* checks).
_SINGLE_VALUE_NORM_ERRORS = ("more than 1 value per channel when training", "more than 1 spatial element")


class UncheckedConstructionError(ValueError):
    """A block's constructor failed with an exception that no argument check anticipated.

    Only a backstop that keeps the ValueError contract: the cause is a missing hyperparameter check,
    which belongs in the block (the block fuzzer fails on this error to find them).
    """


_HINTS: dict[type, tuple[inspect.Signature, dict[str, Any]]] = {}


def _signature_and_hints(cls: type) -> tuple[inspect.Signature, dict[str, Any]]:
    """The constructor's signature and its resolved annotations (blocks use postponed, string
    annotations), cached per class."""
    cached = _HINTS.get(cls)
    if cached is None:
        init = cls.__init__
        try:
            hints = typing.get_type_hints(init)
        except Exception:  # noqa: BLE001 - an annotation that does not resolve is just not enforced
            hints = {}
        cached = _HINTS[cls] = (inspect.signature(init), hints)
    return cached


def check_constructor_args(cls: type, block: str, args: tuple, kwargs: dict[str, Any]) -> None:
    """Check a block's constructor call against its signature and annotations: unknown or missing
    arguments are a TypeError (as Python's own), a value of the wrong type a ValueError naming the
    block, the parameter, the expected and the given type; ``channels`` must be a positive int and
    ``dtype`` a floating torch.dtype."""
    sig, hints = _signature_and_hints(cls)
    try:
        bound = sig.bind(None, *args, **kwargs)
    except TypeError as err:
        accepted = [p for p in list(sig.parameters)[2:]]
        raise TypeError(f"{block} ({cls.__name__}): {err}; it accepts channels, then {accepted}") from None
    for pname, value in list(bound.arguments.items())[1:]:
        if pname == "channels":
            check_int(value, block, "channels")
        elif pname == "dtype":
            if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
                raise ValueError(
                    f"{block}: dtype must be a floating torch.dtype (e.g. torch.float32) or None, got {value!r}"
                )
        elif pname in hints and not matches_hint(value, hints[pname]):
            raise ValueError(
                f"{block}: {pname} must be {describe_hint(hints[pname])}, got {type(value).__name__} {value!r}"
            )


class _BlockMeta(type(nn.Module)):
    """Checks a block's constructor arguments before ``__init__`` runs, for every way of building it
    (``create_attn``, ``Block(c, ...)``, timm's ``attn_layer(c, device=..., dtype=...)``)."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        block = getattr(cls, "attn_name", "") or cls.__name__
        check_constructor_args(cls, block, args, kwargs)
        try:
            return super().__call__(*args, **kwargs)
        except ValueError:
            raise
        except Exception as err:  # noqa: BLE001 - the backstop; see UncheckedConstructionError
            given = ", ".join([*(repr(a) for a in args), *(f"{k}={v!r}" for k, v in kwargs.items())])
            raise UncheckedConstructionError(
                f"{block}: cannot be built with ({given}): {type(err).__name__}: {err}. "
                f"Check these hyperparameters against help({cls.__name__})"
            ) from err


class AttnBlock(nn.Module, metaclass=_BlockMeta):
    """Base of every registered block: ``forward`` validates the input and calls ``_forward``.

    Subclasses implement ``_forward(x: (B, C, H, W)) -> (B, C, H, W)``.
    """

    attn_name: str = ""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = check_int(channels, self._block_name(), "channels")

    def _block_name(self) -> str:
        return type(self).attn_name or type(self).__name__

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self._block_name()
        check_feature_map(x, self.channels, name)
        # Compiled and exported graphs see fixed weights; the checks below are eager-mode guidance.
        if torch.compiler.is_compiling():
            return self._forward(x)
        check_input_matches(self, x, name)
        if not self.training:
            return self._forward(x)
        try:
            return self._forward(x)
        except ValueError as err:
            if not any(m in str(err) for m in _SINGLE_VALUE_NORM_ERRORS):
                raise
            raise ValueError(
                f"{name}: a normalisation layer inside it needs more than one value per channel in "
                f"training mode, got a feature map of shape {tuple(x.shape)}; call block.eval() for "
                "inference, or train with more than one value per channel (a batch > 1, or a larger map)"
            ) from err

    def _forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"channels={self.channels}"
