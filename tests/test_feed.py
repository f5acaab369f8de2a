"""The epoch's batches (distill.feed): the order and augmentation the loop always had, resumable
at any step, GluonCV's per-image augmentations on in-memory sets, prefetching that stops."""
import numpy as np
import pytest

from distill.data import load_data
from distill.data.base import Split
from distill.feed import EpochFeed, augment_batch, batch_order, epoch_seed
from distill.recipe import DataConfig


@pytest.fixture(scope="module")
def digits():
    return load_data(DataConfig(name="digits", limit=300), seed=0)


def _collect(feed):
    return [(b.step, b.idx.copy(), b.x.copy()) for b in feed]


@pytest.mark.parametrize("prefetch", [0, 2])
def test_order_and_crop_flip_are_the_loops_rule(digits, prefetch):
    """The permutation and crop/hflip come from RandomState(seed * 100003 + epoch), batch after
    batch, as the loop drew them before the feed existed."""
    seed, epoch, bs = 5, 2, 32
    got = _collect(EpochFeed(digits.train, bs, 100, seed, epoch, ["crop", "hflip"], prefetch=prefetch))
    rng = np.random.RandomState(epoch_seed(seed, epoch))
    order = batch_order(len(digits.train), bs, rng)
    assert len(got) == len(order) == len(digits.train) // bs
    for (step, idx, x), want in zip(got, order):
        assert np.array_equal(idx, want)
        assert np.array_equal(x, augment_batch(digits.train.x[want], ["crop", "hflip"], rng))


@pytest.mark.parametrize("augment", [[], ["crop", "hflip"], ["random_resized_crop", "hflip", "color_jitter"]])
def test_a_resumed_epoch_sees_the_same_batches(digits, augment):
    full = _collect(EpochFeed(digits.train, 32, 100, 1, 0, augment, mean=digits.mean, std=digits.std,
                              options=digits.augment_options))
    late = _collect(EpochFeed(digits.train, 32, 100, 1, 0, augment, start_step=4, mean=digits.mean,
                              std=digits.std, options=digits.augment_options))
    assert [s for s, _, _ in late] == [s for s, _, _ in full][4:]
    for (_, ia, xa), (_, ib, xb) in zip(full[4:], late):
        assert np.array_equal(ia, ib) and np.array_equal(xa, xb)


def test_per_image_augmentations_on_an_in_memory_set(digits):
    opts = digits.augment_options
    kw = dict(mean=digits.mean, std=digits.std, options=opts)
    plain = _collect(EpochFeed(digits.train, 32, 2, 3, 0, [], **kw))
    a = _collect(EpochFeed(digits.train, 32, 2, 3, 0, ["random_resized_crop", "color_jitter"], **kw))
    b = _collect(EpochFeed(digits.train, 32, 2, 3, 0, ["random_resized_crop", "color_jitter"], **kw))
    c = _collect(EpochFeed(digits.train, 32, 2, 3, 1, ["random_resized_crop", "color_jitter"], **kw))
    assert all(np.array_equal(x, y) for (_, _, x), (_, _, y) in zip(a, b))          # seeded
    assert not np.array_equal(a[0][2], plain[0][2])                                   # in effect
    assert not np.array_equal(a[0][2], c[0][2])                                       # per epoch
    assert a[0][2].shape == plain[0][2].shape and np.isfinite(a[0][2]).all()
    # pixels stay in the normalized range of [0, 1] images
    lo = (0 - np.array(digits.mean)) / np.array(digits.std)
    hi = (1 - np.array(digits.mean)) / np.array(digits.std)
    scale = float(hi.max() - lo.min())
    assert a[0][2].min() >= lo.min() - 1e-5 * scale and a[0][2].max() <= hi.max() + 1e-5 * scale


class _Broken:
    """A streamed split whose decode fails on the batch holding record 40."""
    is_streamed = True
    shape = (96, 1, 4, 4)

    def __len__(self):
        return 96

    def batch(self, idx, augment, seed):
        if 40 in idx:
            raise RuntimeError("decoder died")
        ok = np.asarray(idx) % 7 != 0            # every 7th record is corrupt
        return np.ones((len(idx), 1, 4, 4), np.float32), ok


def test_streamed_corrupt_records_are_dropped_and_errors_reach_the_loop():
    split = Split(x=_Broken(), y=np.arange(96, dtype=np.int32) % 3)
    feed = EpochFeed(split, 16, 6, 0, 0, [], prefetch=2)
    seen, dropped = [], 0
    with pytest.raises(RuntimeError, match="decoder died"):
        for b in feed:
            assert not (b.idx % 7 == 0).any() and len(b.idx) == len(b.y) == len(b.x)
            assert len(b.idx) + b.dropped == 16
            seen.append(b.step)
            dropped += b.dropped
    assert seen == list(range(len(seen))) and len(seen) < 6 and dropped > 0
    assert feed._thread is None           # the background thread was stopped
