import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_NUM_THREADS", "2")
# the teacher cache shared between runs (distill.teacher_cache) lives in a folder of this
# session's own, so that no test reads what another session (or a user's runs) left there
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
os.environ["DISTILL_CACHE_DIR"] = tempfile.mkdtemp(prefix="distill-test-cache-")
atexit.register(shutil.rmtree, os.environ["DISTILL_CACHE_DIR"], True)   # gone with the session


import stat  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _devnull_stays_a_device():
    """Nothing the suite runs may replace /dev/null (MXNet's profiler did, as root): checked
    after the whole session, so any test or subprocess that does it fails the run."""
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode), "/dev/null was already damaged"
    yield
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode), (
        f"{os.devnull} is no longer a character device: something in the suite replaced it")
