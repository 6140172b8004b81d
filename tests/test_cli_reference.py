"""The reference code's command lines (CVPR2021_PLOP / SATS argparser) and the default run names."""

from __future__ import annotations

import pytest
import yaml

from sats.cli import main
from sats.config import ConfigError
from sats.experiment import load_experiment
from conftest import CONFIGS, tiny_overrides

FT = str(CONFIGS / "demo/ft.yaml")

# Every flag of the reference's argparser (QIU023/SATS_Continual_Semantic_Seg argparser.py, a superset of
# arthurdouillard/CVPR2021_PLOP's), with "-" read as "_".
REFERENCE_ARGPARSER_FLAGS = """
distill_object small_sample_test distill_weight_args local_rank random_seed num_workers data_root dataset
num_classes dont_predict_bg model method strict_weights base_weights epochs fix_bn batch_size crop_size lr
lr_old momentum weight_decay lr_policy lr_decay_step lr_decay_factor lr_power bce test_on_val val_on_trainset
cross_val crop_val logdir name sample_num debug visualize print_interval val_interval ckpt_interval backbone
output_stride no_pretrained norm_act fusion_mode pooling test ckpt freeze loss_de loss_kd regularizer
reg_importance reg_alpha reg_no_normalize reg_iterations icarl icarl_importance icarl_disjoint icarl_bkg
init_balanced unkd alpha unce task step no_mask data_masking overlap step_ckpt opt_level pseudo threshold
step_threshold ce_on_pseudo pseudo_nb_bins classif_adaptive_factor classif_adaptive_min_factor pseudo_soft
pseudo_soft_factor pseudo_ablation kd_new checkpoint pod pod_factor pod_options pod_prepro no_pod_schedule
pod_apply pod_deeplab_mask pod_deeplab_mask_factor deeplab_mask_downscale pod_interpolate_last pod_logits
pod_large_logits spp_scales date nb_background_modes init_multimodal multimodal_fusion align_weight
align_weight_frequency cosine nca nca_margin kd_mask kd_mask_adaptative_factor disable_background
ignore_test_bg entropy_min entropy_min_mean_pixels kd_scheduling sample_weights_new temperature
temperature_semiold temperature_apply code_directory kd_bce_sig kd_bce_sig_shape exkd_gt exkd_sum focal_loss
focal_loss_new focal_loss_gamma ce_on_new
""".split()

REFERENCE_METHODS = {"FT": "ft", "LWF": "lwf", "LWF-MC": "lwf_mc", "ILT": "ilt", "EWC": "ewc", "RW": "rw",
                     "PI": "pi", "MIB": "mib", "MiB": "mib", "PLOP": "plop", "SSUL": "ssul", "SATS": "sats"}


@pytest.mark.parametrize("given, expected", sorted(REFERENCE_METHODS.items()))
def test_every_reference_method_name_maps_to_a_registered_method(given, expected):
    from sats.reference_flags import parse_overrides
    from sats.methods import list_methods

    assert expected in list_methods()
    for spelling in {given, given.lower(), given.upper(), given.replace("-", "_"), given.lower().replace("-", "_")}:
        assert parse_overrides(["--method", spelling]) == [f"method.name={expected}"]
        assert parse_overrides([f"method.name={spelling}"]) == [f"method.name={expected}"]
        assert load_experiment(FT, [f"method.name={spelling}"]).method_name == expected


def test_every_reference_flag_is_mapped_or_refused_with_a_reason():
    from sats import reference_flags as config

    tables = (config.REFERENCE_FLAGS, config.REFERENCE_STEP_FLAGS, config.REFERENCE_CHOICES,
              config.REFERENCE_SWITCHES, config.REFERENCE_COMMAND_FLAGS, config.REFERENCE_REFUSED)
    for flag in REFERENCE_ARGPARSER_FLAGS:
        homes = [t for t in tables if flag in t]
        assert len(homes) == 1, f"--{flag} is in {len(homes)} tables"
    for flag, reason in config.REFERENCE_REFUSED.items():
        with pytest.raises(ConfigError) as info:
            config.parse_command_line([f"--{flag}", "1"])
        assert f"--{flag} is not supported: {reason}" in str(info.value)
    help_text = config.reference_flag_help()
    assert all(f"--{flag}" in help_text for flag in REFERENCE_ARGPARSER_FLAGS)


