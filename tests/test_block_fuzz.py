"""Property-based fuzzing of every registered block (issue 18, "Tensors and hyperparameters").

For random batch and map sizes, input dtypes and memory layouts (contiguous, channels_last, a strided
view), channel counts, train/eval mode and hyperparameters drawn from each constructor's own signature
(the default, a perturbed number, 0, a negative, a string, None, a float for an int, a bool), a block
either builds and returns a finite tensor of the input's shape and dtype (exactly the input for an
identity-at-init block built with its defaults), or raises a ValueError. Any other exception, a ValueError from the construction backstop
(:class:`~visattn.layers.block.UncheckedConstructionError`: a missing hyperparameter check), or a
ValueError from a valid input to a built block fails.
"""

from __future__ import annotations

import inspect
import numbers
import typing

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import visattn
from visattn.layers.block import AttnBlock, UncheckedConstructionError, _signature_and_hints
from visattn.registry import attn_class

NAMES = visattn.list_attns()
VALID_CHANNELS = (8, 16, 24, 32)
BAD_CHANNELS = (0, -8, 8.0, "16", None, True)
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64)
FUZZ = settings(
    max_examples=60,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _kinds(hint: typing.Any) -> set[str]:
    """The scalar kinds an annotation admits: a subset of {int, float, bool, str, none, tuple}."""
    if hint is type(None):
        return {"none"}
    origin = typing.get_origin(hint)
    if origin in (typing.Union, __import__("types").UnionType):
        return set().union(*(_kinds(h) for h in typing.get_args(hint)))
    if origin is tuple:
        return {"tuple"}
    for kind, typ in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if hint is typ:
            return {kind}
    return set()


def candidates(param: inspect.Parameter, hint: typing.Any) -> list[typing.Any]:
    """Values to try for one hyperparameter besides its default: perturbations of it, 0, negatives,
    wrong types (a string, None, a bool, a float for an int) and, for tuples, wrong lengths."""
    d = param.default
    kinds = _kinds(hint)
    out: list[typing.Any] = ["8", None, True, False, 0, -1, 2.5]
    if isinstance(d, bool):
        out += [not d]
    elif isinstance(d, numbers.Integral):
        out += [d + 1, max(d - 1, 1), 2 * d, -d, float(d)]
    elif isinstance(d, float):
        out += [d * 2, d / 2, 0.0, -d or -1.0, 1.0, float("nan")]
    elif isinstance(d, str):
        out += ["bogus", d.upper(), ""]
    elif isinstance(d, tuple):
        out += [list(d), d[:1], d + d[:1], ()]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in d):
            out += [tuple(v + 1 for v in d), tuple(0 for _ in d), tuple(-v for v in d), (3, 5)]
        else:
            out += [tuple(reversed(d)), ("bogus",), (d[0], d[0])]
    if d is None and "int" in kinds:
        out += [1, 2, 3, 4, 8, 16]
    if d is None and "bool" in kinds:
        out += [False]
    if "tuple" in kinds:
        out += [(2, 3), [4, 4], (0, 1), (5,)]
    return [v for v in out if not (type(v) is type(d) and v == d)]


def hyperparameters(name: str) -> dict[str, list[typing.Any]]:
    sig, hints = _signature_and_hints(attn_class(name))
    params = list(sig.parameters.values())[2:]
    return {p.name: candidates(p, hints.get(p.name)) for p in params if p.name not in ("device", "dtype")}


