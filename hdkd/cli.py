"""Command line: ``python -m hdkd {train,search,compare,standins,config}``.

Bad input (config, data, model paths, stores) prints one ``hdkd: error: ...`` line on stderr and exits with 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import warnings

EXIT_BAD_INPUT = 2

# MLproject parameters: an empty string means "as in the config".
SHORTCUTS = {
    "portion": "data.portion",
    "hidden_weight": "distill.hidden_weight",
    "learning_rate": "training.learning_rate",
    "num_train_epochs": "training.num_train_epochs",
    "n_trials": "search.n_trials",
    "study_name": "search.study_name",
    "storage": "search.storage",
}


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    from hdkd.config import ConfigError
    from hdkd.data import DataError
    from hdkd.hub import HubUnavailableError
    from hdkd.models import ModelError

    return ConfigError, DataError, HubUnavailableError, ModelError


def _add_config_arguments(parser: argparse.ArgumentParser, shortcuts: tuple[str, ...]) -> None:
    parser.add_argument("--config", default=None,
                        help="YAML file with any subset of keys (default: config/hyperparameters.yaml values)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set training.learning_rate=1e-4 (repeatable)")
    for name in shortcuts:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default="", metavar="VALUE",
                            help=f"shortcut for --set {SHORTCUTS[name]}=VALUE; empty keeps the config value")


def _overrides(args: argparse.Namespace, shortcuts: tuple[str, ...]) -> list[str]:
    values = list(args.overrides)
    for name in shortcuts:
        value = getattr(args, name, "")
        if value is not None and str(value).strip() != "":
            values.append(f"{SHORTCUTS[name]}={value}")
    return values


def _load(args: argparse.Namespace, shortcuts: tuple[str, ...]):
    from hdkd.config import load_config

    path = args.config if args.config not in (None, "") else None
    return load_config(path, _overrides(args, shortcuts))


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("urllib3", "filelock", "httpx", "alembic", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if level.upper() != "DEBUG":
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="mlflow")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        if "transformers" in sys.modules and os.environ["TRANSFORMERS_VERBOSITY"] == "error":
            # transformers reads the variable once, when first imported; a caller may have imported it already.
            from transformers.utils import logging as transformers_logging

            transformers_logging.set_verbosity_error()


# --- Commands -------------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from hdkd import tracking
    from hdkd.pipeline import check_inputs
    from hdkd.runner import Interrupted, run_training

    cfg = _load(args, TRAIN_SHORTCUTS)
    checked = check_inputs(cfg)
    if args.program:
        gc.freeze()  # the imports and tokenizers live until exit; see freeze_at_exit()
    try:
        outcome = run_training(cfg, checked=checked)
    except Interrupted as err:
        logging.getLogger("hdkd").warning("%s", err)
        return 128 + err.signum
    s = outcome.summary
    note = " [RANDOM WEIGHTS: accuracies mean nothing]" if s["random_weights"] else ""
    model = f", model runs:/{outcome.run_id}/student" if cfg.tracking.log_model else ""
    logging.getLogger("hdkd").info(
        "run %s finished in %.1f s: teacher accuracy %.3f, student accuracy %.3f, agreement %.3f; artifacts at %s%s, "
        "report and student in %s%s", outcome.run_id, s["total_seconds"], s["scores"]["teacher_accuracy"],
        s["scores"]["student_accuracy"], s["scores"]["agreement"], tracking.artifact_uri(outcome.run_id), model,
        cfg.output_dir, note)
    return 0


def cmd_standins(args: argparse.Namespace) -> int:
    from hdkd.models import write_stand_ins

    counts = write_stand_ins(args.tokenizer, args.out, args.configs, seed=args.seed)
    for name, count in counts.items():
        print(f"{os.path.join(args.out, name)}: {count:,} parameters (random weights)")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from hdkd.config import Config, render_markdown, render_yaml

    if args.markdown:
        if args.config or args.overrides:
            print("hdkd: error: --markdown documents the defaults, so it takes no --config or --set", file=sys.stderr)
            return EXIT_BAD_INPUT
        sys.stdout.write(render_markdown())
        return 0
    cfg = _load(args, ()) if args.config or args.overrides else Config()
    sys.stdout.write(render_yaml(cfg))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from hdkd.search import run_search

    cfg = _load(args, SEARCH_SHORTCUTS)
    if args.program:
        gc.freeze()  # the imports live until exit; see freeze_at_exit()
    return run_search(cfg, force=args.force)


def cmd_compare(args: argparse.Namespace) -> int:
    from hdkd.compare import run_compare

    return run_compare(experiment=args.experiment, study=args.study, output=args.output)


TRAIN_SHORTCUTS = ("portion", "hidden_weight", "learning_rate", "num_train_epochs")
SEARCH_SHORTCUTS = ("portion", "n_trials", "study_name", "storage")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hdkd", description="Hidden-state knowledge distillation (Flan-T5 "
                                     "teacher -> student on AQuA-RAT), tracked in MLflow.")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging level (default INFO)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train", help="run one distillation and track it in MLflow",
        description="Run one distillation (teacher work, training, evaluation) as one MLflow run in the "
                    "experiment tracking.experiment_name (default hdkd). The same command after a crash, Ctrl-C or "
                    "SIGTERM continues the run from its last checkpoint.")
    _add_config_arguments(train, TRAIN_SHORTCUTS)
    train.set_defaults(func=cmd_train)

    search = commands.add_parser(
        "search", help="Optuna study over hidden_weight and learning rate",
        description="Run an Optuna study over distill.hidden_weight and training.learning_rate: one MLflow parent "
                    "run, one child run per trial, and the best student registered as registry.model_name with "
                    "the alias registry.alias. The same command with the same study name continues the study.")
    _add_config_arguments(search, SEARCH_SHORTCUTS)
    search.add_argument("--force", action="store_true",
                        help="move the registry alias to the study's best model even if it is not better")
    search.set_defaults(func=cmd_search)

    compare = commands.add_parser(
        "compare", help="table and plot of teacher vs student accuracy across runs",
        description="Print the tracked runs with teacher and student accuracy, best student first, and write a "
                    "plot of both.")
    compare.add_argument("--experiment", default=None,
                         help="experiment name (default: both hdkd and Default, where `mlflow run` logs)")
    compare.add_argument("--study", default=None, help="only the trials of this Optuna study")
    compare.add_argument("--output", default="comparison.png", help="PNG file to write (default comparison.png)")
    compare.set_defaults(func=cmd_compare)

    standins = commands.add_parser(
        "standins", help="write random-weight Flan-T5 stand-ins for offline work",
        description="Write random-weight models with the exact Flan-T5-small and Flan-T5-base architectures, for "
                    "work without network access. Accuracy from them means nothing.")
    standins.add_argument("--tokenizer", required=True, help="folder with the Flan-T5 tokenizer files")
    standins.add_argument("--configs", default=None,
                          help="folder with flan-t5-small/config.json and flan-t5-base/config.json "
                               "(default: the published architecture values built into hdkd)")
    standins.add_argument("--out", required=True, help="output folder; flan-t5-small/ and flan-t5-base/ go here")
    standins.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    standins.set_defaults(func=cmd_standins)

    config = commands.add_parser(
        "config", help="print the full configuration as commented YAML",
        description="Print every configuration key with its value and help, after merging --config and --set "
                    "over the defaults.")
    config.add_argument("--config", default=None, help="YAML file to merge over the defaults")
    config.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key (repeatable)")
    config.add_argument("--markdown", action="store_true",
                        help="print the key reference (type, default, help) as Markdown, as in docs/configuration.md")
    config.set_defaults(func=cmd_config)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM received outside the training loop; raised like Ctrl-C so an open run ends KILLED."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


def _raise_terminated(signum, frame):
    raise Terminated(signum)


def keep_freed_memory() -> None:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    Training and generation free and reallocate activations of a few MiB at every step. With glibc's defaults many
    come back as fresh pages: a 1-thread run of the Flan-T5-sized benchmark took 1.45 million page faults and a
    quarter of its CPU time in the kernel, and 0.8 million faults with these settings. Peak memory grows by the
    reused blocks. The parameter numbers are glibc's; nothing is changed outside Linux.
    """
    import ctypes

    if not sys.platform.startswith("linux"):
        return
    try:
        # The process's own symbols include the C library's.
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # glibc's <malloc.h> parameter numbers
    mallopt(m_mmap_threshold, 32 << 20)  # blocks up to 32 MiB (glibc's maximum) come from the heap
    mallopt(m_trim_threshold, 1 << 30)  # free heap memory is returned only beyond 1 GiB
    mallopt(m_top_pad, 64 << 20)


