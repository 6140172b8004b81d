"""Add-ons (docs/methods.md §3.17): naming, validation and the composed method the engine sees."""

from __future__ import annotations

import pytest
import torch

from conftest import CONFIGS
from sats.config import ConfigError
from sats.experiment import load_experiment
from sats.methods import build_method, compose_method, get_method_class, list_addons, validate_method_config
from sats.methods.addon import AddOn, freeze_old_heads, split_method_name
from sats.methods.ewf import EWF
from sats.models.config import ModelConfig
from sats.models.segmenter import build_segmenter


def test_the_two_spellings_give_one_canonical_section():
    by_list = validate_method_config({"name": "mib", "addons": ["ewf"], "lambda_kd": 10})
    by_name = validate_method_config({"name": "MiB+EWF", "lambda_kd": 10})
    assert by_list == by_name
    assert by_list["name"] == "mib" and by_list["addons"] == ["ewf"] and by_list["lambda_kd"] == 10.0
    assert by_list["ewf"] == {"freeze_old_heads": True, "fuse_buffers": True, "threshold_fraction": None,
                              "evaluate_unfused": False}
    assert "addons" not in validate_method_config({"name": "mib"})  # a plain method's section is unchanged
    assert validate_method_config({"name": "mib+ewf", "addons": ["ewf"]})["addons"] == ["ewf"]  # named once


def test_reference_style_command_line_takes_a_base_and_add_ons():
    cfg = load_experiment(CONFIGS / "demo/mib.yaml", ["method=MiB+EWF", "method.ewf.fuse_buffers=false"])
    assert cfg.method_name == "mib+ewf" and cfg.method["ewf"]["fuse_buffers"] is False
    cfg = load_experiment(CONFIGS / "demo/ft.yaml", ["method=LWF-MC+EWF"])
    assert build_method(cfg.method).name == "lwf_mc+ewf"


@pytest.mark.parametrize("section, message", [
    ({"name": "mib+nothing"}, r"method.name: unknown add-on 'nothing'; available: .*ewf"),
    ({"name": "mib", "ewf": {"fuse_buffers": False}}, r"method.ewf: parameters of the add-on 'ewf', which "
                                                      r"method.addons does not list"),
    ({"name": "mib+ewf", "ewf": {"fuse_bufers": False}}, r"method.ewf \(add-on\): invalid key 'fuse_bufers'"),
    ({"name": "mib+ewf", "ewf": {"threshold_fraction": 2.0}}, r"method.ewf \(add-on\): threshold_fraction"),
    ({"name": "mib+ewf", "ewf": [1]}, r"method.ewf: must be a mapping"),
    ({"name": "mib+"}, r"empty part around '\+'"),
])
def test_bad_add_on_sections_are_clear_errors(section, message):
    with pytest.raises(ConfigError, match=message):
        validate_method_config(section)


def test_the_composed_method_is_the_base_with_the_add_ons_hooks():
    method = build_method(validate_method_config({"name": "sats+ewf"}))
    sats = get_method_class("sats")
    assert isinstance(method, sats) and method.name == "sats+ewf" and method.label == "SATS+EWF"
    assert type(method) is compose_method(sats, [EWF])  # one class per combination
    plain = build_method(validate_method_config({"name": "sats"}))
    assert (method.needs_at(1), method.old_needs, method.step0_key()) == (plain.needs_at(1), plain.old_needs,
                                                                          plain.step0_key())
    assert [type(a) for a in method.addons] == [EWF]
    assert "ewf(freeze_old_heads=True" in method.describe() and method.describe().startswith("sats+ewf(")
    assert method.state_dict() == build_method({"name": "sats"}).state_dict()
    assert compose_method(sats, []) is sats
    assert split_method_name("MiB+EWF") == ("MiB", ["EWF"])
    assert "ewf" in list_addons()


def test_an_add_on_may_replace_the_head_init_and_hooks_run_after_the_base(monkeypatch):
    calls = []

    class Probe(AddOn):
        name, head_init = "test-probe", "default"

        def begin_step(self, ctx, method):
            calls.append("addon")

    mib = get_method_class("mib")
    monkeypatch.setattr(mib, "begin_step", lambda self, ctx: calls.append("base"))
    composed = compose_method(mib, [Probe])
    assert composed.head_init == "default" and mib.head_init == "background"
    composed(mib.Params(), [Probe()]).begin_step(None)
    assert calls == ["base", "addon"]


def test_freeze_old_heads_leaves_only_the_new_head_and_the_body_trainable():
    model = build_segmenter(ModelConfig(backbone="mit_custom", embed_dims=[8, 16, 16, 32], num_heads=[1, 2, 2, 4],
                                        decoder_dim=16), [3])
    assert freeze_old_heads(model, 0) == 0
    model.add_step(2)
    assert freeze_old_heads(model, 1) == 2  # weight and bias of head 0
    heads = list(model.classifier.heads)
    assert not any(p.requires_grad for p in heads[0].parameters())
    assert all(p.requires_grad for p in heads[1].parameters())
    assert all(p.requires_grad for p in model.encoder.parameters())
    method = build_method({"name": "ft+ewf"})
    method.prepare_model(model, 1)
    groups = method.param_groups(model, 1)
    ids = {id(p) for g in groups for p in g.params}
    assert not ids & {id(p) for p in heads[0].parameters()} and id(heads[1].weight) in ids
    no_freeze = build_method({"name": "ft+ewf", "ewf": {"freeze_old_heads": False}})
    fresh = build_segmenter(ModelConfig(backbone="mit_custom", embed_dims=[8, 16, 16, 32], num_heads=[1, 2, 2, 4],
                                        decoder_dim=16), [3, 2])
    no_freeze.prepare_model(fresh, 1)
    assert all(p.requires_grad for p in fresh.parameters())
    assert torch.is_grad_enabled()
