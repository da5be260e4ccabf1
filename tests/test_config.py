import logging
import re
from pathlib import Path

import pytest

from attention_map.config import ConfigError, Settings, default_conf_text, key_table_markdown, load_settings, parse_overrides

REPO = Path(__file__).resolve().parents[1]


def _conf(tmp_path, text):
    (tmp_path / "records.jsonl").write_text('{"image_path": "a.png", "question": "q", "answer": "a"}\n')
    path = tmp_path / "exp.conf"
    path.write_text(text)
    return path


def test_conf_is_sourced_by_bash_and_overrides_win(tmp_path):
    conf = _conf(tmp_path, f'root="{tmp_path}"\nRESULTS_ROOT="$root/results"\nDATA_FILE="$root/records.jsonl"\n'
                           'OUTPUT_DIR="${RESULTS_ROOT}/exp_01"\nTOPK=$((100 + 50))\nSKIP_CRF=false\n')
    settings, _ = load_settings(conf, parse_overrides(["ALPHA=0.25", "COLORMAP=turbo"]))
    assert settings.OUTPUT_DIR == tmp_path / "results" / "exp_01"
    assert settings.TOPK == 150 and settings.SKIP_CRF is False
    assert settings.ALPHA == 0.25 and settings.COLORMAP == "turbo"
    assert settings.IMAGE_ROOT == tmp_path            # default: the data file's folder
    assert settings.BATCH_SIZE is None and settings.MODEL.startswith("hf-hub:")   # None: per-device default


