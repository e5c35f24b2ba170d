"""What you typed is what trains (issue 24, items 1, 5, 7): one rule for flags against keys, run names and recipe
hashes from the merged config, config errors that name their place, and the refusals' table in docs/runs.md.

Every command line is parsed and built in-process (tools/train.py's parse_args + build_cfg): nothing trains.
"""

from __future__ import annotations

import itertools
import re

import pytest

from mdistiller.cli import train as train_tool
from mdistiller.distillers import get_distiller_class
from mdistiller.engine.cfg import cfg_value, dump_cfg, leaf_values, load_cfg, merge_opts, override_value
from mdistiller.engine.run import config_hash, run_name
from mdistiller.errors import MdistillerError

from conftest import REPO

C = "configs/cifar100/"
KD = C + "kd/resnet32x4_resnet8x4.yaml"
DKD = C + "dkd/resnet32x4_resnet8x4.yaml"
RLD = C + "rld/resnet32x4_resnet8x4.yaml"
CTKD = C + "ctkd/resnet32x4_resnet8x4.yaml"
SDD_KD = C + "sdd_kd/ResNet50_MobileNetV2.yaml"
SDD_DKD = C + "sdd_dkd/ResNet50_MobileNetV2.yaml"


def _build(*argv: str):
    args = train_tool.parse_args(["--cfg", str(REPO / argv[0]), *argv[1:]])
    return train_tool.build_cfg(args), args


# ---- refusals: (command line after --cfg, the message it must start with or hold, the phrase docs/runs.md shows) ----

FLAG_REFUSALS = [
    # the issue's case: the typed temperature would silently lose to --base-temp's default
    ((KD, "KD.TEMPERATURE", "3", "--logit-stand"),
     "KD.TEMPERATURE 3 and --logit-stand --base-temp 2 both set KD.TEMPERATURE (3 vs 2); keep one", "both set"),
    ((KD, "--logit-stand", "--kd-weight", "6", "KD.LOSS.KD_WEIGHT", "0.9"),
     "KD.LOSS.KD_WEIGHT 0.9 and --logit-stand --kd-weight 6 both set KD.LOSS.KD_WEIGHT (0.9 vs 6); keep one",
     "both set"),
    ((DKD, "DKD.T", "3", "--logit-stand", "--base-temp", "2"),
     "DKD.T 3 and --logit-stand --base-temp 2 both set DKD.T", "both set"),
    ((RLD, "RLD.T", "7", "--logit-stand", "--base-temp", "3"),
     "RLD.T 7 and --logit-stand --base-temp 3 both set RLD.T", "both set"),
    ((RLD, "RLD.ALPHA_T", "3", "--same-t"), "RLD.ALPHA_T 3 and --same-t both set RLD.ALPHA_T (3 vs 4)", "both set"),
    ((CTKD, "KD.LOSS.KD_WEIGHT", "1", "--logit-stand"),
     "KD.LOSS.KD_WEIGHT 1 and --logit-stand --kd-weight 9 both set", "both set"),
    ((SDD_KD, "SDD.M", "[1,2,4]", "--M", "[1,2]"), "SDD.M [1,2,4] and --M [1,2] both set SDD.M", "both set"),
    ((SDD_DKD, "--warmup", "10", "DKD.WARMUP", "5"), "DKD.WARMUP 5 and --warmup 10 both set DKD.WARMUP", "both set"),
    ((KD, "EXPERIMENT.LOGIT_STAND", "False", "--logit-stand"),
     "EXPERIMENT.LOGIT_STAND False and --logit-stand both set", "both set"),
    ((KD, "EXPERIMENT.BASE_TEMP", "3", "--logit-stand"),
     "EXPERIMENT.BASE_TEMP 3 and --logit-stand --base-temp 2 both set", "both set"),
    # flags parsed and ignored
    ((KD, "--base-temp", "3"), "--base-temp 3 without --logit-stand changes nothing",
     "without --logit-stand changes nothing"),
    ((KD, "--base-temp", "3", "--kd-weight", "5"), "--base-temp 3 --kd-weight 5 without --logit-stand changes nothing",
     "without --logit-stand changes nothing"),
    ((DKD, "--kd-weight", "5"), "--kd-weight 5 without --logit-stand", "without --logit-stand changes nothing"),
    # the records of the LS flags, typed as keys: the name would say LS:T3 while nothing trains at 3
    ((KD, "EXPERIMENT.LOGIT_STAND", "True", "EXPERIMENT.BASE_TEMP", "3", "EXPERIMENT.KD_WEIGHT", "9"),
     "EXPERIMENT.BASE_TEMP 3 and EXPERIMENT.KD_WEIGHT 9: only a record of what --logit-stand",
     "only a record of what --logit-stand"),
    # an unknown flag (existing refusal, kept in the docs' table)
    ((KD, "--logit-stnd"), "unknown flag --logit-stnd (did you mean --logit-stand?)", "unknown flag"),
]


