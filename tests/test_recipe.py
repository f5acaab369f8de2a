"""Recipe loading: strict keys, types, ranges, extends, --set, round-trip."""
import os

import pytest
import yaml
from hypothesis import given, settings, strategies as st

from distill.errors import UserError
from distill.recipe import (apply_overrides, load_recipe, recipe_from_dict, recipe_hash,
                            recipe_to_dict)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bundled_recipes_load():
    """Every recipe in recipes/ validates: run recipes with load_recipe, comparison recipes
    (a `variants` list) with the compare loader, which validates each variant's run recipe."""
    from distill.compare.spec import load_comparison
    names = sorted(n for n in os.listdir(os.path.join(ROOT, "recipes")) if n.endswith(".yaml"))
    kinds = {}
    for name in names:
        path = os.path.join(ROOT, "recipes", name)
        with open(path) as f:
            raw = yaml.safe_load(f)
        if "variants" in raw:
            assert load_comparison(path).variants
            kinds[name] = "compare"
        else:
            assert load_recipe(path).name
            kinds[name] = "run"
    # one commented recipe per use case
    for needed in ("quickstart.yaml", "teacher_mnist.yaml", "prune_channel_mnist.yaml",
                   "prune_unstructured_mnist.yaml", "feature_kd_mnist.yaml", "moduleapi_teacher.yaml",
                   "int8_mnist.yaml", "compare_mnist.yaml"):
        assert needed in kinds, needed
        assert open(os.path.join(ROOT, "recipes", needed)).read().startswith("#"), f"{needed}: no comment"


def test_quickstart_contract_keys():
    r = load_recipe(os.path.join(ROOT, "recipes", "quickstart.yaml"))
    assert r.data.name == "mnist5k"
    assert r.teacher.recipe == "teacher_mnist.yaml"
    assert r.student.model == "mobilenetv2_0.5"
    assert [t.loss for t in r.distillation] == ["kd", "ce"]
    assert r.trainer.epochs >= 1 and r.trainer.seed == 0
    # the whole pipeline: AGP channel pruning → int8 (auto) → every export format
    assert r.pruning.enabled and r.pruning.granularity == "channel" and r.pruning.schedule == "agp"
    assert r.pruning.round_to == 8
    assert r.quantization.enabled and r.quantization.exclude == "auto"
    assert r.export.enabled and r.export.formats == ["mxnet", "onnx", "onnx-int8", "ncnn", "ncnn-int8"]


def test_unknown_key_names_path_and_closest():
    with pytest.raises(UserError) as e:
        recipe_from_dict({"trainer": {"epochz": 1}})
    assert "`trainer.epochz`" in str(e.value) and "`epochs`" in str(e.value)
    with pytest.raises(UserError) as e:
        recipe_from_dict({"dat": {"name": "digits"}})
    assert "`dat`" in str(e.value) and "`data`" in str(e.value)
    with pytest.raises(UserError) as e:
        recipe_from_dict({"distillation": [{"loss": "kd", "temprature": 2}], "teacher": {"recipe": "x"}})
    assert "distillation[0].temprature" in str(e.value) and "temperature" in str(e.value)


@pytest.mark.parametrize("raw,key", [
    ({"trainer": {"lr": -0.1}}, "trainer.lr"),
    ({"trainer": {"epochs": 0}}, "trainer.epochs"),
    ({"trainer": {"epochs": "ten"}}, "trainer.epochs"),
    ({"trainer": {"optimizer": "rmsprop"}}, "trainer.optimizer"),
    ({"distillation": [{"loss": "kd", "temperature": 0}], "teacher": {"recipe": "t.yaml"}},
     "distillation[0].temperature"),
    ({"data": {"std": [0.0]}}, "data.std"),
    ({"data": {"mean": [0.1, 0.2], "std": [0.3]}}, "data.mean"),
])
def test_bad_values_name_the_key(raw, key):
    with pytest.raises(UserError) as e:
        recipe_from_dict(raw)
    assert f"`{key}`" in str(e.value)


