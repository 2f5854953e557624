import pytest

from diffquant.core.errors import DiffquantError
from diffquant.core.recipes import (RECIPE_VERSION, RECIPES, PerChannel, PerGroup, PerTensor, Recipe, TensorQuant,
                               get_recipe, parse_recipes, recipe_from_dict)


def test_unknown_recipe_lists_the_valid_ones():
    with pytest.raises(DiffquantError) as error:
        get_recipe("int3-w")
    message = str(error.value)
    assert "int3-w" in message and all(name in message for name in RECIPES)


def test_tutorial_recipes_are_there_with_their_per_channel_variants():
    assert get_recipe("int8-w").weight == TensorQuant("int8", PerTensor(), "min_max")
    assert get_recipe("fp8-w").weight.dtype == "fp8_e4m3"
    assert isinstance(get_recipe("int8-w-pc").weight.granularity, PerChannel)
    assert isinstance(get_recipe("fp8-w-pc").weight.granularity, PerChannel)
    assert all(not r.needs_calibration for r in RECIPES.values() if r.name.endswith(("-w", "-w-pc")))


def test_parse_recipes_refuses_blanks_and_duplicates():
    assert [r.name for r in parse_recipes("int8-w,fp8-w")] == ["int8-w", "fp8-w"]
    with pytest.raises(DiffquantError, match="twice"):
        parse_recipes("int8-w,int8-w")
    with pytest.raises(DiffquantError, match="empty"):
        parse_recipes("int8-w,")


def test_bad_dataclass_values_name_the_allowed_ones():
    with pytest.raises(DiffquantError, match="int8, fp8_e4m3, int4, uint4, mxfp4"):
        TensorQuant("int2")
    with pytest.raises(DiffquantError, match="min_max"):
        TensorQuant("int8", observer="magic")


def test_recipe_round_trips_through_its_versioned_dict():
    recipe = get_recipe("int8-w-pc").with_exclude(["conv_in", "*time_emb*"])
    data = recipe.to_dict()
    assert data["type"] == "Recipe" and data["version"] == RECIPE_VERSION
    assert recipe_from_dict(data) == recipe
    assert get_recipe("int8-w-pc").exclude == ()  # the table's recipe is not mutated
    ort_recipe = get_recipe("w8a8-int8-ort")
    assert recipe_from_dict(ort_recipe.to_dict()) == ort_recipe and ort_recipe.conv_output.dtype == "int8"


def test_version_1_recipe_files_still_load():
    data = get_recipe("w8a8-int8").to_dict()
    del data["conv_output"]
    data["version"] = 1  # files written by `diffquant sensitivity` before conv_output existed
    assert recipe_from_dict(data) == get_recipe("w8a8-int8")


def test_conv_output_quantization_needs_activation_quantization():
    with pytest.raises(DiffquantError, match="conv_output needs activation"):
        Recipe("x", TensorQuant("int8"), conv_output=TensorQuant("int8"))


def test_4bit_recipes_round_trip_and_version_3_files_still_load():
    for name in ("int4-w", "int4-w-conv8", "mxfp4-w"):
        recipe = get_recipe(name)
        assert recipe.four_bit and not recipe.needs_calibration and recipe_from_dict(recipe.to_dict()) == recipe
    assert isinstance(get_recipe("int4-w").weight.granularity, PerGroup) and get_recipe("int4-w").fallback is None
    assert get_recipe("int4-w-conv8").fallback == TensorQuant("int8", PerChannel())
    data = get_recipe("int8-w-pc").to_dict()
    del data["fallback"]
    data["version"] = 3  # written before 4-bit recipes
    assert recipe_from_dict(data) == get_recipe("int8-w-pc")
    bad = get_recipe("int4-w").to_dict()
    bad["weight"]["group_size"] = 48
    with pytest.raises(DiffquantError, match="group size 48"):
        recipe_from_dict(bad)