@pytest.mark.parametrize("argv, message, phrase", FLAG_REFUSALS, ids=lambda v: " ".join(v) if isinstance(v, tuple)
                         else None)
def test_a_flag_against_a_typed_key_is_refused_in_one_line(argv, message, phrase):
    with pytest.raises(MdistillerError) as info:
        _build(*argv)
    text = str(info.value)
    assert "\n" not in text and text.startswith(message.split(" (did")[0]) and message in text and phrase in text


def test_a_file_that_already_holds_the_ls_setting_refuses_the_flags_again(tmp_path):
    """A run's config.yaml as --cfg: the flags were applied to it, and DKD's would multiply ALPHA and BETA twice."""
    cfg, _ = _build(DKD, "--logit-stand")
    dumped = tmp_path / "config.yaml"
    dump_cfg(cfg, str(dumped))
    again, _ = _build(str(dumped))  # without the flags: the same recipe
    assert config_hash(again) == config_hash(cfg) and (again.DKD.ALPHA, again.DKD.BETA) == (9.0, 72.0)
    with pytest.raises(MdistillerError, match=r"already holds a --logit-stand setting \(EXPERIMENT.BASE_TEMP 2, "
                                              r"EXPERIMENT.KD_WEIGHT 9: .*leave the flags out") as info:
        _build(str(dumped), "--logit-stand")
    assert "\n" not in str(info.value)


def test_the_issues_command_through_main_writes_nothing(tmp_path):
    prefix = tmp_path / "out"
    with pytest.raises((MdistillerError, SystemExit)):
        train_tool.main(["--cfg", str(REPO / KD), "KD.TEMPERATURE", "3", "--logit-stand", "LOG.PREFIX", str(prefix),
                         "LOG.RESULTS_DIR", str(tmp_path / "logs"), "DATASET.ROOT", str(tmp_path / "data")])
    assert list(tmp_path.iterdir()) == []


# ---- accepted command lines: names and hashes from what trains ----

