"""Checkpoints are data: loaded with weights_only=True, and a foreign one is explained, not dumped."""

import json
import shutil

import pytest
import torch

from mmcore.engine.checkpoint import read_checkpoint
from mmcore.errors import RunError


class _Evil:
    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_a_checkpoint_that_carries_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.ckpt"
    torch.save({"format": "mmcore.checkpoint", "payload": _Evil()}, path)
    with pytest.raises(RunError) as info:
        read_checkpoint(path)
    assert str(info.value).startswith(f"{path}: not a loadable mmcore checkpoint (")
    assert "only tensors and plain types are accepted" in str(info.value)
    assert "this ran while loading" not in capsys.readouterr().out


def test_newer_format_and_foreign_files_are_explained(tmp_path):
    path = tmp_path / "new.ckpt"
    torch.save({"format": "mmcore.checkpoint", "format_version": 99}, path)
    with pytest.raises(RunError, match=r"checkpoint format 99 is newer than this mmcore .* upgrade mmcore"):
        read_checkpoint(path)
    torch.save({"state_dict": {}}, path)
    with pytest.raises(RunError, match=r"not an mmcore checkpoint \(no 'mmcore.checkpoint' format marker\)"):
        read_checkpoint(path)


def test_eval_with_another_runs_checkpoint_says_what_differs(cli, tiny_recipe, tmp_path):
    a = tiny_recipe("a.toml", vision={"params": {"width": 8}})
    b = tiny_recipe("b.toml", vision={"params": {"width": 16}})
    cli("run", a, "--out", tmp_path / "a", "--quiet")
    cli("run", b, "--out", tmp_path / "b", "--quiet")
    shutil.copy(tmp_path / "a" / "checkpoint_best.ckpt", tmp_path / "b" / "checkpoint_best.ckpt")
    result = cli("eval", tmp_path / "b", "--quiet", check=False)
    assert result.returncode == 4
    assert result.stderr.strip() == (
        f"{tmp_path / 'b' / 'checkpoint_best.ckpt'}: checkpoint was trained with another recipe "
        "(differs at vision.params.width)"
    )
    assert "Traceback" not in result.stderr


def test_a_run_from_an_older_mmcore_stays_usable_when_keys_were_added(cli, tiny_recipe, tmp_path):
    """A checkpoint whose recipe lacks keys this mmcore added (their defaults apply) is not drift;
    a changed value still is."""
    recipe = tiny_recipe("a.toml")
    run = tmp_path / "run"
    cli("run", recipe, "--out", run, "--quiet")
    ckpt_path = run / "checkpoint_best.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    old = dict(ckpt)
    old["recipe"] = {**ckpt["recipe"], "cache": dict(ckpt["recipe"]["cache"]), "train": dict(ckpt["recipe"]["train"])}
    del old["recipe"]["cache"]["decoded_images"]  # as written before the decoded-image cache existed
    del old["recipe"]["train"]["compile"]  # ... and before train.compile
    torch.save(old, ckpt_path)
    cli("eval", run, "--out", tmp_path / "eval", "--quiet")  # the scoring path, as the run scored its test split
    scores = json.loads((tmp_path / "eval" / "test_predictions.json").read_text())
    assert scores == json.loads((run / "test_predictions.json").read_text())

    old["recipe"]["train"] = {**old["recipe"]["train"], "batch_size": old["recipe"]["train"]["batch_size"] + 1}
    torch.save(old, ckpt_path)
    result = cli("eval", run, "--quiet", check=False)
    assert result.returncode == 4
    assert result.stderr.strip() == f"{ckpt_path}: checkpoint was trained with another recipe (differs at train.batch_size)"
