"""mmcore.store: the one atomic writer, the one file lock and process-alive check, and the cache's tenants."""

import errno
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest
from forks import idle_forked_child

from mmcore.errors import RunError
from mmcore.io import atomic_open, atomic_write, is_temp_name, temp_name, temp_owner
from mmcore.store.leftovers import is_leftover, sweep_leftovers
from mmcore.store.locks import FileLock, LockBusy, file_lock, process_alive

HOST = socket.gethostname()


def _dead_pid():
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def no_flock(monkeypatch):
    """A file system without flock (NFS without a lock manager answers ENOLCK)."""
    import fcntl

    def refuse(*args, **kwargs):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", refuse)


# ---------------------------------------------------------------- the one atomic writer


def test_atomic_write_names_its_writer_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "a.json"
    seen = []
    with atomic_write(target, "w", encoding="utf-8") as handle:
        handle.write("{}")
        seen = [p.name for p in tmp_path.iterdir()]
    assert target.read_text() == "{}" and [p.name for p in tmp_path.iterdir()] == ["a.json"]
    (tmp,) = seen
    assert temp_owner(tmp) == (HOST, os.getpid()) and is_temp_name(tmp) and tmp.startswith(".a.json~")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # as open() makes a file, not mkstemp's 0600

    with pytest.raises(OSError):
        with atomic_write(target, "w", encoding="utf-8") as handle:
            handle.write("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_text() == "{}" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_open_under_a_file_is_one_line_not_a_traceback(tmp_path):
    """Issue 26: `-o FILE/out.csv` raised FileExistsError from the mkdir outside the try."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(RunError) as info:
        with atomic_open(blocker / "out.csv") as handle:
            handle.write("never")
    assert str(info.value) == f"{blocker / 'out.csv'}: could not write ({blocker} is a file, not a folder); nothing was written"
    with pytest.raises(RunError) as info:
        with atomic_open(blocker / "sub" / "out.csv") as handle:
            handle.write("never")
    assert str(info.value) == (
        f"{blocker / 'sub' / 'out.csv'}: could not write (a part of {blocker / 'sub'} is a file, not a folder); "
        "nothing was written"
    )


def test_leftovers_of_dead_writers_are_swept_and_a_live_writers_kept(tmp_path):
    dead = tmp_path / f".x.npy~{HOST}~{_dead_pid()}~ab12.tmp"
    mine = temp_name(tmp_path / "y.npy")
    foreign = tmp_path / ".z.npy~other-host~1~cd34.tmp"
    older = tmp_path / ".w.json.k3j_9x.tmp"  # an older version's name: judged by age
    for path in (dead, mine, foreign, older):
        path.write_bytes(b"partial")
    assert is_leftover(dead) and not is_leftover(mine) and not is_leftover(foreign) and not is_leftover(older)
    assert is_leftover(foreign, now=time.time() + 3600) and is_leftover(older, now=time.time() + 3600)
    assert sweep_leftovers(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (mine, foreign, older))


# ---------------------------------------------------------------- one lock, one alive check


def test_process_alive_is_true_for_a_live_process_only():
    assert process_alive(os.getpid()) and process_alive(os.getppid())
    assert not process_alive(_dead_pid())
    for garbage in (0, -1, "12x", None, 2**80):  # 0 and -1 would signal process groups
        assert not process_alive(garbage)


def test_without_flock_an_o_excl_lock_file_serializes_and_a_dead_holders_is_taken_over(tmp_path, no_flock):
    path = tmp_path / "fill.lock"
    events = []
    with file_lock(path) as lock:
        assert lock.mode == "excl"
        assert json.loads(path.read_text())["pid"] == os.getpid()

        def second():
            with file_lock(path, on_wait=lambda: events.append("waited")):
                events.append("held")

        thread = threading.Thread(target=second)
        thread.start()
        thread.join(0.3)
        assert events == ["waited"]  # blocked while the first holds it
    thread.join(5)
    assert events == ["waited", "held"] and not path.exists()

    dead = _dead_pid()
    path.write_text(f"{dead} {HOST}")  # what an older version's killed holder left
    lock = FileLock(path)
    assert lock.live_holder() is None
    assert lock.acquire(wait=False) == {"pid": dead, "host": HOST}  # taken over, and said whose it was
    assert json.loads(path.read_text())["host"] == HOST and not path.with_name("fill.lock.break").exists()
    lock.release()
    assert not path.exists()


def test_another_hosts_lock_is_stale_after_a_day_unless_the_owner_says_never(tmp_path, no_flock):
    path = tmp_path / "fill.lock"
    path.write_text(json.dumps({"pid": 4242, "host": "gpu-node-7"}))
    with pytest.raises(LockBusy) as info:
        FileLock(path).acquire(wait=False)
    assert str(info.value) == f"{path}: locked by pid 4242 on gpu-node-7; wait for it to end or stop it first"
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(path, (two_days_ago, two_days_ago))
    with pytest.raises(LockBusy):
        FileLock(path, foreign_stale_s=None).acquire(wait=False)  # a run directory's policy
    lock = FileLock(path)
    assert lock.acquire(wait=False)["host"] == "gpu-node-7"
    lock.release()


def test_the_run_directory_and_the_tuning_study_take_the_shared_lock(tmp_path, no_flock):
    """ENOLCK: the run lock knew only ENOSYS/EOPNOTSUPP and the study lock had no fallback at all."""
    from mmcore.rundir import RunDir
    from mmcore.tune.study import LOCK_FILE, study_lock

    run = tmp_path / "run"
    run.mkdir()
    with RunDir(run).lock() as held:
        assert held.mode == "excl" and json.loads((run / ".lock").read_text())["pid"] == os.getpid()
    assert not (run / ".lock").exists()

    study = tmp_path / "study"
    study.mkdir()
    (study / LOCK_FILE).write_text(json.dumps({"pid": _dead_pid(), "host": HOST}))  # a killed tune process's
    with study_lock(study):
        assert json.loads((study / LOCK_FILE).read_text())["pid"] == os.getpid()
        with pytest.raises(LockBusy):
            FileLock(study / LOCK_FILE).acquire(wait=False)
    assert not (study / LOCK_FILE).exists()


def test_a_forked_child_does_not_keep_a_flock_alive(tmp_path):
    path = tmp_path / "fill.lock"
    with file_lock(path) as lock, idle_forked_child():
        assert lock.mode == "flock"
        held = lock.fd
        os.close(held)  # the holder "dies" (its descriptor closes without cleanup); the child lives on
        lock.fd, lock.mode = None, None
        other = FileLock(path)
        assert other.live_holder() is None and other.acquire(wait=False)["pid"] == os.getpid()
        other.release()


# ---------------------------------------------------------------- token codecs


def test_pooling_keeps_a_cls_token_only_when_the_encoder_declares_one():
    """pool_tokens guessed a CLS token from the count: 17 tokens of a CNN lost none of their
    grid, 16 tokens of a ViT-like encoder (CLS + 15) were pooled as a 4x4 grid."""
    import numpy as np

    from mmcore.store.tokens import pool_tokens

    tokens = np.arange(17 * 2, dtype=np.float32).reshape(17, 2)
    cnn = pool_tokens(tokens, has_cls_token=False)  # 17 patch tokens: groups of 4 in order, no CLS kept
    assert cnn.shape == (5, 2) and np.allclose(cnn[0], tokens[:4].mean(axis=0))
    vit = pool_tokens(tokens[:16], has_cls_token=True)  # CLS + 15: the CLS kept whole, the rest in groups
    assert vit.shape == (5, 2) and np.allclose(vit[0], tokens[0]) and np.allclose(vit[1], tokens[1:5].mean(axis=0))
    grid = pool_tokens(tokens[:16], has_cls_token=False)  # a 4x4 grid: 2x2 windows
    assert grid.shape == (4, 2) and np.allclose(grid[0], tokens[[0, 1, 4, 5]].mean(axis=0))


def test_a_pooled_token_space_carries_the_encoders_cls_trait(registry, tmp_path):
    from mmcore.engine.features import vision_store
    from mmcore.model.classifier import build_classifier
    from mmcore.recipe import recipe_from_dict

    recipe = recipe_from_dict(
        {"vision": {"name": "fake_cnn"}, "text": {"name": "fake_text"}, "pooling": {"name": "attention"}},
        registry=registry,
    )
    model = build_classifier(recipe, registry)
    pooled = vision_store(tmp_path, model, dtype=None, pooling_spec="attention", token_storage="pooled")
    assert pooled.description["has_cls_token"] is model.vision.has_cls_token is False
    assert "has_cls_token" not in vision_store(tmp_path, model, dtype=None, pooling_spec="attention").description


# ---------------------------------------------------------------- the tenants


def test_every_tenant_is_named_in_cache_clear_help_and_has_a_version_or_says_who_records_it():
    from click.testing import CliRunner

    from mmcore.cli.cache import cache_group
    from mmcore.store.tenants import TENANTS

    help_text = " ".join(CliRunner().invoke(cache_group, ["clear", "--help"]).output.split())
    names = [t.name for t in TENANTS]
    assert ", ".join(names) in help_text  # the help lists them without importing the store at start-up
    assert len(set(names)) == len(names) and all(t.paths for t in TENANTS)
    assert [t.name for t in TENANTS if t.verify is not None] == ["features", "file-facts", "ocr", "teacher-logits"]


# ---------------------------------------------------------------- a chunk carries what it holds


def _space(root, name, rows=4):
    """A vector space ``name`` of ``rows`` entries (keys k0.., values i) -> (store, keys)."""
    import numpy as np

    from mmcore.store.features import FeatureStore

    store = FeatureStore(root, {"kind": "test", "encoder": name, "stored": "vector", "dim": 3})
    keys = [f"{name}{i}".encode().ljust(20, b"-") for i in range(rows)]
    writer = store.writer()
    for i, key in enumerate(keys):
        writer.add(key, np.full(3, i, np.float16))
    writer.flush()
    return store, keys


def test_a_chunk_moved_into_another_space_is_refused_and_changed_rows_are_found_by_verify(tmp_path, capsys):
    import shutil

    from mmcore.store.chunks import check_chunk
    from mmcore.store.features import FeatureStore
    from mmcore.store.tenants import verify_cache

    a, _ = _space(tmp_path, "a")
    b, b_keys = _space(tmp_path, "b")
    (index,) = a.dir.glob("*.index.npy")
    data = index.with_name(index.name.replace(".index.npy", ".npy"))
    for path in (index, data):
        shutil.copy(path, b.dir / path.name)  # a's whole chunk copied into b's folder: consistent with itself
    chunk = index.name[: -len(".index.npy")]
    assert check_chunk(b.dir, chunk)[1] == (b.dir / data.name, f"sealed for feature space {a.key}, not {b.key}")
    fresh = FeatureStore(tmp_path, b.description)
    assert sorted(fresh.index(refresh=True)) == sorted(b_keys)  # a's keys are not served from b
    assert (f"warning: feature cache: dropped damaged chunk {b.dir / data.name} (sealed for feature space {a.key}, "
            f"not {b.key}); its entries are recomputed") in capsys.readouterr().err.splitlines()

    raw = bytearray(data.read_bytes())
    raw[-80] ^= 1  # one bit of the last row: the cheap check on mapping cannot see it, verify hashes the rows
    data.write_bytes(bytes(raw))
    assert check_chunk(a.dir, chunk)[1] is None
    assert check_chunk(a.dir, chunk, full=True)[1] == (data, "its rows are not the ones it was sealed with (changed on disk)")
    report = verify_cache(tmp_path)
    assert f"{data}: damaged chunk (its rows are not the ones it was sealed with (changed on disk))" in report["problems"]


def test_chunks_of_the_older_unsealed_format_are_dropped_with_one_line_per_space(tmp_path, capsys):
    import numpy as np

    from mmcore.store.features import FeatureStore
    from mmcore.store.tenants import verify_cache

    store, keys = _space(tmp_path, "old", rows=2)
    writer = store.writer(chunk_rows=1)
    writer.add(b"x" * 20, np.zeros(3))  # a second chunk
    for data in store.dir.glob("*.npy"):
        if not data.name.endswith(".index.npy"):
            data.write_bytes(data.read_bytes()[:-76])  # what an older mmcore wrote: no seal
    report = verify_cache(tmp_path)
    assert sorted(report["problems"])[0].endswith(": chunk (written by an older mmcore without a seal of what it holds)")
    assert len(report["problems"]) == 2
    capsys.readouterr()
    assert FeatureStore(tmp_path, store.description).missing(keys + [b"x" * 20], refresh=True) == [0, 1, 2]
    assert capsys.readouterr().err.splitlines() == [
        f"warning: feature cache: {store.dir}: dropped 2 chunks written by an older mmcore without a seal of what "
        "they hold; their entries are recomputed"
    ]
