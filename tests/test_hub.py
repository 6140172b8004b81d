"""Publishing a run (sats hub): export → a fake Hub → pull rebuilds a run that re-tests to its numbers."""

from __future__ import annotations

import json
import shutil
import sys
import types

import pytest
import torch

from sats.cli import main
from sats.engine.checkpoint import load_checkpoint
from sats.engine.evaluation import retest_run
from sats.engine.runner import Runner
from sats.hub import HubError, export_run, import_run, join_tensors, split_tensors

pytest.importorskip("safetensors")


def _same(a, b) -> bool:
    """Nested equality with tensors compared by value (tuples and lists alike: JSON has only lists)."""
    if torch.is_tensor(b):
        return torch.is_tensor(a) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(b, dict):
        return isinstance(a, dict) and set(a) == set(b) and all(_same(a[k], b[k]) for k in b)
    if isinstance(b, (list, tuple)):
        return isinstance(a, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def test_nested_state_with_tensors_round_trips_through_json_and_tensors():
    state = {"thresholds": torch.arange(3.0), "nested": {"a": [torch.ones(2, dtype=torch.int64), 3, None]},
             "step": 1, "name": "x", "pair": (1.5, "y")}
    skeleton, tensors = split_tensors(state)
    assert set(tensors) == {"thresholds", "nested/a/0"}
    back = join_tensors(json.loads(json.dumps(skeleton)), tensors)
    assert torch.equal(back["thresholds"], state["thresholds"]) and back["nested"]["a"][1:] == [3, None]
    assert back["nested"]["a"][0].dtype == torch.int64 and back["pair"] == [1.5, "y"]
    with pytest.raises(HubError, match="nested/obj: a object cannot be published"):
        split_tensors({"nested": {"obj": object()}})


@pytest.fixture(scope="module")
def plop_run(tiny_synthetic, tmp_path_factory):
    """A finished tiny PLOP run (its method state holds tensors: the pseudo-label thresholds)."""
    from conftest import CONFIGS, tiny_overrides
    from sats.experiment import load_experiment

    work = tmp_path_factory.mktemp("hub")
    cfg = load_experiment(CONFIGS / "demo/plop.yaml", tiny_overrides(tiny_synthetic, work / "run", work / "cache"))
    Runner(cfg).run()
    return cfg.resolved_run_dir()


def test_export_and_import_rebuild_a_run_that_retests_to_its_numbers(plop_run, tmp_path):
    folder = tmp_path / "export"
    assert export_run(plop_run, folder, "me/plop-demo") == [0, 1]
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["README.md", "config.yaml", "results.json", "step0.json", "step0.safetensors",
                     "step1.json", "step1.method.safetensors", "step1.safetensors"]
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: sats") and "sats hub pull me/plop-demo" in card
    assert "## Results" in card and "```yaml" in card and "method:" in card
    rebuilt = tmp_path / "rebuilt"
    assert import_run(folder, rebuilt) == [0, 1]
    for t in (0, 1):
        mine, theirs = load_checkpoint(rebuilt / f"checkpoints/step{t}.ckpt"), load_checkpoint(
            plop_run / f"checkpoints/step{t}.ckpt")
        assert set(mine) == set(theirs) and mine["row"] == theirs["row"] and mine["head_sizes"] == theirs["head_sizes"]
        assert all(torch.equal(mine["model"][k], theirs["model"][k]) for k in theirs["model"])
        assert _same(mine["method"], theirs["method"])
    assert json.loads((rebuilt / "results.json").read_text())["steps"] == json.loads(
        (plop_run / "results.json").read_text())["steps"]
    assert retest_run(rebuilt)  # the published run re-tests to its recorded numbers
    with pytest.raises(HubError, match="already holds a run"):
        import_run(folder, rebuilt)


def test_import_refuses_a_folder_that_is_not_a_published_run(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(HubError, match="not a published sats run"):
        import_run(tmp_path / "x", tmp_path / "run")
    with pytest.raises(HubError, match="not a run directory"):
        export_run(tmp_path / "x", tmp_path / "out")


def test_push_and_pull_through_the_hub_client(plop_run, tmp_path, monkeypatch, capsys):
    """The Hub client is replaced by a local fake repository store (tests never use the network)."""
    store = tmp_path / "hub"
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            self.token = token

        def create_repo(self, repo_id, private=False, exist_ok=False, repo_type="model"):
            calls.append(("create", repo_id, private))

        def upload_folder(self, folder_path, repo_id, repo_type, commit_message):
            calls.append(("upload", repo_id, commit_message))
            shutil.copytree(folder_path, store / repo_id, dirs_exist_ok=True)

    def snapshot_download(repo_id, revision=None, token=None, repo_type="model"):
        if not (store / repo_id).is_dir():
            raise OSError(f"404 Client Error: Repository Not Found for url: https://huggingface.co/{repo_id}")
        return str(store / repo_id)

    fake = types.SimpleNamespace(HfApi=FakeApi, snapshot_download=snapshot_download)
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
    assert main(["hub", "push", str(plop_run), "me/plop-demo", "--private"]) == 0
    assert calls[0] == ("create", "me/plop-demo", True) and calls[1][2] == "sats run run: steps [0, 1]"
    assert main(["hub", "pull", "me/plop-demo", str(tmp_path / "pulled"), "--test"]) == 0
    assert "rebuilt" in capsys.readouterr().out
    assert main(["hub", "pull", "me/missing", str(tmp_path / "other")]) == 2
    assert "could not download 'me/missing'" in capsys.readouterr().err
