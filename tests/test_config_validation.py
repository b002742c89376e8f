"""Configs are checked completely before anything runs (issue 18, "Config"): every key's type and range
with its full key path, names (backbone, head, blocks) with suggestions, constructor keywords, YAML
syntax with file, line and column, several --set pairs after one flag; and a fuzzer over mutations of
configs/demo.yaml whose outcome is a valid config or a ConfigError naming the mutated key."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from visattn.engine.config import (
    DEFAULTS,
    MODEL_SPEC,
    SPEC,
    SYNTHETIC_SPEC,
    ConfigError,
    load_config,
    validate_config,
)

ROOT = Path(__file__).resolve().parents[1]
DEMO = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())


def _error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    return str(info.value)


# -- empty and malformed files ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "is empty"),
        ("# only a comment\n", "is empty"),
        ("train: {iters: 10}\n", "has no 'model' section"),
        ("model:\ntrain: {iters: 10}\n", "has no 'model' section"),
        ("- a\n- b\n", "must hold a mapping"),
    ],
)
def test_config_file_without_a_model_is_refused(tmp_path, text, needle):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_segmentor_yaml_that_is_empty_is_refused(tmp_path):
    from visattn.models.segmentor import resolve_config

    path = tmp_path / "seg.yaml"
    path.write_text("\n")
    with pytest.raises(ConfigError, match="is empty") as info:
        resolve_config(path)
    assert str(path) in str(info.value)


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  backbone: resnet18\n  head_kwargs: {channels: 64\ntrain: {iters: 3}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    # yaml's problem_mark, 1-based: the flow mapping opened on line 3 is still open at line 4, column 6.
    assert msg.startswith(f"{path}:4:6: YAML syntax error: ")
    assert "while parsing a flow mapping" in msg and "\n" not in msg


def test_yaml_duplicate_key_is_an_error_not_the_last_one_silently(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("model: {backbone: resnet18, num_classes: 6}\ntrain:\n  iters: 3\n  iters: 300\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}:4:3: YAML syntax error: duplicate key 'iters'")
    assert "first given on line 3" in str(info.value)


def test_set_value_that_does_not_parse_names_key_and_column():
    msg = _error(["optim.lr=0.02", "data.crop_size=[48, 48"])
    assert msg.startswith("--set data.crop_size: cannot parse the value '[48, 48' as YAML at column 8: ")


def test_set_pair_without_equals_names_the_pair():
    assert "got 'train.iters' (no key=value)" in _error(["train.iters"])
    assert "give the config file before --set" in _error(["my.yaml"])
    assert "'optim..lr' is not a key path" in _error(["optim..lr=1"])


# -- type, shape and range of every key --------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "data.crop_size=[48]",
            "'data.crop_size' must be an int or [h, w] of positive ints, got [48] (list)",
        ),
        ("data.crop_size=0", "'data.crop_size' must be an int or [h, w] of positive ints, got 0 (int)"),
        (
            "data.ratio_range=[2.0, 1.0]",
            "'data.ratio_range' must be [lo, hi] with 0 < lo <= hi, got [2.0, 1.0]",
        ),
        ("data.ratio_range=[0, 1]", "'data.ratio_range' must be [lo, hi] with 0 < lo <= hi, got [0, 1]"),
        ("data.scale=[512]", "'data.scale' must be [long, short] of positive ints or null, got [512]"),
        ("data.cat_max_ratio=0", "'data.cat_max_ratio' must be a number in (0, 1], got 0 (int)"),
        ("data.cat_max_ratio=1.5", "'data.cat_max_ratio' must be a number in (0, 1], got 1.5"),
        ("data.num_workers=-1", "'data.num_workers' must be an int >= 0, got -1"),
        ("data.flip=1", "'data.flip' must be true or false, got 1 (int)"),
        ("data.synthetic={size: [1, 2, 3]}", "'data.synthetic.size' must be an int or [h, w]"),
        (
            "data.synthetic={train_length: ten}",
            "'data.synthetic.train_length' must be a positive int, got 'ten'",
        ),
        ("train.iters=1.5", "'train.iters' must be a positive int, got 1.5 (float)"),
        ("train.iters=.nan", "'train.iters' must be a positive int, got nan (float)"),
        ("train.seed=-1", "'train.seed' must be an int in [0, 4294967295], got -1"),
        ("train.ckpt_interval=0", "'train.ckpt_interval' must be a positive int, got 0"),
        ("train.log_interval=0", "'train.log_interval' must be a positive int, got 0"),
        ("train.eval_interval=-1", "'train.eval_interval' must be an int >= 0, got -1"),
        ("train.grad_clip=0", "'train.grad_clip' must be a number > 0 or null, got 0"),
        (
            "train.device=gpu",
            "'train.device' must be a torch device such as 'cpu', 'cuda' or 'cuda:1' or null",
        ),
        ("train.amp=fp32", "'train.amp' must be one of ['bf16', 'fp16'] or null, got 'fp32'"),
        ("train.work_dir=''", "'train.work_dir' must be a non-empty string, got ''"),
        ("optim.lr=0", "'optim.lr' must be a number > 0, got 0"),
        ("optim.lr=.inf", "'optim.lr' must be a number > 0, got inf"),
        ("optim.momentum=1.0", "'optim.momentum' must be a number in [0, 1), got 1.0"),
        ("optim.weight_decay=-0.1", "'optim.weight_decay' must be a number >= 0, got -0.1"),
        ("optim.betas=[0.9]", "'optim.betas' must be [beta1, beta2], two numbers in [0, 1), got [0.9]"),
        (
            "optim.betas=[0.9, 1.0]",
            "'optim.betas' must be [beta1, beta2], two numbers in [0, 1), got [0.9, 1.0]",
        ),
        ("sched.warmup_iters=-5", "'sched.warmup_iters' must be an int >= 0, got -5"),
        ("sched.warmup_ratio=2", "'sched.warmup_ratio' must be a number in [0, 1], got 2"),
        ("eval.scales=[]", "'eval.scales' must be a non-empty list of positive numbers, got []"),
        ("eval.scales=[1.0, -0.5]", "'eval.scales' must be a non-empty list of positive numbers"),
        ("eval.crop_size=[1]", "'eval.crop_size' must be an int or [h, w] of positive ints or null, got [1]"),
        ("eval.stride=[0, 2]", "'eval.stride' must be an int or [h, w] of positive ints or null, got [0, 2]"),
        ("eval.max_images=0", "'eval.max_images' must be a positive int or null, got 0"),
        ("model.num_classes=0", "'model.num_classes' must be a positive int, got 0"),
        ("model.output_stride=4", "'model.output_stride' must be one of [8, 16, 32] or null, got 4"),
        ("model.output_stride=8.0", "'model.output_stride' must be one of [8, 16, 32] or null, got 8.0"),
        ("model.dropout=1", "'model.dropout' must be a number in [0, 1), got 1"),
        ("model.aux_weight=-0.4", "'model.aux_weight' must be a number >= 0, got -0.4"),
        ("model.aux=yes please", "'model.aux' must be true or false, got 'yes please'"),
        ("model.head_kwargs=[64]", "'model.head_kwargs' must be a mapping (key: value) or null, got [64]"),
        ("model.data={mean: [1, 2]}", "'model.data.mean' must be three numbers [r, g, b]"),
        ("model.data={std: [1, 0, 1]}", "'model.data.std' must be three positive numbers"),
        ("model.data={dataset: kitti}", "'model.data.dataset' must be 'cityscapes' or 'ade20k'"),
    ],
)
def test_bad_value_names_key_expectation_and_value(override, message):
    assert f"config key {message}" in _error([override])


def test_cross_key_rules_name_every_key():
    msg = _error(["optim.nesterov=true"])
    assert "'optim.nesterov' needs optim.type 'sgd' with optim.momentum > 0" in msg
    msg = _error(["sched.min_lr=0.1"])
    assert "'sched.min_lr' (0.1) must not exceed 'optim.lr' (0.001)" in msg
    msg = _error(["eval.mode=slide"])
    assert "'eval.crop_size' is needed by eval.mode 'slide'" in msg and "model.data.crop_size" in msg
    assert load_config(None, ["eval.mode=slide", "eval.crop_size=32"])["eval"]["crop_size"] == 32
    assert "'data.num_classes' (5) differs from 'model.num_classes' (6)" in _error(["data.num_classes=5"])


# -- names and constructor keywords of the model section ---------------------------------------------
def test_misspelt_block_is_an_unknown_attention_block_with_suggestions():
    msg = _error(["model.attn=ccnnet"])
    assert msg.startswith("config key 'model.attn': unknown attention block 'ccnnet' (did you mean 'ccnet', ")
    assert "unknown head" not in msg


def test_misspelt_head_suggests_heads_and_blocks():
    msg = _error(["model.head=nonlocl", "model.attn=null"])
    assert msg.startswith("config key 'model.head': unknown head 'nonlocl' (did you mean 'nonlocal'")
    assert "['attn', 'ccnet', 'danet', 'dnl', 'emanet', 'fcn', 'gcnet', 'isanet', 'nonlocal']" in msg
    msg = _error(["model.head=performr", "model.attn=null"])  # a block used as the head
    assert "(did you mean 'performer'" in msg


def test_misspelt_backbone_suggests_timm_names():
    msg = _error(["model.backbone=resnet18x"])
    assert msg.startswith(
        "config key 'model.backbone': unknown timm model 'resnet18x' (did you mean 'resnet18'"
    )


def test_attn_kwargs_are_checked_against_the_block_constructor():
    msg = _error(["model.attn_kwargs={head: 2}"])
    assert msg.startswith("config key 'model.attn_kwargs.head': block 'efficient_attention' has no parameter")
    assert "did you mean 'heads'" in msg
    assert "valid: ['heads', 'key_channels', 'normalization', 'value_channels']" in msg
    msg = _error(["model.attn_kwargs={heads: '2'}"])
    assert msg.startswith("config key 'model.attn_kwargs.heads' must be int (as block 'efficient_attention'")
    # A value only the constructor can judge: it runs (on the meta device) before anything is built.
    msg = _error(["model.attn_kwargs={heads: 3}"])
    assert msg.startswith(
        "config key 'model.attn_kwargs.heads': block 'efficient_attention' with channels=64"
    )
    assert "cannot be built" in msg
    assert load_config(None, ["model.attn_kwargs={heads: 4}"])["model"]["attn_kwargs"] == {"heads": 4}


def test_head_and_aux_kwargs_are_checked_against_their_constructors():
    assert "'model.head_kwargs.chanels'" in _error(["model.head_kwargs={chanels: 64}"])
    msg = _error(["model.head_kwargs={channels: -1}"])
    assert msg.startswith("config key 'model.head_kwargs.channels': ")
    msg = _error(["model.aux_kwargs={channels: 0}"])
    assert msg.startswith("config key 'model.aux_kwargs.channels': the auxiliary FCNHead cannot be built")
    msg = _error(["model.head_kwargs={attn: cbam}"])
    assert "'model.head_kwargs.attn' is set by the segmentor itself" in msg
    assert load_config(None, ["model.head=fcn", "model.attn=null"])["model"]["head"] == "fcn"
    msg = _error(["model.head=fcn"])
    assert "config key 'model.attn' is only used with head 'attn', not with head 'fcn'" in msg
    msg = _error(["model.head=fcn", "model.attn=null", "model.attn_kwargs={heads: 2}"])
    assert "config key 'model.attn_kwargs' is only used with a block head" in msg


def test_backbone_attn_and_its_kwargs():
    assert "'model.backbone_attn': unknown attention block 'cbma'" in _error(["model.backbone_attn=cbma"])
    msg = _error(["model.backbone_attn=cbam", "model.backbone_attn_kwargs={reduce: 4}"])
    assert "'model.backbone_attn_kwargs.reduce'" in msg and "did you mean 'reduction'" in msg
    assert "'model.backbone_attn_kwargs' is only used with" in _error(["model.backbone_attn_kwargs={a: 1}"])


def test_checking_leaves_the_global_rng_alone():
    # performer's init cannot run on the meta device, so the check builds it for real (under fork_rng):
    # the model built afterwards must get the same initial weights as without the check.
    state = torch.random.get_rng_state()
    load_config(None, ["model.attn=performer"])
    assert torch.equal(state, torch.random.get_rng_state())


def test_segmentor_api_reports_unprefixed_keys():
    from visattn import create_segmentor

    base = {"backbone": "resnet10t", "head": "attn", "num_classes": 3, "aux": False}
    with pytest.raises(ConfigError, match=r"^config key 'attn': unknown attention block 'ccnnet'"):
        create_segmentor({**base, "attn": "ccnnet"})
    with pytest.raises(ValueError, match=r"^config key 'num_classes' must be a positive int, got True"):
        create_segmentor({**base, "attn": "cbam", "num_classes": True})


# -- every shipped config and zoo entry validates, and validation is idempotent ------------------------
def test_shipped_configs_validate_and_round_trip():
    from visattn import hub
    from visattn.models.segmentor import resolve_config

    paths = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(paths) >= 32  # the demo and one per zoo entry
    for path in paths:
        cfg = validate_config(yaml.safe_load(path.read_text()), check_paths=False)
        # A run's saved config.yaml is a validated config: it must validate to itself.
        assert validate_config(copy.deepcopy(cfg), check_paths=False) == cfg, path.name
    for name in hub.list_pretrained():
        assert resolve_config(name)["name"] == name


def test_spec_tables_cover_the_config_constants():
    from visattn.data import SYNTHETIC_DEFAULTS
    from visattn.models.segmentor import DATA_KEYS, DEFAULT_CONFIG

    assert set(MODEL_SPEC) == set(DEFAULT_CONFIG)
    assert set(MODEL_SPEC["data"].spec) == set(DATA_KEYS)
    assert set(SYNTHETIC_SPEC) == set(SYNTHETIC_DEFAULTS)
    for key, value in SYNTHETIC_DEFAULTS.items():
        SYNTHETIC_SPEC[key].check(f"data.synthetic.{key}", value)
    for sec, rules in SPEC.items():
        for key, rule in rules.items():
            rule.check(f"{sec}.{key}", DEFAULTS[sec][key])


# -- the CLI ---------------------------------------------------------------------------------------------
def test_cli_set_takes_several_pairs_after_one_flag(tmp_path, capsys):
    import argparse

    from visattn.engine.cli import _common, main_train

    parser = argparse.ArgumentParser()
    _common(parser)
    args = parser.parse_args(["c.yaml", "--set", "a=1", "b=[1, 2]", "--set", "c=3", "--work-dir", "w"])
    assert args.overrides == ["a=1", "b=[1, 2]", "c=3"] and args.config == "c.yaml"
    work = tmp_path / "w"
    # The bad pair is the second one after the flag: it is applied, reported in one line, exit 2.
    assert main_train(["--set", "train.iters=2", "data.crop_size=[48]", "--work-dir", str(work)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "config key 'data.crop_size' must be an int or [h, w]" in err
    assert not work.exists()


# -- the fuzzer --------------------------------------------------------------------------------------------
def _paths(node, prefix=""):
    """Every key path of a nested mapping (sections and leaves)."""
    out = []
    for key, value in node.items():
        path = f"{prefix}{key}"
        out.append(path)
        if isinstance(value, dict):
            out.extend(_paths(value, path + "."))
    return out


PATHS = _paths(DEMO)
MUTATIONS = ("drop", "none", "string", "negative", "zero", "float", "list", "nested", "unknown", "typo")


def _mutate(raw: dict, path: str, kind: str) -> tuple[dict, str]:
    """``raw`` with one mutation at ``path``; returns it and the key path an error must name."""
    raw = copy.deepcopy(raw)
    *parents, leaf = path.split(".")
    node = raw
    for part in parents:
        node = node[part]
    value = node[leaf]
    if kind == "drop":
        del node[leaf]
    elif kind == "unknown":
        if isinstance(value, dict):
            value["zz_unknown"] = 1
            return raw, f"{path}.zz_unknown"
        node["zz_" + leaf] = value
        return raw, ".".join([*parents, "zz_" + leaf])
    elif kind == "typo":
        node[leaf[:-1] or "x"] = node.pop(leaf)
        return raw, ".".join([*parents, leaf[:-1] or "x"])
    else:
        node[leaf] = {
            "none": None,
            "string": "not-a-value",
            "negative": -1 if isinstance(value, int) else -0.5,
            "zero": 0,
            "float": 1.5,
            "list": [*value, value[0]] if isinstance(value, list) and value else [1],
            "nested": {"x": {"y": 1}},
        }[kind]
    return raw, path


@settings(
    max_examples=400,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(path=st.sampled_from(PATHS), kind=st.sampled_from(MUTATIONS))
def test_fuzz_config_mutations_valid_or_config_error_naming_the_key(path, kind):
    raw, named = _mutate(DEMO, path, kind)
    try:
        cfg = validate_config(raw, check_paths=False)
    except ConfigError as err:
        msg = str(err)
        assert re.search(rf"(?<![\w.]){re.escape(named)}(?![\w])", msg), (path, kind, msg)
        assert "\n" not in msg
        return
    assert validate_config(copy.deepcopy(cfg), check_paths=False) == cfg, (path, kind)


@settings(max_examples=150, derandomize=True, deadline=None, database=None)
@given(
    path=st.sampled_from([p for p in PATHS if "." in p]),
    text=st.text(alphabet="01-.,:[]{}'\"ab &*!|>#%@`", max_size=10),
)
def test_fuzz_set_values_valid_or_config_error_naming_the_key(path, text):
    """Any text after ``--set key=`` (YAML that parses to anything, or does not parse at all)."""
    try:
        load_config(None, [f"{path}={text}"])
    except ConfigError as err:
        assert path in str(err) and "\n" not in str(err), (path, text, str(err))