def test_refusals_name_the_key_to_use_and_every_problem_is_reported():
    from sats.reference_flags import parse_command_line

    with pytest.raises(ConfigError) as info:
        parse_command_line(["--fix_bn", "--step_ckpt", "old.pth", "--opt_level", "O2", "--bogus", "3", "--task", "15-1"])
    text = str(info.value)
    assert "4 problems" in text
    assert "method.freeze_bn" in text and "checkpoints/step" in text and "train.amp=fp16" in text
    assert "unknown flag --bogus" in text and "key.sub=value" in text


def test_mapped_flags_and_protocol_switches():
    from sats.reference_flags import parse_command_line

    line = parse_command_line("--dataset voc --task 15-5s --method LWF-MC --overlapped --batch_size 12 "
                              "--crop_size 32 --opt_level O1 --loss_kd 5 --random_seed 3 --fusion-mode".split()[:-1])
    assert line.overrides == ["data.dataset=voc", "data.task=15-5s", "method.name=lwf_mc", "data.overlap=true",
                              "data.batch_size=12", "data.crop_size=32", "data.eval_size=32", "train.amp=auto",
                              "method.lambda_kd=5", "train.seed=3"]
    protocol = {"--overlap": "true", "--overlapped": "true", "--disjoint": "false", "--overlap false": "false",
                "--overlap=false": "false", "--overlap true": "true", "--disjoint=false": "true",
                "--overlapped no": "false"}
    for args, overlap in protocol.items():
        assert parse_command_line(args.split()).overrides == [f"data.overlap={overlap}"], args
    assert parse_command_line(["--crop_val"]).overrides == ["data.eval_mode=full"]  # store_false in the reference
    assert parse_command_line(["--regularizer", "rw"]).overrides == ["method.name=rw"]


def test_lr_and_epochs_apply_to_the_step_being_run():
    from sats.reference_flags import parse_command_line, reference_notes

    assert parse_command_line("--step 0 --lr 0.01 --epochs 30".split()).overrides == ["train.lr=0.01", "train.epochs=30"]
    line = parse_command_line("--step 1 --lr 0.001 --epochs 30".split())
    assert line.overrides == ["train.lr_incremental=0.001", "train.epochs_incremental=30"] and line.steps == "1"
    assert parse_command_line("--step 0 1 --lr 0.01 0.001".split()).overrides == [
        "train.lr=0.01", "train.lr_incremental=0.001"]
    with pytest.raises(ConfigError, match="one train.lr_incremental"):
        parse_command_line("--step 1 2 --lr 0.01 0.001".split())
    line = parse_command_line(["--lr", "0.01"])  # no --step: sats runs every step; the value is step 0's
    assert line.overrides == ["train.lr=0.01"] and line.steps is None
    (note,) = reference_notes(line, load_experiment(FT, line.overrides))
    assert "train.lr " in note and "train.lr_incremental=0.001" in note


def test_the_issue_command_line_resolves():
    from sats.experiment import load_run_experiment
    from sats.reference_flags import parse_command_line

    line = parse_command_line("--dataset voc --task 15-5s --step 1 --method LWF-MC --overlapped --lr 0.001 "
                              "--batch_size 12 --epochs 30".split())
    cfg = load_run_experiment(FT, line.overrides, exclude_from_name=line.name_exclude, per_step=line.per_step)
    assert line.steps == "1"
    assert (cfg.data.dataset, cfg.data.task, cfg.data.overlap, cfg.method_name) == ("voc", "15-5s", True, "lwf_mc")
    assert (cfg.data.batch_size, cfg.train.lr_incremental, cfg.train.epochs_incremental) == (12, 0.001, 30)
    assert cfg.name == "demo-ft_dataset=voc_task=15-5s_method=lwf_mc_batch_size=12"  # no per-step lr/epochs


