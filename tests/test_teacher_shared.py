"""The teacher's outputs and top-1, shared between runs (distill.teacher_cache.SharedCache):
reused only for the very same teacher and images, recomputed when damaged, bounded in size."""
import json
import os

import mxnet as mx
import numpy as np

from helpers import run_cli, tiny_student, tiny_teacher


def _teacher(seed=0):
    from gluoncv.model_zoo import get_model
    from distill.teacher import Teacher
    mx.random.seed(seed)
    net = get_model("cifar_resnet20_v1", classes=4, prefix="t_")    # the same names every call
    net.initialize(mx.init.Xavier())
    net.hybridize()
    sym = net(mx.sym.var("data"))
    net(mx.nd.zeros((1, 1, 16, 16)))
    return Teacher(sym, {p.name: p.data() for p in net.collect_params().values()}, "test")


def test_outputs_reused_only_for_the_same_teacher_and_images(tmp_path):
    from distill.teacher_cache import SharedCache, TeacherOutputs
    shared = SharedCache(str(tmp_path))
    x = np.random.RandomState(0).rand(100, 1, 16, 16).astype("float32")
    t0 = _teacher(0)
    first = TeacherOutputs(t0, x, "memory", batch_size=32, progress=False, shared=shared)
    again = TeacherOutputs(_teacher(0), x, "memory", batch_size=32, progress=False, shared=shared)
    assert not first.reused and again.reused
    np.testing.assert_array_equal(first.arrays[0], again.arrays[0])
    idx = np.array([5, 3, 99])
    np.testing.assert_array_equal(first(idx, None)[0].asnumpy(), again(idx, None)[0].asnumpy())

    edited = x.copy()
    edited[7, 0, 3, 3] += 1e-3                       # one pixel of one image
    other_images = TeacherOutputs(t0, edited, "memory", batch_size=32, progress=False, shared=shared)
    other_teacher = TeacherOutputs(_teacher(1), x, "memory", batch_size=32, progress=False, shared=shared)
    assert not other_images.reused and not other_teacher.reused
    assert np.abs(other_images.arrays[0][7] - first.arrays[0][7]).max() > 0
    entries = [n for n in os.listdir(tmp_path) if n.startswith("outputs-")]
    assert len(entries) == 3

    # a damaged entry is computed again (and replaced), not trusted
    d = os.path.join(tmp_path, sorted(entries)[0])
    with open(os.path.join(d, "out0.npy"), "wb") as f:
        f.write(b"not an array")
    redo = [TeacherOutputs(t, xx, "memory", batch_size=32, progress=False, shared=shared)
            for t, xx in ((t0, x), (t0, edited), (_teacher(1), x))]
    assert sum(not r.reused for r in redo) == 1
    np.testing.assert_array_equal(redo[0].arrays[0], first.arrays[0])


def test_no_sharing_for_streamed_splits_or_disk_mode(tmp_path):
    from distill.teacher_cache import SharedCache, TeacherOutputs

    class Lazy:                                      # a streamed split: sliced, never whole
        def __init__(self, a):
            self.a, self.shape = a, a.shape

        def __len__(self):
            return len(self.a)

        def __getitem__(self, i):
            return self.a[i]

    shared = SharedCache(str(tmp_path / "shared"))
    os.makedirs(shared.path)
    x = np.random.RandomState(0).rand(40, 1, 16, 16).astype("float32")
    t = _teacher(0)
    for _ in range(2):
        lazy = TeacherOutputs(t, Lazy(x), "memory", batch_size=16, progress=False, shared=shared)
        disk = TeacherOutputs(t, x, "disk", cache_dir=str(tmp_path / "c"), batch_size=16,
                              progress=False, shared=shared)
        assert not lazy.reused and not disk.reused
    assert os.listdir(shared.path) == []


def test_shared_folder_is_private_and_bounded(tmp_path, monkeypatch):
    from distill import teacher_cache
    from distill.teacher_cache import SharedCache, shared_dir
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    monkeypatch.setenv("DISTILL_CACHE_DIR", str(open_dir))
    assert shared_dir() is None                     # others could plant entries there
    monkeypatch.setenv("DISTILL_CACHE_DIR", str(tmp_path / "mine"))
    path = shared_dir()
    assert path == str(tmp_path / "mine") and os.stat(path).st_mode & 0o777 == 0o700

    monkeypatch.setattr(teacher_cache, "SHARED_MAX_MB", 1.5)   # room for one 1-MiB entry
    cache = SharedCache(path)
    a = np.zeros((1024, 256), np.float32)                       # 1 MiB
    cache.store_arrays("old", [a])
    cache.store_arrays("new", [a + 1])
    assert cache.load_arrays("old", 1) is None
    np.testing.assert_array_equal(cache.load_arrays("new", 1)[0], a + 1)
    cache.put_value("k", 91.5)
    assert SharedCache(path).get_value("k") == 91.5 and cache.get_value("other") is None
    assert not [n for n in os.listdir(path) if n.startswith(".tmp-")]


def test_second_student_reuses_the_teachers_outputs_and_top1(tmp_path, monkeypatch):
    """Two students of one teacher on one split: the second reads the teacher's train outputs
    and its val top-1 from the shared cache, and trains exactly as if it had computed them;
    ``teacher_cache_shared: false`` computes both again."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("DISTILL_CACHE_DIR", str(cache))      # run_cli passes os.environ on
    tp = tiny_teacher(tmp_path, epochs=1)
    runs = []
    for name, extra in (("s1", {}), ("s2", {}), ("s3", {"teacher_cache_shared": False})):
        sp = tiny_student(tmp_path, tp, name=name, epochs=1,
                          trainer={"seed": 0, **extra}, output={"latency": False})
        res = run_cli(sp)
        assert res.returncode == 0, res.stderr[-2000:]
        runs.append((res.stdout + res.stderr, json.load(open(tmp_path / "runs" / name / "metrics.json"))))
    (log1, m1), (log2, m2), (log3, m3) = runs
    assert "teacher outputs: cached once" in log1 and "teacher outputs: reused" in log2
    assert "teacher outputs: cached once" in log3
    assert m1["teacher"]["top1"] == m2["teacher"]["top1"] == m3["teacher"]["top1"]
    assert [h["loss"] for h in m1["history"]] == [h["loss"] for h in m2["history"]]
    assert m1["student"]["top1"] == m2["student"]["top1"]
    with open(cache / "evals.json") as f:
        assert len(json.load(f)) == 1
