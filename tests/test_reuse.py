"""No stale reuse: a finished run folder stands for a run only when its recipe hash and the tool
that wrote it (version, commit, uncommitted changes to the tool's source) are the ones now.

The rule is :func:`distill.runfolder.reuse_check`; here through its callers (``teacher.recipe``
and ``distill compare``) on a tiny run (one epoch, 128 synthetic images: about a second), and on
its own for each way a run can be stale. A stale run is "made" by editing what its
``metrics.json`` records (another commit) or by running another recipe.
"""
import logging
import os
import shutil
import subprocess

import pytest
import yaml

from distill.compare.runner import run_comparison
from distill.compare.spec import load_comparison
from distill.graphio import pair_files
from distill.run import teacher_recipe_prefix
from distill.runfolder import (PROVENANCE_KEY, RunFolder, provenance_change, reuse_check,
                               source_hash, source_state, tool_provenance)

OLD_COMMIT = "0" * 40


def _recipe(tmp, run_dir, **trainer):
    r = {"name": "reuse_teacher",
         "data": {"name": "synthetic", "num_samples": 160, "num_classes": 4, "image_size": 16},
         "student": {"model": "mobilenet0.25"}, "distillation": [{"loss": "ce", "weight": 1.0}],
         "trainer": {"epochs": 1, "batch_size": 32, "lr": 0.1, "progress": False, **trainer},
         "output": {"dir": str(run_dir), "latency": False}}
    path = os.path.join(str(tmp), "teacher.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(r, f)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One teacher run, trained once (``teacher.recipe``'s route); tests copy it to change it."""
    tmp = tmp_path_factory.mktemp("reuse")
    path = _recipe(tmp, tmp / "runs" / "t")
    teacher_recipe_prefix(path)
    assert RunFolder(str(tmp / "runs" / "t")).is_complete()
    return tmp / "runs" / "t"


def _copy(trained, tmp_path, **trainer):
    """A copy of the trained run in ``tmp_path`` and its recipe (``trainer`` keys changed)."""
    run = tmp_path / "runs" / "t"
    shutil.copytree(trained, run)
    return str(run), _recipe(tmp_path, run, **trainer)


def _set_commit(run, commit):
    """As if another commit with other code had written the run."""
    folder = RunFolder(run)
    m = folder.read_metrics()
    m[PROVENANCE_KEY].update(commit=commit, source="0" * 16)
    folder.write_metrics(m)


def _stamps(run):
    folder = RunFolder(run)
    return [os.path.getmtime(p) for p in (folder.metrics_path, folder.model_params_path)]


# -- teacher.recipe ----------------------------------------------------------------------------

def test_teacher_run_of_same_recipe_and_tool_is_reused(trained, caplog):
    before = _stamps(trained)
    with caplog.at_level(logging.INFO, logger="distill.run"):
        teacher_recipe_prefix(_recipe(trained.parent.parent, trained))
    assert "reusing the trained teacher" in caplog.text and "training it" not in caplog.text
    assert _stamps(trained) == before                           # nothing retrained


def test_teacher_run_of_another_commit_is_trained_again(trained, tmp_path, caplog):
    run, path = _copy(trained, tmp_path)
    _set_commit(run, OLD_COMMIT)
    before = _stamps(run)
    with caplog.at_level(logging.INFO, logger="distill.run"):
        teacher_recipe_prefix(path)
    assert "commit 000000000000" in caplog.text
    assert "whose source differs from now's (source 0000000000000000, now " in caplog.text
    assert "training it from" in caplog.text
    assert _stamps(run) != before
    assert RunFolder(run).read_metrics()[PROVENANCE_KEY] == tool_provenance()
    # trained afresh, not handed back by resuming the stale run's last checkpoint
    with open(RunFolder(run).log_path) as f:
        assert "resumed from" not in f.read().split("== teacher run")[-1]


def test_teacher_run_of_another_recipe_is_trained_again(trained, tmp_path, caplog):
    run, path = _copy(trained, tmp_path, lr=0.05)
    before = _stamps(run)
    with caplog.at_level(logging.INFO, logger="distill.run"):
        teacher_recipe_prefix(path)
    assert "was trained from another recipe" in caplog.text and "trainer.lr 0.1 → 0.05" in caplog.text
    assert _stamps(run) != before


def test_teacher_recipe_with_dist_kvstore_reuses_its_local_run(trained, tmp_path, caplog):
    """A ``dist_*`` teacher recipe is trained by one process with kvstore local: the run records
    that recipe's hash, and the next job reuses it (it was trained again every time)."""
    run, path = _copy(trained, tmp_path, kvstore="dist_sync")
    before = _stamps(run)
    with caplog.at_level(logging.INFO, logger="distill.run"):
        teacher_recipe_prefix(path)
    assert "reusing the trained teacher" in caplog.text
    assert _stamps(run) == before


# -- distill compare ---------------------------------------------------------------------------

def _comparison(tmp_path, recipe, sets=()):
    spec = {"name": "reuse_cmp", "out": str(tmp_path / "cmp"),
            "variants": [{"name": "t", "recipe": recipe, "set": list(sets)}]}
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(spec))
    return load_comparison(str(path))