def test_default_run_name_records_what_the_overrides_changed():
    from sats.experiment import load_run_experiment

    assert load_run_experiment(FT).name == "demo-ft"
    readme_2 = load_run_experiment(FT, ["data.task=15-1", "train.lr=0.002"])
    assert readme_2.name == "demo-ft_task=15-1_lr=0.002"
    assert readme_2.resolved_run_dir() != load_run_experiment(FT).resolved_run_dir()
    assert load_run_experiment(FT, ["data.task=15-5", "log.progress=false", "data.workers=2"]).name == "demo-ft"
    assert load_run_experiment(FT, ["method.name=MiB"]).name == "demo-ft_method=mib"
    assert load_run_experiment(FT, ["train.lr=0.002", "name=mine"]).name == "mine"
    assert load_run_experiment(FT, ["train.lr=0.002", "run_dir=/tmp/x"]).name == "demo-ft"
    odd = load_run_experiment(FT, ["data.root=/data/some where/voc", "model.embed_dims=[8,16,16,32]"]).name
    assert odd.startswith("demo-ft_root=voc-") and odd.endswith("_embed_dims=8-16-16-32")
    assert "/" not in odd and " " not in odd


def test_sats_config_prints_the_resolved_config(capsys):
    assert main(["config", FT, "data.task=15-1", "--method", "LWF-MC", "--step", "1", "--lr", "0.0005"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["name"] == "demo-ft_task=15-1_method=lwf_mc"
    assert cfg["data"]["task"] == "15-1" and cfg["method"]["name"] == "lwf_mc" and cfg["method"]["lambda_kd"] == 10.0
    assert cfg["train"]["lr_incremental"] == 0.0005 and cfg["train"]["lr"] == 0.003
    assert main(["config", FT, "train.nope=1"]) == 2


def test_train_help_lists_the_override_syntax_and_the_reference_flags(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for text in ("key.sub=value", "--overlapped", "--disjoint", "train.lr_incremental", "--step", "--test", "--ckpt",
                 "--fix_bn", "demo-ft_task=15-1_lr=0.002"):
        assert text in out, text


def test_commands_that_differ_in_overrides_write_different_run_dirs(tiny_synthetic, tmp_path, capsys):
    """The README's first two commands: the second one is no longer refused as "another config"."""
    base = [o for o in tiny_overrides(tiny_synthetic, tmp_path, tmp_path / "cache") if not o.startswith("run_dir=")]
    base.append(f"output_dir={tmp_path / 'runs'}")
    assert main(["train", FT, *base, "--steps", "0"]) == 0
    assert main(["train", FT, *base, "train.lr=0.002", "--steps", "0"]) == 0
    capsys.readouterr()
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all((run / "results.json").is_file() for run in runs)


def test_step_by_step_commands_share_a_run_then_test_and_ckpt(tiny_synthetic, tmp_path, capsys):
    run_dir = tmp_path / "run"
    tiny = tiny_overrides(tiny_synthetic, run_dir, tmp_path / "cache")
    train = ["train", FT, *tiny, "--task", "15-5", "--method", "FT", "--overlapped"]
    assert main([*train, "--step", "0", "--lr", "0.003", "--epochs", "2"]) == 0  # the config's step-0 schedule
    assert "| step |" in capsys.readouterr().out
    assert main([*train, "--step", "1", "--lr", "0.001", "--epochs", "1"]) == 0  # same config, next step
    capsys.readouterr()
    from sats.engine.results import load_rows

    assert sorted(load_rows(run_dir)) == [0, 1]

    assert main([*train, "--step", "1", "--test"]) == 0  # = sats test RUN_DIR --step 1
    out = capsys.readouterr().out
    assert "reproduced" in out and "| 1 |" in out and "| 0 |" not in out
    ckpt = run_dir / "checkpoints" / "step0.ckpt"
    assert main([*train, "--test", "--ckpt", str(ckpt)]) == 0  # the step the checkpoint records
    assert "| step |" in capsys.readouterr().out
    assert main([*train, "--ckpt", str(ckpt)]) == 2  # --ckpt alone: refused, with the command to use
    assert "--test --ckpt" in capsys.readouterr().err
    assert main([*train, "--test", "--ckpt", str(tmp_path / "missing.ckpt"), "--step", "0"]) == 4
    assert "missing.ckpt" in capsys.readouterr().err