ACCEPTED = [
    (KD,),
    (KD, "KD.TEMPERATURE", "3"),
    (KD, "KD.TEMPERATURE", "3", "KD.TEMPERATURE", "5"),  # given twice: the last counts, in the name as in training
    (KD, "--logit-stand"),
    (KD, "--logit-stand", "KD.TEMPERATURE", "2"),  # the same value as the flag: no conflict, the same training
    (KD, "--logit-stand", "--base-temp", "3"),
    (KD, "--logit-stand", "--base-temp", "3", "--kd-weight", "6", "KD.LOSS.CE_WEIGHT", "0.5"),
    (KD, "SOLVER.EPOCHS", "10"),
    (KD, "EXPERIMENT.LOGIT_STAND", "True"),
    (DKD,),
    (DKD, "--logit-stand"),
    (DKD, "DKD.ALPHA", "2", "--logit-stand"),  # --kd-weight scales the typed ALPHA (the authors' rule): 18 trains
    (DKD, "DKD.BETA", "4"),
    (DKD, "DKD.BETA", "4", "--logit-stand", "--kd-weight", "2"),
    (DKD, "DKD.BETA", "8", "--logit-stand", "--kd-weight", "1"),
    (RLD,),
    (RLD, "--same-t"),
    (RLD, "--same-t", "RLD.ALPHA", "1.", "RLD.BETA", "8.", "RLD.T", "4."),  # the authors' README command
    (RLD, "RLD.T", "3", "--same-t"),
    (RLD, "--logit-stand", "--same-t"),
    (RLD, "--logit-stand", "--kd-weight", "5", "RLD.ALPHA", "2.0"),
    (CTKD, "--logit-stand"),
    (SDD_KD,),
    (SDD_KD, "--M", "[1,2]"),
    (SDD_KD, "SDD.M", "[1,2]"),
    (SDD_KD, "--M", "[1]"),
    (SDD_DKD, "--warmup", "10"),
    (SDD_DKD, "DKD.WARMUP", "10"),
]

# The keys a run's hash leaves out on purpose (where it works, the seed, bitwise-neutral switches): not "what trains".
_NOT_RECIPE = ("EXPERIMENT.SEED", "EXPERIMENT.DETERMINISTIC", "DATASET.ROOT", "DATASET.NUM_WORKERS", "LOG.PREFIX",
               "LOG.RESULTS_DIR", "DISTILLER.TEACHER_CKPT", "DISTILLER.TEACHER_CACHE", "SOLVER.CHANNELS_LAST",
               "SOLVER.COMPILE")


def _trains(cfg) -> dict:
    return {k: v for k, v in leaf_values(cfg).items() if k not in _NOT_RECIPE}


@pytest.fixture(scope="module")
def accepted():
    return {argv: _build(*argv) for argv in ACCEPTED}


def test_recipes_that_train_differently_never_share_a_name_or_a_hash(accepted):
    built = {argv: (run_name(cfg, args.opts), config_hash(cfg), _trains(cfg)) for argv, (cfg, args) in accepted.items()}
    for (a, (name_a, hash_a, trains_a)), (b, (name_b, hash_b, trains_b)) in itertools.combinations(built.items(), 2):
        if trains_a != trains_b:
            assert name_a != name_b, (a, b, name_a)
            assert hash_a != hash_b, (a, b)
        else:
            assert hash_a == hash_b, (a, b)


def test_the_same_training_typed_two_ways_has_one_hash(accepted):
    assert config_hash(accepted[(KD, "--logit-stand")][0]) == config_hash(
        accepted[(KD, "--logit-stand", "KD.TEMPERATURE", "2")][0])
    assert config_hash(accepted[(SDD_KD, "--M", "[1,2]")][0]) == config_hash(accepted[(SDD_KD, "SDD.M", "[1,2]")][0])


def _join_ls(tags: list[str]) -> list[str]:
    """`LS:T2` and `w9` back into the one tag `LS:T2,w9`."""
    out: list[str] = []
    for tag in tags:
        if re.fullmatch(r"w[0-9.e+-]+", tag) and out and out[-1].startswith("LS:T"):
            out[-1] += "," + tag
        else:
            out.append(tag)
    return out


_LS_TAG = re.compile(r"^LS:T([0-9.e+-]+),w([0-9.e+-]+)$")