@st.composite
def cases(draw, name: str):
    space = hyperparameters(name)
    chosen = draw(st.lists(st.sampled_from(sorted(space)), max_size=2, unique=True)) if space else []
    kwargs = {k: draw(st.sampled_from(space[k])) for k in chosen}
    # Repeats weight the draws towards inputs that reach the forward pass.
    channels = draw(st.sampled_from(VALID_CHANNELS * 2 + BAD_CHANNELS))
    block_dtype = draw(
        st.sampled_from([None] * 4 + [torch.float64, torch.bfloat16, torch.float16, "float32"])
    )
    x_dtype = draw(st.sampled_from(["block"] * 3 + list(DTYPES)))
    if x_dtype == "block":
        x_dtype = block_dtype if isinstance(block_dtype, torch.dtype) else torch.float32
    return dict(
        kwargs=kwargs,
        channels=channels,
        block_dtype=block_dtype,
        b=draw(st.integers(1, 3)),
        h=draw(st.integers(1, 13)),
        w=draw(st.integers(1, 13)),
        x_dtype=x_dtype,
        train=draw(st.booleans()),
        layout=draw(st.sampled_from(["contiguous", "contiguous", "channels_last", "strided"])),
    )


def run_case(name: str, case: dict) -> str:
    """One fuzz case; returns what happened (for the assertions' messages) or fails."""
    kwargs = dict(case["kwargs"])
    if case["block_dtype"] is not None:
        kwargs["dtype"] = case["block_dtype"]
    torch.manual_seed(0)
    try:
        block = visattn.create_attn(name, case["channels"], **kwargs)
    except UncheckedConstructionError as err:
        pytest.fail(f"{name}{kwargs}: a hyperparameter check is missing; the backstop caught: {err}")
    except ValueError as err:
        assert name in str(err), f"{name}: a construction error must name the block: {err}"
        return "rejected at construction"
    block.train(case["train"])
    c = case["channels"]
    g = torch.Generator().manual_seed(1)
    if case["layout"] == "strided":  # a view with gaps, as slicing a larger map gives
        x = torch.randn(case["b"], c, 2 * case["h"], case["w"] + 1, generator=g)[:, :, ::2, 1:]
    else:
        x = torch.randn(case["b"], c, case["h"], case["w"], generator=g)
    if case["layout"] == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x = x.to(case["x_dtype"]) if case["x_dtype"].is_floating_point else (x * 4).to(case["x_dtype"])
    block_dtype = next((p.dtype for p in block.parameters() if p.is_floating_point()), None)
    valid_input = case["x_dtype"] == block_dtype
    try:
        with torch.no_grad():
            out = block(x)
    except ValueError as err:
        msg = str(err)
        assert name in msg, f"{name}: a forward error must name the block: {msg}"
        single_value = case["train"] and "more than one value per channel" in msg
        assert not valid_input or single_value, (
            f"{name}{kwargs}: valid input {tuple(x.shape)} rejected: {msg}"
        )
        return "rejected at forward"
    assert out.shape == x.shape and out.dtype == x.dtype, (
        f"{name}{kwargs}: {tuple(x.shape)} {x.dtype} -> {tuple(out.shape)} {out.dtype}"
    )
    assert torch.isfinite(out.float()).all(), f"{name}{kwargs}: non-finite output for {tuple(x.shape)}"
    if visattn.attn_info(name).identity_init and not case["kwargs"]:
        assert torch.equal(out, x), f"{name}: not the identity at init for {tuple(x.shape)}"
    return "ran"


@pytest.mark.parametrize("name", NAMES)
@FUZZ
@given(data=st.data())
def test_block_fuzz(name, data):
    run_case(name, data.draw(cases(name)))


# The mechanisms the fuzzer relies on, each with an exact expectation.


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"heads": "8"}, "performer: heads must be int or None, got str '8'"),
        ({"heads": 8.0}, "performer: heads must be int or None, got float 8.0"),
        ({"heads": True}, "performer: heads must be int or None, got bool True"),
        ({"orthogonal": 1}, "performer: orthogonal must be bool, got int 1"),
        ({"eps": "1e-6"}, "performer: eps must be float, got str '1e-6'"),
        ({"kernel": None}, "performer: kernel must be str, got NoneType None"),
        ({"dtype": "float32"}, "performer: dtype must be a floating torch.dtype"),
    ],
)
def test_wrong_type_is_a_value_error_naming_block_parameter_and_types(kwargs, expected):
    for build in (
        lambda: visattn.create_attn("performer", 64, **kwargs),
        lambda: attn_class("performer")(64, **kwargs),
    ):
        with pytest.raises(ValueError) as err:
            build()
        assert str(err.value).startswith(expected), str(err.value)