def test_unknown_key_names_the_closest_valid_one(tmp_path):
    conf = _conf(tmp_path, f'DATA_FILE="{tmp_path}/records.jsonl"\nOUTPT_DIR=x\nhelper=ignored\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(conf)
    assert caught.value.problems == [f"{conf}: unknown key OUTPT_DIR; did you mean OUTPUT_DIR?"]
    with pytest.raises(ConfigError, match="command line: unknown key TOPKK; did you mean TOPK"):
        load_settings(None, {"DATA_FILE": str(tmp_path / "records.jsonl"), "TOPKK": "3"})
    with pytest.raises(ConfigError, match="command line: unknown key output_dir; did you mean OUTPUT_DIR"):
        load_settings(None, {"DATA_FILE": str(tmp_path / "records.jsonl"), "output_dir": "x"})


def test_a_key_written_in_lower_case_in_a_file_is_a_helper_and_the_log_says_so(tmp_path):
    conf = _conf(tmp_path, f'DATA_FILE="{tmp_path}/records.jsonl"\ntopk=5\nresults_root=r\n'
                           'output_dir=out\nOUTPUT_DIR="$output_dir/maps"\n')
    settings, notes = load_settings(conf)
    assert settings.TOPK == 300 and settings.OUTPUT_DIR == Path("out/maps")
    # the file sets OUTPUT_DIR itself, so its output_dir is plainly a helper
    assert notes == [(logging.WARNING, f"{conf}: {name} is lower case, so a helper variable of the file, not the key "
                                       f"{name.upper()}") for name in ("results_root", "topk")]


def test_a_key_from_the_environment_is_information_and_a_likely_mistake_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("TOPK", "7")
    conf = _conf(tmp_path, f'DATA_FILE="{tmp_path}/records.jsonl"\nalpha=0.2\n')
    settings, notes = load_settings(conf)
    assert settings.TOPK == 7 and settings.ALPHA == 0.5
    assert notes == [(logging.WARNING, f"{conf}: alpha is lower case, so a helper variable of the file, not the key "
                                       "ALPHA"), (logging.INFO, "TOPK taken from the environment")]


def test_a_variable_the_file_expands_that_no_one_set_is_named_with_its_line(tmp_path, monkeypatch):
    """bash expands it to nothing: results/${AM_TEST_EXPERIMENT} with the variable unset (or misspelt) is results/."""
    for name in ("AM_TEST_EXPERIMENT", "AM_TEST_OTHER", "AM_TEST_UNSET", "AM_TEST_QUOTED", "AM_TEST_COMMENT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AM_TEST_SET", "x")
    conf = _conf(tmp_path, f'DATA_FILE="{tmp_path}/records.jsonl"\n'
                           'OUTPUT_DIR="results/${AM_TEST_EXPERIMENT}"   # the experiment\'s folder\n'
                           'name="${AM_TEST_OTHER:-exp_01}"\n'            # a default: meant
                           "label='$AM_TEST_QUOTED'\n"                    # single quotes: not expanded
                           '# OUTPUT_DIR=$AM_TEST_COMMENT\n'
                           'both=$AM_TEST_SET$AM_TEST_UNSET\n')
    settings, notes = load_settings(conf)
    assert settings.OUTPUT_DIR == Path("results")
    assert notes == [(logging.WARNING, f"{conf}: line {number}: ${name} is not set, so it expands to nothing (set it, "
                                       f"or write ${{{name}:-default}})")
                     for number, name in [(2, "AM_TEST_EXPERIMENT"), (6, "AM_TEST_UNSET")]]


def test_cam_method_of_older_files_points_to_cam_version_whose_values_take_any_case(tmp_path):
    conf = _conf(tmp_path, f'DATA_FILE="{tmp_path}/records.jsonl"\nCAM_METHOD=gscorecam\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(conf)
    assert caught.value.problems == [f"{conf}: unknown key CAM_METHOD; did you mean CAM_VERSION?"]
    data = {"DATA_FILE": str(tmp_path / "records.jsonl")}
    assert load_settings(None, data)[0].CAM_VERSION == "gScoreCAM"
    for written, name in (("gradcam++", "GradCAM++"), ("HIRESCAM", "HiResCAM"), ("scoreCAM", "ScoreCAM")):
        assert load_settings(None, {**data, "CAM_VERSION": written})[0].CAM_VERSION == name
    with pytest.raises(ConfigError, match=re.escape("CAM_VERSION='GradCAM+' is not one of gScoreCAM, ScoreCAM, GradCAM, ")):
        load_settings(None, {**data, "CAM_VERSION": "GradCAM+"})


def test_body_mask_is_chosen_by_name_and_enable_body_mask_false_still_means_none(tmp_path):
    from attention_map.body_mask import BODY_MASKS

    data = {"DATA_FILE": str(tmp_path / "records.jsonl")}
    (tmp_path / "records.jsonl").write_text("")
    assert load_settings(None, data)[0].body_mask == "air"
    assert load_settings(None, {**data, "BODY_MASK": "Otsu"})[0].body_mask == "otsu"
    assert load_settings(None, {**data, "BODY_MASK": "none"})[0].body_mask is None
    assert load_settings(None, {**data, "ENABLE_BODY_MASK": "false", "BODY_MASK": "otsu"})[0].body_mask is None
    with pytest.raises(ConfigError, match=re.escape("BODY_MASK='lungs' is not one of air, otsu, none")):
        load_settings(None, {**data, "BODY_MASK": "lungs"})
    assert set(Settings.__dataclass_fields__["BODY_MASK"].metadata["choices"]) == set(BODY_MASKS) | {"none"}
    # PyTorch's way of naming a GPU, which the run does not take: the message says what does
    with pytest.raises(ConfigError) as caught:
        load_settings(None, {**data, "DEVICE": "cuda:1"})
    assert caught.value.problems == ["command line: DEVICE='cuda:1' is not one of auto, cuda, cpu (for GPU 1, set "
                                     "CUDA_VISIBLE_DEVICES=1 and DEVICE=cuda; a Slurm job sees its own GPUs only)"]


def test_every_bad_value_is_reported_one_line_each(tmp_path):
    (tmp_path / "a-file").write_text("")
    conf = _conf(tmp_path, 'DATA_FILE=/no/such/file.jsonl\nTOPK=0\nALPHA=2\nCOLORMAP=rainbow\nSKIP_CRF=maybe\n'
                           f'BATCH_SIZE=big\nMODEL=/no/such/model\nOUTPUT_DIR={tmp_path}/a-file/out\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(conf)
    problems = caught.value.problems
    assert len(problems) == 8
    for key in ("DATA_FILE", "TOPK", "ALPHA", "COLORMAP", "SKIP_CRF", "BATCH_SIZE", "MODEL", "OUTPUT_DIR"):
        assert any(p.startswith(f"{conf}: {key}") for p in problems), key
    assert all("\n" not in p for p in problems)
    # a folder that cannot be made is found before the model loads, not when the first output is written
    assert f"{conf}: OUTPUT_DIR={tmp_path}/a-file/out: {tmp_path}/a-file is a file, not a folder" in problems


def test_bash_errors_are_reported(tmp_path):
    conf = _conf(tmp_path, 'DATA_FILE="unterminated\n')
    with pytest.raises(ConfigError, match=re.escape(f"{conf}: line 1: unexpected EOF while looking for matching")):
        load_settings(conf)
    (tmp_path / "last.conf").write_text("echo a note\nfalse\n")
    with pytest.raises(ConfigError, match=re.escape("last.conf: bash could not source it: its last command exited 1")):
        load_settings(tmp_path / "last.conf")


def test_what_bash_goes_on_after_stops_the_run_one_line_each(tmp_path):
    """bash goes on after a failed command and exits 0: a sourced file that is missing, `KEY = value` or a command
    not found would leave settings silently at their defaults."""
    (tmp_path / "base.conf").write_text(f'DATA_FILE="{tmp_path}/records.jsonl"\nno-such-command\n')
    conf = _conf(tmp_path, f'source "{tmp_path}/no-such.conf"\nsource "{tmp_path}/base.conf"\nSTOP_AFTER = 2\n'
                           'X=$(also-no-such-command)\nTOPK=8\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(conf)
    assert caught.value.problems == [
        f"{conf}: line 1: {tmp_path}/no-such.conf: No such file or directory",
        f"{conf}: {tmp_path}/base.conf: line 2: no-such-command: command not found",
        f"{conf}: line 3: STOP_AFTER: command not found (bash takes no spaces around '=': STOP_AFTER=value)",
        f"{conf}: line 4: also-no-such-command: command not found"]
    # bash's warnings do not stop it: they are the log's (a locale the node lacks is common on clusters)
    conf.write_text(f'DATA_FILE="{tmp_path}/records.jsonl"\nexport LC_ALL=xx_YY.UTF-8\nTOPK=8\n')
    settings, notes = load_settings(conf)
    assert settings.TOPK == 8
    assert notes == [(logging.WARNING, f"{conf}: line 2: warning: setlocale: LC_ALL: cannot change locale "
                                       "(xx_YY.UTF-8): No such file or directory")]


def test_a_file_with_windows_line_endings_runs_or_says_why_not(tmp_path):
    # its values end in a carriage return, which is stripped, so plain settings work as they are
    conf = _conf(tmp_path, f'DATA_FILE="{tmp_path}/records.jsonl"\r\nTOPK=8\r\nSTOP_AFTER=2\r\n')
    settings, _ = load_settings(conf)
    assert settings.TOPK == 8 and settings.STOP_AFTER == 2 and settings.DATA_FILE == tmp_path / "records.jsonl"
    # but not a file named on such a line, nor a value built from a helper variable set on one
    conf.write_text(f'source "{tmp_path}/base.conf"\r\nname=exp1\r\nOUTPUT_DIR="{tmp_path}/$name/maps"\r\n')
    (tmp_path / "base.conf").write_text(f'DATA_FILE="{tmp_path}/records.jsonl"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(conf)
    assert caught.value.problems == [f"{conf}: line 1: {tmp_path}/base.conf\\r: No such file or directory (the file "
                                     "has Windows line endings: convert it with dos2unix)"]
    conf.write_text(f'DATA_FILE="{tmp_path}/records.jsonl"\r\nname=exp1\r\nOUTPUT_DIR="{tmp_path}/$name/maps"\r\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(conf)
    assert caught.value.problems == [f"{conf}: OUTPUT_DIR='{tmp_path}/exp1\\r/maps' holds a carriage return (\\r): "
                                     "the file has Windows line endings; convert it with dos2unix"]
    # a blank line, which such a file has between its groups of settings: bash runs its lone carriage return
    conf.write_text(f'# the data\r\nDATA_FILE="{tmp_path}/records.jsonl"\r\n\r\nTOPK=8\r\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(conf)
    assert caught.value.problems == [f"{conf}: line 3: $'\\r': command not found (the file has Windows line endings: "
                                     "convert it with dos2unix)"]


def test_run_config_round_trips(tmp_path):
    conf = _conf(tmp_path, f'DATA_FILE="{tmp_path}/records.jsonl"\nSTOP_AFTER=3\nPROMPT_SOURCE=both\n')
    settings, _ = load_settings(conf)
    written = tmp_path / "run_config.conf"
    written.write_text(settings.to_conf())
    again, _ = load_settings(written)
    assert again == settings


def test_default_conf_in_the_repo_lists_every_key_with_its_default():
    assert (REPO / "configs" / "default.conf").read_text() == default_conf_text()
    readme = (REPO / "README.md").read_text()
    assert key_table_markdown() in readme, "README's key table differs from config.key_table_markdown()"
    for name in Settings.__dataclass_fields__:
        assert f"`{name}`" in readme, f"README does not document {name}"


def test_precision_auto_is_fp32_on_cuda_and_on_the_cpu(caplog):
    import torch

    from attention_map.pipeline import resolve_precision

    assert resolve_precision("auto", torch.device("cuda")) == "fp32"   # the one within 1e-2 on every map
    assert resolve_precision("tf32", torch.device("cuda")) == "tf32"
    assert resolve_precision("fp16", torch.device("cuda")) == "fp16"
    assert resolve_precision("auto", torch.device("cpu")) == "fp32" and not caplog.records
    assert resolve_precision("tf32", torch.device("cpu")) == "fp32"
    assert "PRECISION=tf32 applies on CUDA only" in caplog.text