def test_kd_without_teacher_is_rejected():
    with pytest.raises(UserError) as e:
        recipe_from_dict({"distillation": [{"loss": "kd"}]})
    assert "teacher" in str(e.value)


def test_student_from_teacher_and_model_exclusive():
    r = recipe_from_dict({"student": {"from": "teacher"}, "teacher": {"recipe": "t.yaml"}})
    assert r.student.from_ == "teacher" and r.student.model is None
    with pytest.raises(UserError):
        recipe_from_dict({"student": {"from": "teacher", "model": "mobilenet0.5"},
                          "teacher": {"recipe": "t.yaml"}})


def test_set_overrides_and_types(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"name": "x", "trainer": {"epochs": 5}}))
    r = load_recipe(str(p), ["trainer.epochs=2", "trainer.lr=0.01", "data.name=digits",
                             "data.mean=[0.5]"])
    assert (r.trainer.epochs, r.trainer.lr, r.data.name, r.data.mean) == (2, 0.01, "digits", [0.5])
    with pytest.raises(UserError) as e:
        load_recipe(str(p), ["trainer.epochz=1"])
    assert "trainer.epochz" in str(e.value) and "epochs" in str(e.value)
    with pytest.raises(UserError):
        load_recipe(str(p), ["trainer.epochs"])


def test_extends_deep_merges(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(
        {"name": "base", "trainer": {"epochs": 7, "lr": 0.2}, "data": {"name": "digits"}}))
    (tmp_path / "child.yaml").write_text(yaml.safe_dump(
        {"extends": "base.yaml", "name": "child", "trainer": {"epochs": 3}}))
    r = load_recipe(str(tmp_path / "child.yaml"))
    assert (r.name, r.trainer.epochs, r.trainer.lr, r.data.name) == ("child", 3, 0.2, "digits")
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(UserError) as e:
        load_recipe(str(tmp_path / "loop.yaml"))
    assert "cycle" in str(e.value)


def test_yaml_syntax_error_has_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\ntrainer:\n  epochs: 3\n   lr: 0.1\n")
    with pytest.raises(UserError) as e:
        load_recipe(str(p))
    assert "line 4" in str(e.value) and str(p) in str(e.value)


def test_missing_file():
    with pytest.raises(UserError) as e:
        load_recipe("/nonexistent/r.yaml")
    assert "/nonexistent/r.yaml" in str(e.value)


def test_round_trip_bundled():
    r = load_recipe(os.path.join(ROOT, "recipes", "quickstart.yaml"))
    d = recipe_to_dict(r)
    r2 = recipe_from_dict(yaml.safe_load(yaml.safe_dump(d)))
    assert recipe_to_dict(r2) == d and recipe_hash(r2) == recipe_hash(r)


def test_hash_changes_with_content_not_output():
    a = recipe_from_dict({"trainer": {"epochs": 3}})
    b = recipe_from_dict({"trainer": {"epochs": 4}})
    c = recipe_from_dict({"trainer": {"epochs": 3}, "output": {"dir": "/tmp/elsewhere"}})
    assert recipe_hash(a) != recipe_hash(b) and recipe_hash(a) == recipe_hash(c)


_leaf = st.one_of(st.none(), st.booleans(), st.integers(-5, 100), st.floats(-1, 10, allow_nan=False),
                  st.text(max_size=8), st.lists(st.integers(0, 5), max_size=3))
_keys = st.sampled_from(["name", "data", "teacher", "student", "trainer", "distillation", "epochs",
                         "lr", "loss", "weight", "model", "from", "recipe", "mean", "bogus"])
_tree = st.recursive(_leaf, lambda ch: st.one_of(st.lists(ch, max_size=3),
                                                 st.dictionaries(_keys, ch, max_size=4)), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_keys, _tree, max_size=6))
def test_random_structures_raise_only_user_error(raw):
    try:
        r = recipe_from_dict(raw)
    except UserError:
        return
    assert recipe_from_dict(recipe_to_dict(r)) == r


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_random_yaml_text_raises_only_user_error(tmp_path_factory, text):
    p = tmp_path_factory.mktemp("y") / "r.yaml"
    p.write_text(text)
    try:
        load_recipe(str(p))
    except UserError:
        pass