def test_annotations_accept_what_they_declare():
    # An int where a float belongs, None for an Optional, a list for a tuple (as YAML configs give it).
    assert visattn.create_attn("performer", 64, eps=1, heads=None).eps == 1
    block = visattn.create_attn("isa", 16, down_factor=[2, 3])
    assert block(torch.randn(2, 16, 5, 7)).shape == (2, 16, 5, 7)
    with pytest.raises(
        ValueError, match=r"isa: down_factor must be int or tuple\[int, int\], got tuple \(2, '3'\)"
    ):
        visattn.create_attn("isa", 16, down_factor=(2, "3"))
    with pytest.raises(ValueError, match=r"jukebox: attn_order must be tuple\[str, \.\.\.\], got str 'row'"):
        visattn.create_attn("jukebox", 32, attn_order="row")
    with pytest.raises(ValueError, match="cbam: channels must be an int >= 1, got '16'"):
        visattn.create_attn("cbam", "16")
    with pytest.raises(ValueError, match="cbam: channels must be an int >= 1, got 0"):
        attn_class("cbam")(0)


def test_timm_style_construction_still_works():
    # timm >= 1.0.21 builds attn_layer(channels, device=..., dtype=...).
    block = attn_class("cbam")(32, device=torch.device("cpu"), dtype=torch.float64)
    assert next(block.parameters()).dtype == torch.float64
    with pytest.raises(TypeError, match=r"cbam \(CBAM\): .*unexpected keyword argument 'bogus'"):
        attn_class("cbam")(32, bogus=1)