@pytest.mark.parametrize("argv", ACCEPTED, ids=" ".join)
def test_every_value_a_name_shows_is_the_value_that_trains(accepted, argv):
    cfg, args = accepted[argv]
    name = run_name(cfg, args.opts)
    assert name.startswith(cfg.EXPERIMENT.TAG + ",") or name == cfg.EXPERIMENT.TAG
    rest = name[len(cfg.EXPERIMENT.TAG) + 1:]
    tags = [t for t in re.split(r",(?![^\[]*\])|,(?=LS:)", rest) if t]  # commas inside [..] belong to a list
    tags = _join_ls(tags)
    ls_tags = [t for t in tags if _LS_TAG.match(t)]
    scaled: dict[str, float] = {}  # key -> the factor the LS tag's w multiplies it by
    if ls_tags:  # the LS flags' τ and w: what the method's mapping makes of the typed recipe is what trains
        (ls,) = [_LS_TAG.match(t) for t in ls_tags]
        typed = load_cfg(str(REPO / argv[0]), train_tool.parse_args(["--cfg", *argv]).opts)
        temp, weight = float(ls.group(1)), float(ls.group(2))
        expected = typed.clone()
        get_distiller_class(typed.DISTILLER.TYPE).declares.logit_stand(expected, temp, weight)
        if "--same-t" in argv:
            expected.RLD.ALPHA_T = expected.RLD.T
        changed = [k for k, v in leaf_values(expected).items() if v != cfg_value(typed, k)]
        assert changed
        for key in changed:
            assert cfg_value(cfg, key) == cfg_value(expected, key), key
            if cfg_value(typed, key) and cfg_value(expected, key) == cfg_value(typed, key) * weight:
                scaled[key] = weight
        assert (cfg.EXPERIMENT.BASE_TEMP, cfg.EXPERIMENT.KD_WEIGHT) == (temp, weight)
    for tag in tags:
        if tag in ls_tags or ":" not in tag:
            continue
        key, value = tag.split(":", 1)
        assert override_value(key, value) * scaled.get(key, 1) == cfg_value(cfg, key), tag
    assert ("--logit-stand" in argv) == any(_LS_TAG.match(t) for t in tags)


def test_a_scaled_key_shows_its_typed_factor_beside_the_scale():
    """DKD/RLD's --kd-weight multiplies the typed ALPHA, as the authors' code does: the name keeps the factor typed
    and the LS tag's w (as the published LS table's runs are named: DKD.BETA:2.0,LS:T2,w15 trains BETA 30)."""
    cfg, args = _build(DKD, "DKD.ALPHA", "2", "--logit-stand")
    assert cfg.DKD.ALPHA == 18.0 and run_name(cfg, args.opts) == "dkd,res32x4,res8x4,DKD.ALPHA:2,LS:T2,w9"
    cfg, args = _build(C + "dkd/vgg13_vgg8.yaml", "--logit-stand", "--kd-weight", "15", "DKD.BETA", "2.0")
    assert cfg.DKD.BETA == 30.0 and run_name(cfg, args.opts) == "dkd,vgg13,vgg8,DKD.BETA:2.0,LS:T2,w15"


def test_existing_names_are_kept():
    cfg, args = _build(KD, "--logit-stand")
    assert run_name(cfg, args.opts) == "kd,res32x4,res8x4,LS:T2,w9"
    cfg, args = _build(RLD, "--same-t", "RLD.ALPHA", "1.", "RLD.BETA", "8.", "RLD.T", "4.")
    assert run_name(cfg, args.opts) == "rld,res32x4,res8x4,RLD.ALPHA:1.,RLD.BETA:8.,RLD.T:4.,RLD.ALPHA_T:4"
    cfg, args = _build(SDD_KD, "--M", "[1,2]")
    assert run_name(cfg, args.opts) == "sdd_kd,res50,mv2,SDD.M:[1,2]"


def test_a_name_never_shows_a_value_that_does_not_train():
    """Whatever changed the config after the overrides, run_name shows the merged value (the guard under the rule)."""
    cfg = load_cfg(str(REPO / KD), ["KD.TEMPERATURE", "3"])
    merge_opts(cfg, ["KD.TEMPERATURE", "2.5"])
    assert run_name(cfg, ["KD.TEMPERATURE", "3"]) == "kd,res32x4,res8x4,KD.TEMPERATURE:2.5"


# ---- errors with a place (item 5) ----

