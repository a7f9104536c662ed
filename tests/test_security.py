"""Security rules. hdkd never unpickles files a user or a cache could have written, and runs no model code unless
trust_remote_code is on. No secret from the environment or a storage URL reaches a run's params, tags or
artifacts. The docs bind the MLflow UI to 127.0.0.1."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from hdkd.cli import main
from hdkd.tracking import mask_secrets
from tests.conftest import REPO

PACKAGE = REPO / "hdkd"
UNSAFE_MODULES = {"pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}


def _overrides(values: dict) -> list[str]:
    args = []
    for key, value in values.items():
        args += ["--set", f"{key}={value}"]
    return args


def _package_sources() -> list[Path]:
    sources = sorted(PACKAGE.rglob("*.py"))
    assert sources
    return sources


# --- Loading files --------------------------------------------------------------------------------------


def _unsafe_calls(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"import {name}" for name in names if name.split(".")[0] in UNSAFE_MODULES]
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        keywords = {k.arg: k.value for k in node.keywords}
        target = ast.unparse(node.func)
        # torch.load unpickles unless weights_only=True; numpy does with allow_pickle=True.
        if target.endswith("torch.load"):
            weights_only = keywords.get("weights_only")
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                found.append(f"{target} without weights_only=True")
        if target in ("np.load", "numpy.load"):
            allow = keywords.get("allow_pickle")
            if isinstance(allow, ast.Constant) and allow.value is True:
                found.append(f"{target} with allow_pickle=True")
        if target.endswith(("pd.read_pickle", "pandas.read_pickle")):
            found.append(target)
    return found


def test_package_never_unpickles():
    problems = {}
    for source in _package_sources():
        calls = _unsafe_calls(ast.parse(source.read_text(encoding="utf-8")))
        if calls:
            problems[str(source.relative_to(REPO))] = calls
    assert problems == {}


def test_unsafe_call_finder_finds_them():
    # The finder itself, on code that does what the package must not.
    code = ("import pickle\nimport torch\nfrom joblib import load\ntorch.load(path)\n"
            "torch.load(path, weights_only=False)\ntorch.load(path, weights_only=True)\nnp.load(p, allow_pickle=True)\n")
    assert _unsafe_calls(ast.parse(code)) == [
        "import pickle", "import joblib", "torch.load without weights_only=True",
        "torch.load without weights_only=True", "np.load with allow_pickle=True"]


def test_caches_are_safetensors_arrow_or_json(tiny_config):
    from hdkd.config import load_config
    from hdkd.pipeline import check_inputs, prepare

    prepare(check_inputs(load_config(None, tiny_config)))
    files = sorted(p for p in Path(tiny_config["cache_dir"]).rglob("*") if p.is_file())
    suffixes = {p.suffix for p in files if not p.name.endswith(".lock")}
    assert suffixes == {".arrow", ".safetensors", ".json"}


# --- Remote code ----------------------------------------------------------------------------------------


def test_no_literal_trust_remote_code_true():
    for source in _package_sources():
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                assert not (isinstance(node.value, ast.Constant) and node.value.value is True), source


def test_trust_remote_code_defaults_off():
    from hdkd.config import Config

    assert Config().trust_remote_code is False


def test_model_code_not_run_by_default(mlflow_store, tiny_config, tmp_path, capsys):
    # A model folder whose config names Python code of its own, which would leave a marker file if it ran.
    folder = tmp_path / "custom-model"
    folder.mkdir()
    marker = tmp_path / "code-ran"
    (folder / "config.json").write_text(json.dumps({
        "model_type": "hdkd-custom", "is_encoder_decoder": True,
        "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"}}), encoding="utf-8")
    (folder / "configuration_custom.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
        "from transformers import PretrainedConfig\n\n\nclass CustomConfig(PretrainedConfig):\n"
        "    model_type = 'hdkd-custom'\n", encoding="utf-8")
    assert main(["train", *_overrides({**tiny_config, "teacher": folder})]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hdkd: error: teacher {str(folder)!r} is not a loadable transformers model")
    assert "trust_remote_code" in err
    assert not marker.exists()


# --- Secrets --------------------------------------------------------------------------------------------

SECRETS = {
    "HF_TOKEN": "hf_FAKEtokenValue1234",
    "MLFLOW_TRACKING_PASSWORD": "mlflowFAKEpassword5678",
    "DATABASE_URL": "postgresql://hdkd:databaseFAKEpw9012@127.0.0.1:5432/optuna",
}
STORAGE_PASSWORD = "storageFAKEpw3456"


def test_mask_secrets_values_and_url_passwords(monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    text = (f"token {SECRETS['HF_TOKEN']} and mysql://root:{STORAGE_PASSWORD}@db.local/optuna and "
            f"{SECRETS['DATABASE_URL']} and {SECRETS['MLFLOW_TRACKING_PASSWORD']}")
    masked = mask_secrets(text)
    assert masked == ("token *** and mysql://root:***@db.local/optuna and postgresql://hdkd:***@127.0.0.1:5432/optuna "
                      "and ***")


def _run_texts(client: MlflowClient, run_id: str, download_dir: Path) -> dict[str, str]:
    """Return every param, tag and artifact of a run as text, keyed by where it came from."""
    run = client.get_run(run_id)
    texts = {f"param {k}": f"{k}={v}" for k, v in run.data.params.items()}
    texts.update({f"tag {k}": f"{k}={v}" for k, v in run.data.tags.items()})
    root = Path(client.download_artifacts(run_id, "", str(download_dir)))
    for path in root.rglob("*"):
        if path.is_file():
            texts[f"artifact {path.relative_to(root)}"] = path.read_bytes().decode("utf-8", errors="replace")
    return texts


def test_secrets_never_logged(mlflow_store, tiny_config, tmp_path, monkeypatch, capsys, caplog):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    storage = f"postgresql://hdkd:{STORAGE_PASSWORD}@127.0.0.1:5432/optuna"
    values = {**tiny_config, "training.num_train_epochs": 1, "tracking.log_model": False, "search.storage": storage}
    assert main(["train", *_overrides(values)]) == 0

    run = mlflow.search_runs(experiment_names=["hdkd-test"], output_format="list")[0]
    client = MlflowClient()
    texts = _run_texts(client, run.info.run_id, tmp_path / "downloaded")
    assert "artifact config.yaml" in texts
    assert "artifact report.json" in texts
    for name in Path(tiny_config["output_dir"]).rglob("*"):
        if name.is_file() and name.suffix in (".json", ".md", ".yaml", ".txt"):
            texts[f"output {name.name}"] = name.read_text(encoding="utf-8", errors="replace")
    out, err = capsys.readouterr()
    texts["stdout"], texts["stderr"], texts["log"] = out, err, caplog.text

    for secret in (*SECRETS.values(), STORAGE_PASSWORD):
        leaks = [where for where, text in texts.items() if secret in text]
        assert leaks == [], secret

    # The storage URL is logged, with its password masked.
    masked = "postgresql://hdkd:***@127.0.0.1:5432/optuna"
    assert run.data.params["search.storage"] == masked
    assert f"storage: {masked}" in texts["artifact config.yaml"]


# --- Docs -----------------------------------------------------------------------------------------------


def _markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_docs_bind_mlflow_to_localhost():
    commands = []
    for path in _markdown_files():
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            if re.search(r"^\s*(\$ )?mlflow (ui|server)\b", line):
                commands.append((path.name, line.strip()))
    assert commands, "no `mlflow ui` or `mlflow server` command in the docs"
    for name, line in commands:
        assert "--host 127.0.0.1" in line, (name, line)