def test_compare_copies_and_reuses_only_runs_of_the_same_recipe_and_tool(trained, tmp_path):
    run, path = _copy(trained, tmp_path)
    comp = _comparison(tmp_path, path)
    target = comp.run_dir(comp.variants[0], 0)
    lines = []
    run_comparison(comp, log=lines.append)                      # the recipe's own run, copied
    assert any("copied to" in l for l in lines) and not any("training" in l for l in lines)
    before = _stamps(target)
    lines.clear()
    run_comparison(comp, log=lines.append)                      # then reused in place
    assert any(l.startswith(f"compare: reusing {target}") for l in lines)
    assert _stamps(target) == before

    _set_commit(target, OLD_COMMIT)                             # the copy: another commit
    _set_commit(run, OLD_COMMIT)                                # and the recipe's own run too
    lines.clear()
    run_comparison(comp, log=lines.append)
    (line,) = [l for l in lines if "training it again" in l]
    assert f"{target} was written by distill " in line and "whose source differs" in line
    assert f"{run} was written by distill " in line
    assert _stamps(target) != before
    assert RunFolder(target).read_metrics()[PROVENANCE_KEY] == tool_provenance()


def test_compare_trains_a_variant_whose_recipe_changed(trained, tmp_path):
    run, path = _copy(trained, tmp_path)
    comp = _comparison(tmp_path, path)
    target = comp.run_dir(comp.variants[0], 0)
    run_comparison(comp, log=lambda _: None)                    # copied: same recipe
    before = _stamps(target)
    changed = _comparison(tmp_path, path, sets=["trainer.lr=0.05"])
    lines = []
    run_comparison(changed, log=lines.append)
    (line,) = [l for l in lines if "training it again" in l]
    assert f"{target} was trained from another recipe" in line and "trainer.lr 0.1 → 0.05" in line
    assert f"{run} was trained from another recipe" in line      # nor copied from its own run
    assert _stamps(target) != before
    assert RunFolder(target).read_metrics()["recipe_hash"] != RunFolder(run).read_metrics()["recipe_hash"]


# -- the rule on its own -----------------------------------------------------------------------

def _fake_run(tmp_path, recipe_hash="abc", provenance=None, complete=True):
    folder = RunFolder(str(tmp_path / "run"))
    os.makedirs(folder.path, exist_ok=True)
    for f in pair_files(folder.model_prefix):
        open(f, "w").close()
    folder.write_recipe_dict({"name": "x", "trainer": {"epochs": 1}})
    m = {"complete": complete, "recipe_hash": recipe_hash}
    if provenance is not False:
        m[PROVENANCE_KEY] = provenance or tool_provenance()
    folder.write_metrics(m)
    return folder.path


