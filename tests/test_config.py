import json
from pathlib import Path

import pytest

from pipeline.config import SEVEN_PROJECTIONS, config_from_dict, load_config
from pipeline.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, data: dict, name: str = "run.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def error_of(tmp_path: Path, data: dict, overrides=()) -> str:
    with pytest.raises(UserError) as info:
        load_config(write(tmp_path, data), overrides)
    return str(info.value)


def test_defaults_fill_everything_but_paths(tmp_path):
    config = load_config(write(tmp_path, {}))
    assert config.inference.top_logits_num == 64
    assert config.distillation.distillation_type == "forward_kld"
    assert config.distillation.tail == "auto"
    assert config.lora.enable and config.lora.r == 16 and config.lora.alpha == 32
    assert config.lora.target_modules == SEVEN_PROJECTIONS
    assert config.dataset.labeled_path is None and config.models.teacher == []


@pytest.mark.parametrize(
    "name", ["kd_white_box_lora.json", "kd_multi_teacher_lora.json", "kd_cross_tokenizer_lora.json", "demo.json"]
)
def test_shipped_configs_load(name):
    config = load_config(REPO / "configs" / name)
    assert config.training["output_dir"]
    assert config.models.teacher


def test_the_demo_reads_the_shipped_config_and_writes_under_the_repository():
    from pipeline.toy import demo

    assert demo.CONFIG == REPO / "configs" / "demo.json" and demo.CONFIG.is_file()
    assert demo.ASSETS == REPO / ".assets"


def test_shipped_7b_config_matches_the_recipe():
    config = load_config(REPO / "configs" / "kd_white_box_lora.json")
    assert [str(t) for t in config.models.teacher] == ["Qwen/Qwen2.5-7B-Instruct"]  # hub id kept as is
    assert str(config.models.student) == "Qwen/Qwen2.5-0.5B-Instruct"
    assert (config.lora.r, config.lora.alpha, config.lora.target_modules) == (16, 32, SEVEN_PROJECTIONS)
    t = config.training
    assert (t["learning_rate"], t["per_device_train_batch_size"], t["gradient_accumulation_steps"]) == (5e-4, 4, 2)
    assert t["num_train_epochs"] == 5


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    (tmp_path / "models" / "teacher").mkdir(parents=True)
    sub = tmp_path / "cfg"
    sub.mkdir()
    path = write(sub, {
        "dataset": {"labeled_path": "../data/train.jsonl", "logits_path": "cache"},
        "models": {"teacher": "../models/teacher", "student": "/abs/student"},
        "training": {"output_dir": "out"},
    })
    config = load_config(path)
    assert config.dataset.labeled_path == tmp_path / "data" / "train.jsonl"
    assert config.dataset.logits_path == sub / "cache"
    assert config.models.teacher == [tmp_path / "models" / "teacher"]
    assert config.models.student == Path("/abs/student")
    assert config.training["output_dir"] == str(sub / "out")


def test_unknown_key_names_path_and_closest_key(tmp_path):
    assert "`lora.rank` is not a setting; did you mean `lora.r`?" in error_of(tmp_path, {"lora": {"rank": 8}})
    message = error_of(tmp_path, {"distillation": {"temprature": 2.0}})
    assert "did you mean `distillation.temperature`" in message
    assert "did you mean `lora`" in error_of(tmp_path, {"loar": {}})
    message = error_of(tmp_path, {"training": {"learning_rat": 1e-4}})
    assert "`training.learning_rat`" in message and "`training.learning_rate`" in message


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path):
    message = error_of(tmp_path, {"lora": {"zzzz": 1}})
    assert "valid keys:" in message and "target_modules" in message


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"lora": {"bias": "some"}}, '`lora.bias` = "some" is not allowed: use one of "none" | "all" | "lora_only"'),
        ({"lora": {"r": "8"}}, "`lora.r` = \"8\" is not valid: expected an integer"),
        ({"lora": {"r": 0}}, "`lora.r` = 0 is out of range"),
        ({"lora": {"enable": "yes"}}, "`lora.enable`"),
        ({"lora": {"target_modules": []}}, "`lora.target_modules`"),
        ({"distillation": {"distillation_type": "kl"}}, '"forward_kld" | "reverse_kld" | "jsd" | "tvd"'),
        ({"distillation": {"kd_ratio": 1.5}}, "`distillation.kd_ratio` = 1.5 is out of range: use a number in [0, 1]"),
        ({"distillation": {"temperature": 0}}, "`distillation.temperature`"),
        ({"distillation": {"tail": "drop"}}, '"bucket" | "renormalize"'),
        ({"inference": {"top_logits_num": 5000}}, "`inference.top_logits_num` = 5000 is out of range"),
        ({"inference": {"top_logits_num": 0}}, "the cache would hold no teacher targets"),
        ({"inference": {"tail_samples": -1}}, "`inference.tail_samples` = -1 is out of range"),
        ({"inference": {"engine": "sglang"}}, '"vllm" | "hf"'),
        ({"inference": {"mode": "both"}}, '"score" | "generate"'),
        ({"models": {"teacher": 5}}, "`models.teacher` = 5 is not valid: expected a list of paths"),
        ({"dataset": []}, "`dataset` must be a JSON object"),
        ({"training": {"learning_rate": 1, "warmup_ratio": 2}}, "`training.warmup_ratio`"),
    ],
)
def test_wrong_type_or_value_names_path_and_allowed_values(tmp_path, data, expected):
    assert expected in error_of(tmp_path, data)


def test_teacher_weights_must_match_teachers(tmp_path):
    data = {"models": {"teacher": ["a/b", "c/d"]}, "distillation": {"teacher_weights": [1.0]}}
    assert "one weight per teacher" in error_of(tmp_path, data)


def test_warmup_ratio_maps_to_transformers_warmup_steps(tmp_path):
    config = load_config(write(tmp_path, {"training": {"warmup_ratio": 0.1}}))
    assert config.training == {"warmup_steps": 0.1}


def test_overrides_are_json_typed(tmp_path):
    path = write(tmp_path, {"lora": {"r": 16}})
    config = load_config(path, ["lora.r=8", "lora.enable=false", 'lora.target_modules=["q_proj"]',
                                "training.learning_rate=5e-4", "dataset.logits_path=cache_dir"])
    assert config.lora.r == 8 and config.lora.enable is False
    assert config.lora.target_modules == ["q_proj"]
    assert config.training["learning_rate"] == 5e-4
    assert config.dataset.logits_path == tmp_path / "cache_dir"


@pytest.mark.parametrize(
    "override, expected",
    [("lora.r", "section.key=value"), ("r=8", "section.key=value"), ("lroa.r=8", "did you mean `lora`"),
     ("lora.rank=8", "did you mean `lora.r`")],
)
def test_bad_overrides(tmp_path, override, expected):
    assert expected in error_of(tmp_path, {}, [override])


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "lora": {"r": 8,}\n}')
    with pytest.raises(UserError, match=r"bad\.json:2:\d+: not valid JSON"):
        load_config(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(UserError, match="must be a JSON object"):
        load_config(bad)


def test_to_dict_round_trips(tmp_path):
    config = load_config(write(tmp_path, {"models": {"teacher": "t/t"}, "lora": {"r": 4}, "training": {"seed": 3}}))
    again = config_from_dict(json.loads(json.dumps(config.to_dict())), base_dir=tmp_path)
    assert again.to_dict() == config.to_dict()
