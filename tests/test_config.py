"""Settings: environment over .env, explicit values over presets, bad values stop start-up by name."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from packaging.utils import canonicalize_name

from config import ROOT, Settings, load_settings
from tools.lock import UNHASHED, roots
from tools.pip_check import unmet


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ("PORT", "MAX_STEPS", "PERFORMANCE_PRESET", "DEFAULT_STEPS", "IMAGE_DIR", "APP_ENV"):
        monkeypatch.delenv(name, raising=False)


def test_defaults():
    settings = Settings(_env_file=None)
    assert (settings.host, settings.port, settings.app_env) == ("127.0.0.1", 5000, "development")
    assert settings.max_prompt_length == 3000 and settings.log_max_bytes == 1_000_000
    assert settings.log_backup_count == 5 and settings.default_steps == 20
    assert settings.image_dir == str(ROOT / "generated_images")


def test_environment_beats_dotenv(tmp_path, monkeypatch):
    env_file = tmp_path / ".env"
    env_file.write_text("PORT=6000\nMAX_STEPS=33\n")
    monkeypatch.setenv("PORT", "7000")
    settings = Settings(_env_file=env_file)
    assert settings.port == 7000
    assert settings.max_steps == 33


def test_preset_sets_defaults_and_explicit_values_win(monkeypatch):
    low = Settings(_env_file=None, performance_preset="low")
    assert (low.default_steps, low.max_batch_size, low.attention_slicing, low.vae_tiling) == (15, 2, True, True)
    high = Settings(_env_file=None, performance_preset="high")
    assert high.max_batch_size == 8 and high.max_width == 1024
    monkeypatch.setenv("PERFORMANCE_PRESET", "low")
    monkeypatch.setenv("MAX_STEPS", "40")
    mixed = Settings(_env_file=None)
    assert (mixed.default_steps, mixed.max_steps) == (15, 40)


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("PORT", "not-a-port", "PORT"),
        ("PORT", "70000", "PORT"),
        ("APP_ENV", "staging", "APP_ENV"),
        ("DEVICE", "tpu", "DEVICE"),
        ("MAX_WIDTH", "100", "MAX_WIDTH"),
        ("DEFAULT_STEPS", "80", "DEFAULT_STEPS"),
        ("TORCH_DTYPE", "int8", "TORCH_DTYPE"),
        ("RATE_LIMIT", "lots", "RATE_LIMIT"),
        ("RATE_LIMIT_DEFAULT", "10 per fortnight", "RATE_LIMIT_DEFAULT"),
        ("RATE_LIMIT_COST", "many", "RATE_LIMIT_COST"),
        ("WEBHOOK_ALLOWED_PORTS", "http", "WEBHOOK_ALLOWED_PORTS: 'http' is not a port"),
        ("WEBHOOK_ALLOWED_PORTS", "443,70000", "'70000' is not a port"),
        ("WORKER_MODELS", "models/demo-shapes,sdxl", "WORKER_MODELS names sdxl, not in MODELS (models/demo-shapes)"),
    ],
)
def test_bad_values_stop_start_up_naming_the_variable(monkeypatch, name, value, fragment):
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as stop:
        load_settings(_env_file=None)
    assert fragment in str(stop.value)


def test_settings_are_frozen():
    settings = Settings(_env_file=None)
    with pytest.raises(ValueError):
        settings.port = 1  # type: ignore[misc]


def test_relative_paths_resolve_against_the_project():
    settings = Settings(_env_file=None, image_dir="somewhere/images")
    assert settings.image_dir == str(ROOT / "somewhere" / "images")
    assert Settings.resolve_source("models/tiny-random") == str(ROOT / "models" / "tiny-random")
    assert Settings.resolve_source("org/hub-model") == "org/hub-model"


def test_every_setting_is_documented():
    configuration = (ROOT / "CONFIGURATION.md").read_text()
    example = (ROOT / ".env.example").read_text()
    for name in Settings.model_fields:
        assert f"`{name.upper()}`" in configuration, f"{name.upper()} missing from CONFIGURATION.md"
        assert f"{name.upper()}=" in example, f"{name.upper()} missing from .env.example"


def test_cluster_mode_names_what_is_missing():
    with pytest.raises(SystemExit) as stopped:
        load_settings(_env_file=None, queue_backend="celery", broker_url="amqp://h//")
    assert "DATABASE_URL" in str(stopped.value) and "IMAGE_DIR" in str(stopped.value)
    assert "BROKER_URL" not in str(stopped.value).split("needs a shared")[1]
    cluster = {"queue_backend": "celery", "broker_url": "amqp://h//", "image_dir": "s3://b/p"}
    with pytest.raises(SystemExit, match="not SQLite"):
        load_settings(_env_file=None, database_url="sqlite:////tmp/x.db", **cluster)
    cluster["database_url"] = "postgresql+psycopg://u@h/db"
    with pytest.raises(SystemExit, match="SECRET_KEY"):
        load_settings(_env_file=None, api_keys="k" * 20, **cluster)
    with pytest.raises(SystemExit, match="QUEUE_BACKEND=celery needs ADMIN_TOKEN"):  # replicas must agree on it
        load_settings(_env_file=None, **cluster)
    cluster["admin_token"] = "a" * 20
    settings = load_settings(_env_file=None, **cluster)
    assert settings.database == cluster["database_url"] and settings.image_dir == "s3://b/p"
    local = load_settings(_env_file=None)
    assert local.database.endswith("data/imagegen.sqlite3") and local.image_dir == str(ROOT / "generated_images")


def test_env_example_names_every_setting_once_and_starts_when_uncommented(tmp_path):
    text = (ROOT / ".env.example").read_text()
    names = re.findall(r"^# ([A-Z0-9_]+)=", text, re.MULTILINE)
    assert sorted(names) == sorted(name.upper() for name in Settings.model_fields)
    env = tmp_path / ".env"
    env.write_text(re.sub(r"^# ([A-Z0-9_]+=)", r"\1", text, flags=re.MULTILINE))
    assert Settings(_env_file=env) == Settings(_env_file=None), "uncommented, it is the defaults"


def test_a_short_admin_token_stops_a_production_start(monkeypatch):
    monkeypatch.setenv("APP_ENV", "production")
    monkeypatch.setenv("ADMIN_TOKEN", "short")
    monkeypatch.setenv("ALLOW_ANONYMOUS", "true")
    with pytest.raises(SystemExit, match="ADMIN_TOKEN must be at least 16 characters"):
        load_settings(_env_file=None)


def test_every_requirement_is_pinned_and_hash_locked():
    """make installs the lock files (tools/lock.py): a requirement added without `make lock` would
    be missing from them, and a version changed in one file only would install the other."""
    pinned = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line)
    locked: dict[str, str] = {}
    for lock in ("requirements.lock", "requirements-gpu.lock", "requirements-dev.lock"):
        entries = re.findall(
            r"^([\w.-]+)==(\S+)((?: \\\n    --hash=sha256:[0-9a-f]{64})+)", (ROOT / lock).read_text(), re.M
        )
        for name, version, digests in entries:
            assert digests, name
            locked[canonicalize_name(name)] = version
    assert locked == {canonicalize_name(n): v for n, v in pinned.items() if n not in UNHASHED}
    for requirement in roots(ROOT / "requirements-dev.txt") + roots(ROOT / "requirements-gpu.txt"):
        name = canonicalize_name(requirement.name)
        assert requirement.specifier.contains(locked.get(name) or pinned[name]), requirement


def test_the_pip_check_excuses_only_what_packages_installed_without_dependencies_do_not_need():
    report = (
        "invisible-watermark 0.2.0 requires opencv-python, which is not installed.\n"
        "invisible-watermark 0.2.0 requires onnx, which is not installed.\n"
        "invisible-watermark 0.2.0 requires torch, which is not installed.\n"
        "celery 5.6.3 requires kombu, which is not installed.\n"
    )
    assert unmet(report) == [
        "invisible-watermark 0.2.0 requires torch, which is not installed.",
        "celery 5.6.3 requires kombu, which is not installed.",
    ]
    assert unmet("No broken requirements found.\n") == []
    assert subprocess.run([sys.executable, "tools/pip_check.py"], cwd=ROOT, capture_output=True).returncode == 0


def test_names_of_0_2_are_read_with_a_warning_and_misspelled_ones_named(tmp_path, monkeypatch, caplog):
    env = tmp_path / ".env"
    env.write_text("RATE_LIMT=5/minute\nLORA_URL=s3://bucket/loras\nMODEL_LOAD_RETRY_SECONDS=3\n")
    monkeypatch.setenv("STORAGE_URL", "s3://bucket/images")
    monkeypatch.setenv("MAX_BATCH_SIZ", "2")  # close to a setting: named although the environment holds much else
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # not close to any: not ours to judge
    with caplog.at_level("WARNING", logger="imagegen.config"):
        settings = load_settings(_env_file=env)
    assert settings.image_dir == "s3://bucket/images" and settings.lora_dir == "s3://bucket/loras"
    said = [record.getMessage() for record in caplog.records]
    assert "RATE_LIMT (in .env) is not a setting of imagegen; did you mean RATE_LIMIT?" in said
    assert "MAX_BATCH_SIZ (in the environment) is not a setting of imagegen; did you mean MAX_BATCH_SIZE?" in said
    assert any(line.startswith("STORAGE_URL (in the environment) is now IMAGE_DIR") for line in said)
    assert any(line.startswith("LORA_URL (in .env) is now LORA_DIR") for line in said)
    assert any(line.startswith("MODEL_LOAD_RETRY_SECONDS (in .env) is no longer read") for line in said)
    assert not any("OMP_NUM_THREADS" in line for line in said)
    monkeypatch.setenv("IMAGE_DIR", str(tmp_path / "mine"))
    assert load_settings(_env_file=env).image_dir == str(tmp_path / "mine"), "the new name wins over the old"


@pytest.mark.parametrize(
    ("name", "value", "said"),
    [
        ("METRICS_TOKEN", "m", "METRICS_TOKEN must be at least 16"),
        ("SECRET_KEY", "s" * 31, "SECRET_KEY must be at least 32"),
        ("WEBHOOK_SECRET", "w" * 8, "WEBHOOK_SECRET must be at least 32"),
        ("API_KEYS", "k" * 40 + ",short", r"every API key \(API_KEYS, API_KEYS_FILE\) must be at least 16"),
    ],
)
def test_weak_secrets_stop_a_production_start(monkeypatch, name, value, said):
    monkeypatch.setenv("APP_ENV", "production")
    monkeypatch.setenv("API_KEYS", "k" * 40)
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit, match=said):
        load_settings(_env_file=None)
    monkeypatch.setenv("APP_ENV", "development")
    assert load_settings(_env_file=None), "development takes any"


@pytest.mark.parametrize("model", ["models/nope", "./nope", "/no/such/folder", "nope.safetensors"])
def test_a_model_that_names_no_folder_here_stops_start_up_with_one_line(app_factory, model):
    """A path that names nothing (`models/` is a folder of the project, so `models/nope` is not a
    hub id) is said at start; it used to start, then ask the hub at every load."""
    with pytest.raises(SystemExit) as stopped:
        app_factory(model_id=model)
    assert str(stopped.value) == f"cannot serve: no such folder or known model: {model}"


def test_a_hub_id_is_left_for_the_hub_to_answer_at_load():
    from imagegen.catalogue import hub_id

    assert hub_id("stabilityai/sdxl-turbo") and hub_id("black-forest-labs/FLUX.1-schnell")
    assert not hub_id("models/nope") and not hub_id("nope") and not hub_id("../x/y")


def test_development_gives_a_learners_generation_limit_and_production_a_tight_one():
    development = Settings(_env_file=None)
    assert development.rate_limit == "60/minute" and development.origin("rate_limit") == "preset"
    production = Settings(_env_file=None, app_env="production", allow_anonymous=True)
    assert production.rate_limit == "10/minute" and production.origin("rate_limit") == "default"
    assert Settings(_env_file=None, rate_limit="5/minute").origin("rate_limit") == "environment"


def test_an_api_key_entry_may_name_the_key_and_its_priority_class():
    settings = Settings(_env_file=None, api_keys="batch:key-one-0123456789:low,key:with:colons,plain-key-0123456789")
    assert settings.api_key_entries() == [
        ("batch", "key-one-0123456789", "low"),
        ("", "key:with:colons", "normal"),  # not a class: the whole entry is the key
        ("", "plain-key-0123456789", "normal"),
    ]
    assert settings.api_key_list() == ["key-one-0123456789", "key:with:colons", "plain-key-0123456789"]