def freeze_at_exit() -> None:
    """Move every object alive now out of the garbage collector's reach (``gc.freeze``) before the process exits.

    A run keeps millions of objects alive until exit: modules of torch, transformers and MLflow, tokenizers, models.
    Python's full collections walk all of them again during the run and once more at exit. In a benchmark run that
    took 4.6 of 27 seconds (2.8 during the run, 1.8 at exit, sampled with py-spy). Frozen objects are never
    collected, so main() freezes only when it runs as the program, never when other code calls it with ``argv``.
    """
    gc.freeze()


def main(argv: list[str] | None = None) -> int:
    """Run one command; ``argv`` None reads the command line and marks this process as the program."""
    args = build_parser().parse_args(argv)
    args.program = argv is None
    _setup_logging(args.log_level)
    keep_freed_memory()

    # The training loop replaces this handler with one that saves a checkpoint first.
    in_main_thread = _main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        return args.func(args)
    except _bad_input_errors() as err:
        if args.debug:
            raise
        message = str(err).replace("\n", " ")
        print(f"hdkd: error: {message}", file=sys.stderr)
        if args.func in (cmd_train, cmd_search) and os.environ.get("MLFLOW_RUN_ID"):
            from hdkd import tracking

            tracking.tag_project_run(f"{type(err).__name__}: {message}")
        return EXIT_BAD_INPUT
    except FloatingPointError as err:  # hdkd.trainer.NonFiniteLossError: names the step and the loss term
        if args.debug:
            raise
        # Training stopped under an open progress bar, which leaves the cursor at the end of its line.
        print(f"\nhdkd: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        signum = getattr(err, "signum", signal.SIGINT)
        print(f"hdkd: interrupted by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
        if args.program:
            freeze_at_exit()


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