def test_run_folder_recipes_written_before_losses_declared_options_still_load():
    """Old resolved recipes carry every loss's default options on every term."""
    legacy = {"temperature": 4.0, "p": 2.0, "distance_weight": 25.0, "angle_weight": 50.0}
    r = recipe_from_dict({"teacher": {"recipe": "t.yaml"},
                          "distillation": [{"loss": "kd", "weight": 0.7, **legacy},
                                           {"loss": "ce", "weight": 0.3, **legacy}]})
    assert r.distillation[0].options == {"temperature": 4.0}
    assert r.distillation[1].options == {}
    with pytest.raises(UserError) as e:          # a value the user chose is never dropped
        recipe_from_dict({"distillation": [{"loss": "ce", "temperature": 3.0}]})
    assert "distillation[0].temperature" in str(e.value)


def test_pruning_section_without_enabled_prunes():
    on = recipe_from_dict({"pruning": {"granularity": "channel", "criterion": "l1", "schedule": "agp",
                                       "final_sparsity": 0.5}})
    assert on.pruning.enabled and on.pruning.final_sparsity == 0.5
    off = recipe_from_dict({"pruning": {"enabled": False, "final_sparsity": 0.5}})
    assert not off.pruning.enabled
    assert not recipe_from_dict({}).pruning.enabled
    # --set on a recipe without the section is a pruning section that sets a key
    assert recipe_from_dict(apply_overrides({}, ["pruning.final_sparsity=0.7"])).pruning.enabled


def test_default_distillation_is_kd_plus_ce_with_a_teacher():
    with_teacher = recipe_from_dict({"teacher": {"recipe": "teacher_mnist.yaml"}})
    assert [(t.loss, t.weight) for t in with_teacher.distillation] == [("kd", 0.7), ("ce", 0.3)]
    assert with_teacher.distillation[0].options == {"temperature": 4.0}
    alone = recipe_from_dict({})
    assert [t.loss for t in alone.distillation] == ["ce"]
    mine = recipe_from_dict({"teacher": {"recipe": "t.yaml"}, "distillation": [{"loss": "ce"}]})
    assert [t.loss for t in mine.distillation] == ["ce"]


def test_extends_resolves_paths_against_the_file_that_wrote_them(tmp_path):
    bundled = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")
    user = tmp_path / "mine"
    user.mkdir()
    (user / "local_data").mkdir()
    (user / "my.yaml").write_text(
        f"extends: {os.path.join(bundled, 'quickstart.yaml')}\nname: mine\n"
        "data: {root: local_data}\n")
    r = load_recipe(str(user / "my.yaml"))
    # teacher.recipe was written in the bundled quickstart: it still names the bundled teacher
    assert os.path.samefile(os.path.join(user, r.teacher.recipe), os.path.join(bundled, "teacher_mnist.yaml"))
    assert r.data.root == "local_data"           # written in the user's file: kept as written
    # a base in the same folder: nothing is rewritten (bundled recipes' hashes stay)
    (user / "base.yaml").write_text("teacher: {checkpoint: missing/prefix}\n")
    (user / "child.yaml").write_text("extends: base.yaml\n")
    assert load_recipe(str(user / "child.yaml")).teacher.checkpoint == "missing/prefix"


def test_export_section_formats_match_the_registry():
    from distill.export import core  # noqa: F401  (registers every format)
    from distill.export.formats import FORMATS
    from distill.recipe import EXPORT_FORMATS
    assert sorted(EXPORT_FORMATS) == sorted(FORMATS.names())
    assert recipe_from_dict({"export": {"formats": ["onnx"]}}).export.enabled
    assert not recipe_from_dict({"export": {"enabled": False, "formats": ["onnx"]}}).export.enabled
    with pytest.raises(UserError, match="ncnn-int8"):
        recipe_from_dict({"export": {"formats": ["ncnn_int8"]}})
