"""The run directory's one home (mmcore.rundir): its lock, temp-file sweeping, an unwritable --out, the drift check."""

import ast
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from forks import idle_forked_child

import mmcore
from mmcore import rundir as rundir_module
from mmcore.errors import RunError
from mmcore.rundir import RunDir, RunLock, RunLocked, require_same_recipe

HOST = socket.gethostname()
MMCORE = Path(mmcore.__file__).parent


def _locked_line(run_dir, pid, host=HOST):
    return f"{run_dir}: in use by a live mmcore run (pid {pid} on {host}); wait for it to end or stop it first"


def _dead_pid():
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _wait_for(condition, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended before what we wait for: {proc.communicate()}")
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError("timed out")


def _holder(run_dir):
    try:
        return json.loads((run_dir / ".lock").read_text())
    except (OSError, ValueError):
        return None


@pytest.mark.slow
def test_a_live_run_is_locked_and_a_killed_one_is_taken_over_with_its_temp_files_swept(
    cli, tiny_recipe, tmp_path, registry
):
    """Real `mmcore run`: while it lives, a second --resume (and --out into it) is refused naming it,
    eval scores its last completed checkpoint and says so; after SIGKILL, --resume takes the stale
    lock over, sweeps what killed writes left and finishes, leaving no lock and no temp file."""
    from mmcore.commands.evaluate import evaluate_run
    from mmcore.recipe import load_recipe

    recipe = tiny_recipe(train={"epochs": 4, "checkpoint_every_steps": 1, "early_stopping": {"patience": 0}})
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmcore", "run", str(recipe), "--out", str(run), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        # frozen (SIGSTOP) once it has a best checkpoint: alive, holding the lock, writing nothing
        _wait_for(lambda: (_holder(run) or {}).get("pid") == proc.pid and (run / "checkpoint_best.ckpt").is_file(), proc)
        proc.send_signal(signal.SIGSTOP)
        assert _holder(run) == {"pid": proc.pid, "host": HOST, "started": _holder(run)["started"]}

        second = cli("run", "--resume", run, "--quiet", check=False)
        assert second.returncode == 4
        assert second.stderr.strip() == _locked_line(run, proc.pid)
        assert "Traceback" not in second.stderr

        with pytest.raises(RunLocked) as info:  # `mmcore run --out RUN` into the live run
            RunDir.create(load_recipe(recipe, registry=registry), run)
        assert str(info.value) == _locked_line(run, proc.pid) and info.value.exit_code == 4

        lines = []
        out = evaluate_run(run, registry=registry, progress=False, echo=lines.append)
        assert lines[0] == (
            f"{run}: run in progress (pid {proc.pid} on {HOST}); "
            f"using its last completed checkpoint, {run / 'checkpoint_best.ckpt'}"
        )
        assert json.loads((out / "results.json").read_text())["decision"]["threshold"] == 0.5  # not decided yet
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert json.loads((run / "status.json").read_text())["state"] == "running"
    (run / ".last.ckpt.x.tmp").write_bytes(b"half a checkpoint")  # what a SIGKILL during a checkpoint write leaves
    (run / ".results.json.k3j_9xqa.tmp").write_text("{")

    resumed = cli("run", "--resume", run, "--quiet")
    assert f"{run}: taking over the lock of pid {proc.pid} on {HOST}, which is no longer running" in resumed.stdout
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    assert not (run / ".lock").exists()
    assert sorted(p.name for p in run.rglob("*.tmp")) == []


def test_the_lock_without_flock_uses_o_excl_files(tmp_path, monkeypatch):
    """A file system whose flock raises ENOSYS/EOPNOTSUPP: an O_EXCL lock file, its holder checked by pid."""
    import fcntl

    def no_flock(fd, operation):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    run = tmp_path / "run"
    run.mkdir()

    # a live holder on this host (our parent process) and one on another host: refused, naming them
    for pid, host in ((os.getppid(), HOST), (12345, "gpu-node-7")):
        (run / ".lock").write_text(json.dumps({"pid": pid, "host": host}))
        with pytest.raises(RunLocked) as info:
            RunLock(run).acquire()
        assert str(info.value) == _locked_line(run, pid, host)
        assert RunDir(run).lock().live_holder()["pid"] == pid

    # a dead holder: its lock is broken and taken over, said in one line
    dead = _dead_pid()
    (run / ".lock").write_text(json.dumps({"pid": dead, "host": HOST}))
    assert RunLock(run).live_holder() is None
    said = []
    with RunDir(run).lock(echo=said.append):
        assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
        assert not (run / ".lock.break").exists()
        with RunDir(run).lock():  # this process again: a no-op, not a refusal
            pass
        assert (run / ".lock").exists()
    assert said == [f"{run}: taking over the lock of pid {dead} on {HOST}, which is no longer running"]
    assert not (run / ".lock").exists()


def test_flock_lock_is_released_when_its_holder_dies_not_kept_by_forked_workers(tmp_path):
    """A DataLoader worker forked while the lock is held must not keep a killed run's lock alive."""
    run = tmp_path / "run"
    run.mkdir()
    lock = RunLock(run).acquire()
    assert lock.mode == "flock"
    with idle_forked_child():
        assert RunLock(run).live_holder()["pid"] == os.getpid()  # held by this process
        # the holder "dies": its descriptor closes without any cleanup; the child still runs
        os.close(lock.fd)
        rundir_module._HELD.clear()
        assert RunLock(run).live_holder() is None
        assert _holder(run)["pid"] == os.getpid()  # the stale record is still there, and harmless


def test_only_rank_0_takes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with RunDir(tmp_path).lock():
        assert not (tmp_path / ".lock").exists()


def test_sweep_removes_what_killed_atomic_writes_left_and_nothing_else(tmp_path):
    from mmcore.io import atomic_open

    run = RunDir(tmp_path)
    with pytest.raises(KeyboardInterrupt):  # a write stopped half-way: atomic_open removes its own temp file ...
        with atomic_open(tmp_path / "last.ckpt", "wb") as handle:
            handle.write(b"x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    # ... but a SIGKILL gives it no chance: these are what it leaves
    left = [tmp_path / ".last.ckpt.abcd1234.tmp", tmp_path / ".status.json.x.tmp", tmp_path / "plots" / ".roc.png.q_1.tmp"]
    kept = [tmp_path / "notes.tmp", tmp_path / ".lock", tmp_path / "last.ckpt", tmp_path / "eval" / "t" / ".results.json.a.tmp"]
    for path in left + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    assert sorted(run.sweep_temp_files()) == sorted(left)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in left)


def test_out_under_a_file_is_one_line_exit_4(cli, tiny_recipe, tmp_path):
    """ENOTDIR for real (chmod does not stop root): --out FILE/sub."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = cli("run", tiny_recipe(), "--out", blocker / "sub", "--quiet", check=False)
    assert result.returncode == 4
    assert result.stderr.strip() == (
        f"{blocker / 'sub'}: cannot create the run directory: a part of the path is a file, not a folder; "
        f"give --out a path whose parents are folders"
    )


@pytest.mark.parametrize(
    "code, said",
    [
        (errno.EROFS, "the file system is read-only; give --out a folder on a writable disk"),
        (errno.EACCES, "permission denied; give --out a folder you can write to"),
        (errno.ENOSPC, "no space left on the device; free some space or give --out a folder on another disk"),
    ],
)
def test_unwritable_out_is_one_line(tmp_path, monkeypatch, code, said):
    from types import SimpleNamespace

    def refuse(self, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(RunError) as info:
        RunDir.create(SimpleNamespace(), tmp_path / "ro" / "run")
    assert str(info.value) == f"{tmp_path / 'ro' / 'run'}: cannot create the run directory: {said}"
    assert info.value.exit_code == 4


def test_out_with_an_overlong_name_and_out_that_is_a_file(tmp_path):
    from types import SimpleNamespace

    long = tmp_path / ("x" * 300)
    with pytest.raises(RunError) as info:
        RunDir.create(SimpleNamespace(), long)
    assert str(info.value) == f"{long}: cannot create the run directory: the name is too long; give --out a shorter path"
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunError, match=r"f: is a file; give --out a folder$"):
        RunDir.create(SimpleNamespace(), tmp_path / "f")


def test_the_drift_check_exists_once_with_its_message():
    with pytest.raises(RunError) as info:
        require_same_recipe(
            {"seed": 1, "train": {"epochs": 2, "lr": 1}}, {"seed": 2, "train": {"epochs": 3, "lr": 1}},
            where="runs/x/last.ckpt", said="saved with another recipe",
        )
    assert str(info.value) == "runs/x/last.ckpt: saved with another recipe (differs at seed, train.epochs)"
    require_same_recipe({"seed": 1}, {"seed": 1}, where="x", said="y")  # same recipe: nothing to say
    holders = [str(p.relative_to(MMCORE)) for p in MMCORE.rglob("*.py") if "(differs at" in p.read_text(encoding="utf-8")]
    assert holders == ["rundir.py"]


def test_run_directory_names_live_in_rundir_and_compare_does_not_import_sweep():
    """No second definition of the layout, no literal results.json/recipe.toml reads, no compare <-> sweep circle."""
    for path in MMCORE.rglob("*.py"):
        if path.name == "rundir.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                names = {t.id for t in node.targets if isinstance(t, ast.Name)}
                assert not names & {"STATUS_FILE", "RECIPE_FILE", "BEST", "LAST", "SWEEP_FILE"}, path
            if isinstance(node, ast.Constant) and node.value in ("results.json", "recipe.toml", "status.json"):
                raise AssertionError(f"{path}: literal {node.value!r}; use mmcore.rundir")
    compare = ast.parse((MMCORE / "commands" / "compare.py").read_text(encoding="utf-8"))
    imported = {n.module for n in ast.walk(compare) if isinstance(n, ast.ImportFrom)}
    assert "mmcore.commands.sweep" not in imported


def test_run_dir_reads_its_recipe_once_and_refuses_what_is_not_a_finished_run(tmp_path):
    run = RunDir(tmp_path / "r")
    with pytest.raises(RunError, match=r"r: run directory not found$"):
        run.require_completed()
    run.path.mkdir()
    with pytest.raises(RunError, match=r"r: not an mmcore run directory \(no status.json\)$"):
        run.require_scorable()
    run.write_status("interrupted")
    with pytest.raises(RunError) as info:
        run.require_scorable()  # not live (no lock): must be completed
    assert str(info.value) == f"{run.path}: run is not complete (status: interrupted); resume it with: mmcore run --resume {run.path}"
    run.recipe_file.write_text('experiment = "a"\n')
    assert run.recipe_data() == {"experiment": "a"}
    run.recipe_file.write_text('experiment = "b"\n')
    assert run.recipe_data() == {"experiment": "a"}  # read once
    run.write_status("completed", seconds=1.5)
    assert run.require_scorable() is None and run.status()["seconds"] == 1.5
    broken = RunDir(tmp_path / "r")
    broken.recipe_file.write_text("experiment = ")
    with pytest.raises(RunError, match=r"recipe.toml: cannot read the run's recipe \(.+\)$"):
        broken.recipe_data()


def test_a_run_directory_is_read_as_bounded_data(tmp_path):
    """recipe.toml, status.json and results.json are read under the bounds of every input: a FIFO is
    never opened (no hang), a recipe nested 100,000 deep or over 1 MiB is one line, an oversized
    results.json reads as missing rather than into memory."""
    run = tmp_path / "run"
    run.mkdir()
    recipe = run / "recipe.toml"
    os.mkfifo(recipe)
    with pytest.raises(RunError) as info:
        RunDir(run).recipe_data()
    assert str(info.value) == f"{recipe}: is not a regular file; name the run's recipe.toml"
    recipe.unlink()
    recipe.write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(RunError) as info:
        RunDir(run).recipe_data()
    assert str(info.value).startswith(f"{recipe}: cannot read the run's recipe (line 1: ")
    recipe.write_text("# padding\n" * 200_000)
    with pytest.raises(RunError) as info:
        RunDir(run).recipe_data()
    assert str(info.value) == f"{recipe}: is larger than 1 MiB; a recipe is a small TOML file"
    results = run / "results.json"
    with open(results, "wb") as handle:  # sparse: 65 MiB that never touch the disk
        handle.truncate((64 << 20) + 1)
    assert RunDir(run).results() is None
    os.mkfifo(run / "status.json")
    assert RunDir(run).status() is None
