"""`vesl train`'s options are TrainConfig's fields, each declared once; every training number has a finite range."""

from __future__ import annotations

import sys
import types
import typing

import annotated_types
import pytest

from vesl.cli import app
from vesl.cli.train import CLI_ONLY, _overrides, option_name
from vesl.pretrain.train import TrainConfig, load_config


def _train_command():
    import typer

    return typer.main.get_command(app).commands["train"]


def test_every_field_has_one_option_and_every_option_one_field():
    params = {p.name for p in _train_command().params} - {"help"}
    assert params - set(CLI_ONLY) == set(TrainConfig.model_fields)
    assert set(CLI_ONLY).isdisjoint(TrainConfig.model_fields)
    flags = [f for p in _train_command().params for f in (*p.opts, *p.secondary_opts)]
    assert len(flags) == len(set(flags))


def test_help_is_the_field_descriptions():
    helps = {p.name: p.help for p in _train_command().params}
    for name, field in TrainConfig.model_fields.items():
        assert field.description, f"TrainConfig.{name} needs a description: it is the --help of its flag"
        assert helps[name].startswith(field.description)


def _types(field) -> list:
    """The types a field takes, None left out: ``int | None`` -> [int]; ``Literal[...]`` stays whole."""
    union = typing.get_origin(field.annotation) in (typing.Union, types.UnionType)
    return [a for a in typing.get_args(field.annotation) if a is not type(None)] if union else [field.annotation]


def _other_value(name: str, field):
    """A valid value that is not the default, and the flags that set it."""
    flag = option_name(name, field)
    default = field.get_default()
    args = _types(field)
    kind = args[0]
    if kind is bool:
        on, off = flag.split("/")
        return (not default), [off if default else on]
    if typing.get_origin(kind) is typing.Literal:
        value = next(c for c in typing.get_args(kind) if c != default)
        return value, [flag, value]
    if typing.get_origin(kind) is list or (kind is str and len(args) > 1):
        return ["a", "b"], [flag, "a", flag, "b"]
    if typing.get_origin(kind) is dict or kind is dict:
        return {"anon": True}, [flag, '{"anon": true}']
    if kind is str:
        return "x", [flag, "x"]
    if kind is float:
        value = default / 2 if default else 0.5  # inside every float range (halving is exact in binary)
    else:
        value = (default or 1) + 1
    return value, [flag, str(value)]


def test_each_option_reaches_its_field():
    """No flag is silently dropped: each one, set to a non-default value, lands in the config."""
    command = _train_command()
    for name, field in TrainConfig.model_fields.items():
        value, argv = _other_value(name, field)
        if name != "data":
            argv += ["--data", "d"]
        ctx = command.make_context("train", argv)
        options = {k: v for k, v in ctx.params.items() if k not in CLI_ONLY}
        cfg = load_config(ctx.params["config"], **_overrides(options))
        assert getattr(cfg, name) == value, (name, argv)
        assert getattr(cfg, name) != field.get_default(), name


def test_every_number_has_a_range_and_must_be_finite():
    assert TrainConfig.model_config.get("allow_inf_nan") is False
    for name, field in TrainConfig.model_fields.items():
        args = _types(field)
        if args[0] not in (int, float):
            continue
        kinds = {type(m) for m in field.metadata}
        assert kinds & {annotated_types.Ge, annotated_types.Gt}, f"TrainConfig.{name} has no lower bound"
        assert kinds & {annotated_types.Le, annotated_types.Lt}, f"TrainConfig.{name} has no upper bound"


def _cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    from vesl.cli import main

    monkeypatch.setattr(sys, "argv", ["vesl", "train", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code, capsys.readouterr().err.strip()


@pytest.mark.parametrize(("args", "says"), [
    (("--batch-size", "99999999999999999999"), "batch_size: Input should be less than or equal to 65536"),
    (("--lambda", "inf"), "lam: Input should be a finite number"),
    (("--lr", "nan"), "lr: Input should be a finite number"),
    (("--text-sim-threshold", "5"), "text_sim_threshold: Input should be less than or equal to 1"),
    (("--seed", "-1"), "seed: Input should be greater than or equal to 0"),
    (("--storage-options", "{x"), "--storage-options must be a JSON object"),
    (("--device", "cuda:1"), "device: Input should be 'auto', 'cpu' or 'cuda'"),
])  # fmt: skip
def test_a_number_out_of_range_is_one_line(args, says, tmp_path, monkeypatch, capsys):
    code, err = _cli(monkeypatch, capsys, "--data", str(tmp_path), "--out", str(tmp_path / "run"), *args)
    assert code == 2
    assert len(err.splitlines()) == 1
    assert err.startswith("error: ")
    assert says in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_config_file_gets_the_same_ranges(tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"data: {tmp_path}\nlam: .inf\nregions_per_image: 100000\n")
    code, err = _cli(monkeypatch, capsys, "--config", str(cfg))
    assert code == 2
    assert "lam: Input should be a finite number" in err
    assert "regions_per_image: Input should be less than" in err