CONFIG_ERRORS = [
    ("SOLVER:\n  LR: [0.1, 0.2\n  EPOCHS: 3\n",
     r"config file .*bad\.yaml line 3, column 9 is not valid YAML: expected ',' or '\]', but got ':' \(while parsing "
     r"a flow sequence begun at line 2\)", "is not valid YAML"),
    ("SOLVER: [unclosed\n", r"bad\.yaml line 2, column 1 is not valid YAML: expected ',' or '\]'", "is not valid YAML"),
    ("SOLVER:\n\tLR: 0.1\n", r"bad\.yaml line 2, column 1 is not valid YAML: found character '\\t'",
     "is not valid YAML"),
    ("SOLVER:\n  EPOCHS: 1\nKD:\n  TEMPERATURE: 2\nSOLVER:\n  LR: 0.1\n",
     r"bad\.yaml line 5, column 1 is not valid YAML: key SOLVER given twice \(first at line 1\)", "given twice"),
    ("KD:\n  TEMPERATURE: 2\n  TEMPERATURE: 3\n",
     r"bad\.yaml line 3, column 3 is not valid YAML: key TEMPERATURE given twice \(first at line 2\)", "given twice"),
    ("SOLVER:\n  EPOHCS: 3\n", r"unknown config key SOLVER.EPOHCS in .*bad\.yaml \(did you mean SOLVER.EPOCHS\?\)",
     "unknown config key"),
    ("SOLVER:\n  EPOCHS: many\n", r"config key SOLVER.EPOCHS in .*bad\.yaml expects int", "expects"),
]


@pytest.mark.parametrize("text, message, phrase", CONFIG_ERRORS, ids=range(len(CONFIG_ERRORS)))
def test_a_config_file_error_names_its_place(tmp_path, text, message, phrase):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(MdistillerError, match=message) as info:
        load_cfg(str(tmp_path / "bad.yaml"))
    assert "\n" not in str(info.value) and phrase in str(info.value)


def test_an_unknown_key_names_the_file_it_came_from(tmp_path):
    (tmp_path / "base.yaml").write_text("SOLVER:\n  LERNING_RATE: 0.1\n")
    (tmp_path / "child.yaml").write_text("_BASE_: base.yaml\nSOLVER:\n  EPOCHS: 3\n")
    with pytest.raises(MdistillerError, match=r"unknown config key SOLVER.LERNING_RATE in .*base\.yaml \(did you "
                                              r"mean SOLVER.LR_[A-Z_]+\?\)|SOLVER.LERNING_RATE in .*base\.yaml"):
        load_cfg(str(tmp_path / "child.yaml"))
    (tmp_path / "base.yaml").write_text("SOLVER:\n  LR: [0.1\n")
    with pytest.raises(MdistillerError, match=r"base\.yaml line 3, column 1 is not valid YAML"):
        load_cfg(str(tmp_path / "child.yaml"))
    with pytest.raises(MdistillerError, match=r"unknown config key SOLVER.EPOHCS in the command line \(did you mean "
                                              r"SOLVER.EPOCHS\?\)"):
        _build(KD, "SOLVER.EPOHCS", "3")


def test_every_shipped_config_has_no_key_twice():
    for path in sorted((REPO / "configs").glob("*/*/*.yaml")):
        load_cfg(str(path))


# ---- the docs' table (item 7) ----

def _errors_section() -> str:
    text = (REPO / "docs" / "runs.md").read_text()
    start = text.index("## Errors before training")
    return text[start:text.index("\n## ", start + 1)]


def test_the_docs_table_lists_every_refusal_of_these_tables():
    section = _errors_section()
    phrases = {phrase for *_, phrase in FLAG_REFUSALS + CONFIG_ERRORS} | {"already holds a --logit-stand setting"}
    for phrase in phrases:
        assert phrase in section, phrase
    rows = [line for line in section.splitlines() if line.startswith("| ") and "`" in line]
    assert rows
    for row in rows:  # and every row of the table is a case here
        assert any(phrase in row for phrase in phrases), row