def test_reuse_check_each_way_a_run_is_stale(tmp_path):
    now = tool_provenance()
    run = _fake_run(tmp_path)
    ok, why = reuse_check(run, "abc")
    assert ok and "same recipe, same tool" in why
    ok, why = reuse_check(run, "def", {"name": "x", "trainer": {"epochs": 2}})
    assert not ok and "another recipe (hash abc, now def): trainer.epochs 1 → 2" in why
    run = _fake_run(tmp_path, provenance=dict(now, commit=OLD_COMMIT))
    assert reuse_check(run, "abc")[0]                         # another commit, the same code
    for change, expected in ((dict(version="0.0.1"), f"distill 0.0.1 (now {now['version']})"),
                             (dict(commit=OLD_COMMIT, source=None), "commit 000000000000 (now "),
                             (dict(commit=OLD_COMMIT, source="f" * 16),
                              f"commit 000000000000")):
        run = _fake_run(tmp_path, provenance=dict(now, **change))
        ok, why = reuse_check(run, "abc")
        assert not ok and f"{run} was written by " in why and expected in why
    assert f"(source {'f' * 16}, now {now['source']}: " in why
    run = _fake_run(tmp_path, provenance=False)                # written before provenance
    ok, why = reuse_check(run, "abc")
    assert not ok and "records no provenance" in why
    run = _fake_run(tmp_path, complete=False)
    assert reuse_check(run, "abc") == (False, f"{run} holds no complete run")


def test_uncommitted_changes_match_only_the_same_changes():
    clean = {"version": "1", "commit": "a" * 40, "dirty": False, "source_diff": None}
    edited = dict(clean, dirty=True, source_diff="123")
    assert provenance_change(clean, dict(clean)) is None
    assert provenance_change(edited, dict(edited)) is None       # one session, same tree: reused
    assert "now with changes" in provenance_change(clean, edited)
    assert "(now without)" in provenance_change(edited, clean)
    assert "source diff 123, now 456" in provenance_change(edited, dict(edited, source_diff="456"))
    outside = {"version": "1", "commit": None, "dirty": None, "source_diff": None}
    assert provenance_change(outside, dict(outside)) is None     # no git: the version decides
    assert provenance_change(outside, dict(outside, version="2")) == "distill 1 (now 2)"


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                   check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_source_state_of_a_checkout(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    pkg = repo / "distill"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("x = 1\n")
    (repo / "README.md").write_text("read me\n")
    assert source_state(str(pkg)) == (None, None, None)          # not a checkout
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "one")
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert source_state(str(pkg)) == (head, False, None)
    (repo / "README.md").write_text("edited\n")                  # not the tool's source
    assert source_state(str(pkg)) == (head, False, None)
    (pkg / "__init__.py").write_text("x = 2\n")
    commit, dirty, diff = source_state(str(pkg))
    assert (commit, dirty) == (head, True) and len(diff) == 12
    (pkg / "new.py").write_text("")                              # an untracked module counts
    assert source_state(str(pkg))[2] not in (None, diff)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))           # no git at all: never fails
    assert source_state(str(pkg)) == (None, None, None)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_source_hash_follows_the_code_not_the_commit(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    pkg = repo / "distill"
    (pkg / "compare").mkdir(parents=True)
    (pkg / "__init__.py").write_text("x = 1\n")
    (pkg / "compare" / "table.py").write_text("t = 1\n")
    (repo / "README.md").write_text("read me\n")
    (repo / "docs").mkdir()
    (repo / "docs" / "recipes.md").write_text("# Recipes\n")
    assert source_hash(str(pkg)) is None                         # not a checkout
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "one")
    first = source_hash(str(pkg))
    assert first and len(first) == 16
    (repo / "README.md").write_text("edited\n")                  # docs, committed or not
    (repo / "docs" / "recipes.md").write_text("# Recipes, edited\n")
    (pkg / "compare" / "table.py").write_text("t = 2\n")         # report-only code
    _git(repo, "commit", "-qam", "two")
    assert source_hash(str(pkg)) == first
    (pkg / "__init__.py").write_text("x = 2\n")                  # the tool's code, uncommitted
    second = source_hash(str(pkg))
    assert second not in (None, first)
    _git(repo, "commit", "-qam", "three")                        # ... and committed: the same code
    assert source_hash(str(pkg)) == second
    (pkg / "new.py").write_text("")                              # an untracked module counts
    assert source_hash(str(pkg)) not in (None, second)
    (pkg / "new.py").unlink()
    (pkg / "__init__.py").write_text("x = 1\n")                  # back to the first code
    assert source_hash(str(pkg)) == first
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert source_hash(str(pkg)) is None


def test_a_finished_run_records_its_provenance(trained):
    m = RunFolder(str(trained)).read_metrics()
    assert m["complete"] and m[PROVENANCE_KEY] == tool_provenance()
    assert set(m[PROVENANCE_KEY]) == {"version", "commit", "dirty", "source_diff", "source"}
