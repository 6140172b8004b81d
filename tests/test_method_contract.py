"""The method contract (tests/method_contract.py) over every registered method of the package.

One small :class:`MethodContract` subclass per method names its loss terms per step (and any config
it needs); the parametrized tests below run the contract's checks for every ``sats.*`` method in the
registry, with the plain contract for a method that has no subclass yet. Test-only methods that other
test modules register are left out.

Run one method's contract: ``pytest tests/test_method_contract.py -k mib``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import pytest

from method_contract import CONTRACTS, MethodContract, RunRecord, UndeclaredOutputError
from sats.methods import iter_methods, list_addons

SATS_METHODS = [cls.name for cls in iter_methods() if cls.__module__.startswith("sats.")]
CE, CE_ONLY = frozenset({"ce"}), (frozenset({"ce"}), frozenset({"ce"}))


class FTContract(MethodContract):
    method = "ft"
    terms = CE_ONLY


class JointContract(MethodContract):
    method = "joint"
    terms = (CE,)  # one step with every class


class LwFContract(MethodContract):
    method = "lwf"
    terms = (CE, frozenset({"ce", "kd"}))


class LwFMCContract(MethodContract):
    method = "lwf_mc"
    terms = (frozenset({"bce"}), frozenset({"bce", "bce_kd"}))


class ILTContract(MethodContract):
    method = "ilt"
    terms = (CE, frozenset({"ce", "kd", "feature_mse"}))


class EWCContract(MethodContract):
    method = "ewc"
    terms = (CE, frozenset({"ce", "ewc"}))


class RWContract(MethodContract):
    method = "rw"
    terms = (CE, frozenset({"ce", "rw"}))


class PIContract(MethodContract):
    method = "pi"
    terms = (CE, frozenset({"ce", "pi"}))


class MiBContract(MethodContract):
    method = "mib"
    terms = (CE, frozenset({"unce", "unkd"}))


class PLOPContract(MethodContract):
    method = "plop"
    terms = (CE, frozenset({"ce", "pod"}))


class SSULContract(MethodContract):
    method = "ssul"  # configs/demo/ssul.yaml sets data.saliency_root (maps derived from the masks)
    terms = (frozenset({"bce"}), frozenset({"bce"}))


class SATSContract(MethodContract):
    method = "sats"
    terms = (CE, frozenset({"ce", "unkd", "sat"}))
    output_variants = ({"method.source": "features"},)  # the CNN-feature variant reads stages + decoder


class DKDContract(MethodContract):
    method = "dkd"
    terms = (frozenset({"mbce", "ac"}), frozenset({"mbce", "kd", "dkd_pos", "dkd_neg", "ac"}))


class STARContract(MethodContract):
    method = "star"
    terms = (frozenset({"mbce"}), frozenset({"mbce", "ocfm", "sad"}))


class RCILContract(MethodContract):
    method = "rcil"  # configs/demo/rcil.yaml sets model.rc_branches
    terms = (CE, frozenset({"unce", "unkd", "pckd_spatial", "pckd_channel"}))


class MiBEWFContract(MethodContract):
    method = "mib+ewf"
    config = "demo/mib_ewf.yaml"
    terms = (CE, frozenset({"unce", "unkd"}))  # EWF adds no loss term


class SATSEWFContract(MethodContract):
    method = "sats+ewf"
    config = "demo/sats_ewf.yaml"
    terms = (CE, frozenset({"ce", "unkd", "sat"}))


class MiBNeSTContract(MethodContract):
    method = "mib+nest"
    config = "demo/mib_nest.yaml"
    overrides = {"method.nest.pretune_epochs": 2}
    terms = (CE, frozenset({"unce", "unkd"}))  # NeST adds no loss term: it pre-tunes the new head in begin_step


#: base+add-on combinations with a contract (every add-on has at least one, see the test below)
COMBINATIONS = sorted(name for name in CONTRACTS if "+" in name)
CHECKED = SATS_METHODS + COMBINATIONS


class _References:
    """One uninterrupted reference run per method, shared by the checks of this module."""

    def __init__(self, data_root: Path, work: Path) -> None:
        self.data_root, self.work, self.runs = data_root, work, {}

    def __call__(self, name: str) -> RunRecord:
        if name not in self.runs:
            self.runs[name] = MethodContract.for_method(name).run(self.data_root, self.work / name)
        return self.runs[name]


@pytest.fixture(scope="module")
def references(tiny_synthetic, tmp_path_factory) -> _References:
    return _References(tiny_synthetic, tmp_path_factory.mktemp("contract"))


def test_every_method_file_has_a_contract_and_a_label():
    """Each registered method has its contract subclass (its terms) and its own display label."""
    assert SATS_METHODS, "no method registered"
    missing = [name for name in SATS_METHODS if name not in CONTRACTS]
    assert not missing, f"methods without a MethodContract subclass in tests/test_method_contract.py: {missing}"
    assert set(CONTRACTS) <= set(CHECKED), f"contracts of unregistered methods: {set(CONTRACTS) - set(CHECKED)}"
    untested = set(list_addons()) - {addon for name in COMBINATIONS for addon in name.split("+")[1:]}
    assert not untested, f"add-ons without a base+add-on contract subclass: {sorted(untested)}"
    labels: Dict[str, str] = {cls.name: vars(cls).get("label", "") for cls in iter_methods() if cls.name in SATS_METHODS}
    assert all(labels.values()), f"methods without their own `label`: {[n for n, v in labels.items() if not v]}"
    assert len(set(labels.values())) == len(labels), f"two methods share a label: {labels}"


@pytest.mark.parametrize("name", CHECKED)
def test_two_steps_end_to_end_with_finite_named_losses(name, references):
    MethodContract.for_method(name).check_two_steps(references(name))


@pytest.mark.parametrize("name", CHECKED)
def test_loss_reads_exactly_the_declared_model_outputs(name, tiny_synthetic, tmp_path):
    contract = MethodContract.for_method(name)
    for i, variant in enumerate([{}, *contract.output_variants]):
        contract.check_declared_outputs(tiny_synthetic, tmp_path / f"variant{i}", variant)


@pytest.mark.parametrize("name", CHECKED)
def test_state_dict_round_trip(name, references):
    MethodContract.for_method(name).check_state_round_trip(references(name))


@pytest.mark.parametrize("name", CHECKED)
def test_resume_in_the_middle_of_the_last_step_is_identical(name, references, tiny_synthetic, tmp_path):
    MethodContract.for_method(name).check_resume_mid_step(references(name), tiny_synthetic, tmp_path)


# -- the contract's own checks fail where they should -------------------------------------------------
def _test_method(name: str, **attrs):
    """A registered FT variant (test-only: its module is not ``sats.*``) and the plain contract for it."""
    from sats.methods.base import _REGISTRY, register_method
    from sats.methods.ft import FineTuning

    cls = register_method(type(f"_Contract_{name}", (FineTuning,), {"name": name, **attrs}))
    contract = MethodContract()
    contract.method, contract.config = name, "demo/ft.yaml"
    return cls, contract, lambda: _REGISTRY.pop(name, None)


def test_contract_catches_an_output_read_without_declaring_it(tiny_synthetic, tmp_path):
    def loss(self, batch, out, old_out, ctx):
        return {"ce": self.ce_terms(batch, out)["ce"] + 0 * out.decoder.sum()}

    _, contract, cleanup = _test_method("test-reads-undeclared", loss=loss)
    try:
        with pytest.raises(UndeclaredOutputError, match=r"step 0, new model .* read 'decoder'"):
            contract.check_declared_outputs(tiny_synthetic, tmp_path)
    finally:
        cleanup()


@pytest.mark.parametrize("attrs, message", [
    ({"needs": frozenset({"decoder"})}, r"declares new-model outputs \['decoder'\] that its loss never reads"),
    ({"uses_old_model": True}, r"runs the old model for it .* never reads the old output"),
])
def test_contract_catches_a_declared_output_that_is_never_read(attrs, message, tiny_synthetic, tmp_path):
    _, contract, cleanup = _test_method("test-unread-output", **attrs)
    try:
        with pytest.raises(AssertionError, match=message):
            contract.check_declared_outputs(tiny_synthetic, tmp_path)
    finally:
        cleanup()
