"""Recipes: the TOML format, validation errors that name the stage and the key, Python-built
recipes, the shipped recipes, and the dry-run plan."""

import re
from pathlib import Path

import pytest
import torch

import fxpress
from fxpress.recipe import STAGES, Decompose, Distill, FineTune, Prune, Quantize, Recipe, RecipeError, shipped_recipes

RECIPES = Path(fxpress.__file__).resolve().parent / "recipes"


def test_toml_and_python_recipes_are_the_same():
    text = """
[recipe]
name = "mine"
seed = 3

[[stage]]
kind = "prune"
ratio = 0.5
round_to = 8

[[stage]]
kind = "decompose"
budget = { params = 0.5 }

[[stage]]
kind = "distill"
epochs = 3

[[stage]]
kind = "quantize"
config = "int8_static"
"""
    from_toml = Recipe.from_toml(text)
    built = Recipe([Prune(0.5, round_to=8), Decompose(budget={"params": 0.5}), Distill(epochs=3), Quantize("int8_static")], name="mine", seed=3)
    assert from_toml == built
    assert [s.kind for s in from_toml.stages] == ["prune", "decompose", "distill", "quantize"]
    again = Recipe.from_toml(built.to_toml())  # our TOML writer round-trips through tomllib
    assert again == built and again.seed == 3 and again.name == "mine"
    assert fxpress.Recipe is Recipe and fxpress.Quantize is Quantize


@pytest.mark.parametrize(
    "toml, message",
    [
        ('[[stage]]\nkind = "quantize"\nconfg = "int8_static"', r"stage 1 \(quantize\): unknown option 'confg'\. Did you mean 'config'\?"),
        ('[[stage]]\nkind = "prune"\nratio = "0.5"', r"stage 1 \(prune\): option 'ratio' must be float, got str '0\.5'"),
        ('[[stage]]\nkind = "prune"\nratio = 1.5', r"stage 1 \(prune\): ratio must be a number in \[0, 1\)"),
        ('[[stage]]\nkind = "prune"\nfactors = "middle"', r"stage 1 \(prune\): factors must be"),
        ('[[stage]]\nkind = "prune"\n\n[[stage]]\nkind = "quantise"', r"stage 2: unknown kind 'quantise'\. Did you mean 'quantize'\?"),
        ('[[stage]]\nratio = 0.5', r"stage 1: no 'kind'"),
        ('[[stages]]\nkind = "prune"', r"unknown top-level key 'stages'\. Did you mean 'stage'\?"),
        ('[recipe]\nseeds = 1\n[[stage]]\nkind = "prune"', r"unknown key 'seeds' in \[recipe\]\. Did you mean 'seed'\?"),
        ('[recipe]\nname = "x"', r"no stages"),
        ('[[stage]]\nkind = "quantize"\nconfig = "int9"', r"stage 1 \(quantize\): unknown quantization preset 'int9'"),
        ('[[stage]]\nkind = "quantize"\n[[stage]]\nkind = "prune"', r"stage 1 \(quantize\): quantize must be the last stage"),
        ('[[stage]]\nkind = "quantize"\ncalibration = "digits"', r"stage 1 \(quantize\): option 'calibration' is supplied by Recipe\.apply"),
        ('[[stage]]\nkind = "decompose"', r"stage 1 \(decompose\): say how much to decompose"),
        ('[[stage]]\nkind = "sparsify"\nscope = "globl"', r"stage 1 \(sparsify\): scope must be one of 'layer', 'global', 'output'"),
        ('[[stage]]\nkind = "distill"\ntemprature = 2.0', r"stage 1 \(distill\): unknown option 'temprature'\. Did you mean 'temperature'\?"),
        ('[[stage]\nkind = "prune"', r"not valid TOML"),
        ('[[stage]]\nkind = "qat"\n[[stage]]\nkind = "prune"', r"stage 1 \(qat\): qat must be the last stage"),
        ('[[stage]]\nkind = "qat"\nbn = "frozen"', r"stage 1 \(qat\): bn must be one of \('fold', 'train'\)"),
        ('[[stage]]\nkind = "qat"\nepoch = 2', r"stage 1 \(qat\): unknown option 'epoch'\. Did you mean 'epochs'\?"),
    ],
)
def test_invalid_recipes_name_the_stage_and_the_key(toml, message):
    with pytest.raises(RecipeError, match=message) as info:
        Recipe.from_toml(toml, source="bad.toml")
    assert "bad.toml" in str(info.value)


def test_python_stages_are_validated_too():
    with pytest.raises(RecipeError, match=r"prune stage: unknown option 'ration'\. Did you mean 'ratio'"):
        Prune(ration=0.5)
    with pytest.raises(RecipeError, match="takes at most 1 positional"):
        Quantize("int8_static", "extra")
    with pytest.raises(RecipeError, match="quantize must be the last stage"):
        Recipe([Quantize("int8_dynamic"), FineTune(1)])


def test_a_stage_whose_module_is_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(Decompose, "function", "fxpress.no_such_module:decompose")
    with pytest.raises(RecipeError, match=r"stage 1 \(decompose\): the 'decompose' stage needs fxpress\.no_such_module\.decompose.*missing"):
        Recipe.from_toml('[[stage]]\nkind = "decompose"\nrank = 0.5')


def test_options_follow_the_functions_signatures():
    # the recipe layer lists no options of its own: what the function takes is what a stage takes
    import inspect

    for kind, cls in STAGES.items():
        params = set(inspect.signature(cls.target()).parameters)
        assert set(cls.option_names()) == params - set(cls.provided), kind
    assert "config" in Quantize.option_names() and "calibration" not in Quantize.option_names()


def test_shipped_recipes_parse_and_cover_the_issue():
    shipped = shipped_recipes()
    assert set(shipped) >= {"cnn-int8", "cnn-prune-int8", "transformer-dynamic-int8", "llm-int4-weight-only", "decompose-distill", "cnn-qat-int8"}
    for name, path in shipped.items():
        recipe = Recipe.from_file(path)
        assert recipe.name == name and recipe.description
        assert Recipe.load(name) == recipe  # by name as well as by path
    assert Recipe.load("cnn-int8").stages[0].needs_calibration()
    assert not Recipe.load("transformer-dynamic-int8").stages[0].needs_calibration()
    with pytest.raises(RecipeError, match="Did you mean the shipped recipe 'cnn-int8'"):
        Recipe.from_file(RECIPES / "cnn-int9.toml")


def test_missing_data_is_reported_before_anything_runs(digits):
    model, inputs, *_ = digits
    with pytest.raises(RecipeError, match=r"stage 1 \(quantize\) \(quantize int8_static\) needs calibration data"):
        Recipe([Quantize("int8_static")]).apply(model, inputs)
    with pytest.raises(RecipeError, match=r"stage 2 \(finetune\).*needs training data"):
        Recipe([Prune(0.5), FineTune(1)]).apply(model, inputs)


def test_dry_run_plan_shows_groups_and_quantizable_ops_and_changes_nothing(digits):
    model, inputs, calibration, *_ = digits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = Recipe([Prune(0.5, round_to=8), Decompose(rank=0.5), FineTune(2), Quantize("int8_static")])
    text = recipe.plan(model, inputs, calibration=calibration)
    assert "38,122 params" in text
    assert re.search(r"3 prunable \(128 channels\)", text)  # channel groups
    assert "quantizable ops (static): conv 4 of 4, add 1 of 1, avg_pool 1 of 1, linear 1 of 1" in text
    assert "candidate layers" in text
    assert "training data (MISSING)" in text and "calibration data (given)" in text
    assert "nothing was changed" in text
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