@pytest.mark.parametrize("x_dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_input_dtype_other_than_the_weights_is_a_value_error(x_dtype):
    block = visattn.create_attn("nonlocal", 16)
    x = torch.randn(2, 16, 3, 4).to(x_dtype)
    got = str(x_dtype).replace("torch.", "")
    with pytest.raises(ValueError) as err:
        block(x)
    assert str(err.value) == (
        f"nonlocal: expected a float32 feature map of shape (B, 16, H, W) (the dtype of its weights), got a "
        f"{got} tensor of shape (2, 16, 3, 4); convert the input with x.to(torch.float32) or the block with "
        f"block.to(torch.{got}) (or run under torch.autocast for mixed precision)"
    )
    assert block.to(x_dtype)(x).dtype == x_dtype  # the suggested fix works


def test_autocast_dtype_is_accepted_and_others_are_not():
    block = visattn.create_attn("nonlocal", 16).eval()
    x = torch.randn(2, 16, 3, 4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(block(x).float()).all()
        assert torch.isfinite(block(x.bfloat16()).float()).all()
        # Autocast leaves float64 alone, and float16 under bfloat16 autocast fails raw in several blocks.
        for other in ("float16", "float64"):
            with pytest.raises(
                ValueError, match=f"nonlocal: expected a float32 feature map .* got a {other}"
            ):
                block(x.to(getattr(torch, other)))
    # bfloat16 weights fed float32 under autocast: "mixed dtype" inside ten blocks; rejected up front.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(ValueError, match="performer: expected a bfloat16 feature map .* got a float32"):
            visattn.create_attn("performer", 32).bfloat16()(torch.randn(1, 32, 2, 2))


class _ParameterFree(AttnBlock):
    """A block with no weights: any floating dtype is its own."""

    attn_name = "parameter_free_probe"

    def __init__(self, channels: int, *, scale: float = 2.0, device=None, dtype=None) -> None:
        super().__init__(channels)
        self.scale = scale

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class _Broken(AttnBlock):
    attn_name = "broken_probe"

    def __init__(self, channels: int, *, ratio: int = 0, device=None, dtype=None) -> None:
        super().__init__(channels)
        self.hidden = channels // ratio  # the missing check the backstop stands in for


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_parameter_free_block_takes_any_float_dtype(dtype):
    x = torch.randn(2, 4, 3, 3).to(dtype)
    assert torch.equal(_ParameterFree(4)(x), x * 2)
    with pytest.raises(ValueError, match="parameter_free_probe: scale must be float, got str"):
        _ParameterFree(4, scale="2")


def test_backstop_turns_an_unchecked_failure_into_a_chained_value_error():
    with pytest.raises(UncheckedConstructionError) as err:
        _Broken(8, ratio=0)
    assert isinstance(err.value, ValueError)
    assert isinstance(err.value.__cause__, ZeroDivisionError)
    assert str(err.value).startswith("broken_probe: cannot be built with (8, ratio=0): ZeroDivisionError")


@pytest.mark.parametrize("name", ["autonl", "nonlocal", "fanet"])
def test_batch_of_one_at_1x1_in_training_names_block_and_fix(name):
    block = visattn.create_attn(name, 16).train()
    x = torch.randn(1, 16, 1, 1)
    with pytest.raises(ValueError) as err:
        block(x)
    assert str(err.value) == (
        f"{name}: a normalisation layer inside it needs more than one value per channel in training mode, "
        "got a feature map of shape (1, 16, 1, 1); call block.eval() for inference, or train with more "
        "than one value per channel (a batch > 1, or a larger map)"
    )
    assert "more than 1 value per channel" in str(err.value.__cause__)
    assert block(torch.randn(2, 16, 1, 1)).shape == (2, 16, 1, 1)  # the fixes work
    assert block.eval()(x).shape == x.shape


def test_half_precision_blocks_run_on_cpu():
    # Found by the fuzzer: antialiased resampling has no half CPU kernel (inputless, linformer,
    # synthesizer); in float16 reformer's zero padding keys normalised to 0/0 and its -1e5 self penalty
    # and performer_v1's clamped denominators overflowed.
    x = torch.randn(2, 32, 5, 7, generator=torch.Generator().manual_seed(0))
    for name, kwargs in [
        ("linformer", {}),
        ("reformer", {}),
        ("reformer", {"causal": True, "n_hashes": 16}),
        ("performer_v1", {}),
    ]:
        for dtype in (torch.bfloat16, torch.float16):
            torch.manual_seed(0)
            block = visattn.create_attn(name, 32, dtype=dtype, **kwargs)
            with torch.no_grad():
                out = block(x.to(dtype))
            assert out.dtype == dtype and torch.isfinite(out).all(), (name, dtype)


def test_only_attn_blocks_can_be_registered():
    # Every registered block gets AttnBlock's argument and input checks: a plain module would not.
    info = dict(visattn.attn_info("cbam").__dict__)
    del info["name"]
    with pytest.raises(TypeError, match="must derive from visattn.layers.AttnBlock"):

        @visattn.register_attn("tmp_plain_module", **info)
        class Plain(torch.nn.Module):
            def __init__(self, channels: int, *, device=None, dtype=None) -> None:
                super().__init__()

    assert "tmp_plain_module" not in visattn.list_attns()


@pytest.mark.parametrize("name", NAMES)
def test_any_memory_layout(name):
    # Found by the fuzzer: lambda viewed a channels_last map as if it were contiguous.
    torch.manual_seed(0)
    block = visattn.create_attn(name, 16).eval()
    dense = torch.randn(2, 16, 5, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = block(dense)
        for x in (dense.to(memory_format=torch.channels_last), dense.repeat_interleave(2, dim=-1)[..., ::2]):
            torch.testing.assert_close(block(x), ref, atol=1e-5, rtol=1e-5)
